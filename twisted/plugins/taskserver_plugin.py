"""twistd plugin: ``twistd -n taskserver``.

Uses Twisted's lazy ServiceMaker so that listing plugins (``twistd --help``)
does not import the application or its Redis client.
"""

from twisted.application.service import ServiceMaker

taskserver = ServiceMaker(
    "taskserver",
    "taskserver.tap",
    "HTTP task queue: rate-limited enqueue, Redis-backed reliable queue, consumers, task log.",
    "taskserver",
)
