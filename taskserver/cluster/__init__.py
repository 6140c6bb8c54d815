"""The process side: the master, its children, and what keeps them together.

``master`` owns the listening socket (``listener``), the embedded Redis
(``embedded``), the task log and the children (``supervisor``); a child
(``child``) runs the web app and the consumers on the shared socket,
balanced by ``balance``, tied to the master's life by ``lifeline``, and
speaking ``protocol`` with it. Nothing here knows HTTP routes or Redis
keys: the child wires the web and queue modules together.
"""
