"""
``[relay] log_format = json``: one JSON object a line, for log shippers.

Each line holds the same facts as twistd's text line: ``time`` (ISO 8601
UTC), ``level``, ``namespace``, ``message`` (the formatted text), then the
event's own fields (``serial``, ``peer``, ``reason``...), and ``failure``
with the traceback text when there is one.  Twisted's bookkeeping keys
(``log_*``) and the legacy ``log.msg`` keys are left out.  Only what the
relay already puts in its log lines is written: no field holds a secret.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python import logfile

# Keys twisted.python.log adds to legacy events; their content is in "message".
_LEGACY_KEYS = frozenset({"message", "format", "isError", "time", "why", "system", "failure"})


def json_line(event: dict[str, Any]) -> str:
    """One event as a JSON object and a newline."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        record[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    return json.dumps(record) + "\n"


def json_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event to ``out`` as one JSON line."""
    return FileLogObserver(out, json_line)


#: Where :func:`twistd_json_observer` writes: twistd's ``--logfile`` (``-``:
#: stdout), set by the plugin's options before twistd calls it.
destination = "-"


def twistd_json_observer() -> ILogObserver:
    """
    The log observer twistd makes for ``--logger=oemrelay.logformat.twistd_json_observer``
    (twistd takes the observer factory by name, and calls it with no argument).
    """
    if destination == "-":
        return json_observer(sys.stdout)
    return json_observer(logfile.LogFile.fromFullPath(destination))
