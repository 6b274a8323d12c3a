"""
The ``twistd oemrelay`` command line: options and the service maker.

A bad configuration is reported as one line naming file, section and key,
with exit status 1, before the daemon starts.  ``[relay] log_format = json``
is applied here, by choosing twistd's ``--logger``.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from .config import ConfigError, load_config
from . import logformat


class Options(usage.Options):
    """``twistd oemrelay -c relay.ini``"""

    synopsis = "[-c relay.ini]"
    longdesc = "Relay Digital Matter devices to HTTP(S), raw TCP or file connectors."
    optParameters = [
        ["config", "c", "relay.ini", "The relay's INI configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["relay_config"] = load_config(self["config"])
        except ConfigError as error:
            # twistd would print its whole usage text before a UsageError;
            # a configuration mistake deserves just the one line.
            sys.stderr.write(f"oemrelay: {error}\n")
            raise SystemExit(1) from None
        self._choose_log_format()

    def _choose_log_format(self) -> None:
        # twistd makes its log observer after parsing options, from its own
        # --logger option: setting that option is how a plugin chooses the
        # format.  An explicit --logger on the command line still wins.
        server_options = self.parent
        if self["relay_config"].relay.log_format != "json" or server_options is None:
            return
        if server_options.get("logger"):
            return
        # Where twistd itself would write: --logfile, else stdout in the
        # foreground and twistd.log for a daemon.
        logformat.destination = server_options.get("logfile") or (
            "-" if server_options.get("nodaemon") else "twistd.log"
        )
        server_options["logger"] = f"{logformat.__name__}.{logformat.twistd_json_observer.__name__}"


def makeService(options: Options):
    """Build the relay for the loaded configuration."""
    from . import reactor as relay_reactor

    relay_reactor.install()
    from twisted.internet import reactor

    from .service import build_service

    return build_service(options["relay_config"], reactor)
