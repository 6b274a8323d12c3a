"""
``python -m oemrelay.worker_main SPEC``: one worker process, as the parent
(:mod:`oemrelay.workers`) starts it.

Nothing is imported before SPEC is read: when the relay's devices need no
TLS (``"tls": false``, from :attr:`oemrelay.config.Config.devices_use_tls`),
pyOpenSSL is kept out of the process before Twisted's TCP support would load
it, and cryptography with it: 13 MB of every worker.  Twisted then serves
TCP as it does where pyOpenSSL is not installed.
"""

import json
import sys


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    if not spec.get("tls", True):
        sys.modules["OpenSSL"] = None  # importing it now fails at once
    from . import reactor

    reactor.install()
    from .workers import worker_main

    worker_main(spec)


if __name__ == "__main__":
    main(sys.argv[1:])
