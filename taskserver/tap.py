# -*- test-case-name: tests.test_tap -*-
"""twistd glue: the ``taskserver`` options and ``makeService``.

Options are generated from :data:`taskserver.config.OPTIONS`, so the command
line, the environment and the README table describe the same settings.
Configuration errors end start-up with one line on stderr, not a traceback
or a page of usage text.
"""

from __future__ import annotations

import os

from dotenv import find_dotenv, load_dotenv
from twisted.application.service import IService
from twisted.python import usage

from taskserver.cluster.embedded import find_server_binary, lock_data_dir
from taskserver.cluster.listener import bind_listener
from taskserver.cluster.master import Master
from taskserver.config import (
    OPTIONS,
    ConfigError,
    Settings,
    load_settings,
    resolve_handler,
    resolve_task_handlers,
)


class Options(usage.Options):
    """``twistd taskserver [options]``; every option also has an environment variable."""

    optParameters = [
        [o.option, None, None, f"{o.doc} [{o.env}, default: {o.default or 'empty'}]"]
        for o in OPTIONS
        if not o.flag
    ]
    optFlags = [[o.option, None, f"{o.doc} [{o.env}]"] for o in OPTIONS if o.flag]

    settings: Settings

    def postOptions(self) -> None:
        # usecwd: find_dotenv() otherwise searches from this file, not where twistd runs.
        load_dotenv(find_dotenv(usecwd=True), override=False)
        cli = {
            o.name: ("true" if self[o.option] else None) if o.flag else self[o.option]
            for o in OPTIONS
        }
        try:
            self.settings = load_settings(cli, os.environ)
        except ConfigError as e:
            raise SystemExit(f"taskserver: {e}") from None


def makeService(options: Options) -> IService:
    """Bind the port and check everything that can fail before the reactor runs."""
    from twisted.internet import reactor

    settings = options.settings
    try:
        resolve_handler(settings.handler)  # fail now, not in every child
        resolve_task_handlers(settings.task_handlers)
        binary = None if settings.redis else find_server_binary(settings.redis_server_bin)
        data_lock = None if settings.redis else lock_data_dir(settings.data_dir)
        listener = bind_listener(settings.interface, settings.port)
    except ConfigError as e:
        raise SystemExit(f"taskserver: {e}") from None
    return Master(settings, listener, reactor, binary, data_lock)
