"""taskserver: an HTTP task-queue server on Twisted, backed by Redis."""

__version__ = "0.1.0"
