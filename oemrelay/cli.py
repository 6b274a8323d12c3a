"""
The ``oemrelay`` command: tools around the relay, not the relay itself.

* ``oemrelay simulate HOST:PORT``: a fleet of simulated devices (or, with
  ``--replay FILE``, captured frames sent once) against a running relay;
* ``oemrelay decode HEX|FILE|-``: captured device bytes to the OEM JSON the
  HTTP connector would post, one document per upload;
* ``oemrelay check-config relay.ini``: the start-up validation and a summary
  of what would run, with no secret in it.

Every failure is one line on stderr and a non-zero exit status: 1 for bad
input or an unreachable relay, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import sys
from collections.abc import Callable, Sequence
from typing import IO

from twisted.internet.defer import Deferred

from . import __version__
from .codec import (
    Frame,
    FrameDecoder,
    Hello,
    MessageType,
    ProtocolError,
    Record,
    UINT32_MAX,
    parse_data_records,
    parse_fixed_records,
    parse_hello,
)
from .config import ConfigError, connector_target, load_config
from .oem_json import oem_document
from .registry_url import url_without_password
from .relay import connector_names

#: Descriptors one simulator process needs beside one per device.
SPARE_FDS = 64

#: Seconds between two redraws of the progress line.
PROGRESS_INTERVAL = 0.5


class CommandError(Exception):
    """A command cannot do what was asked; the message is one line."""


class _UsageError(Exception):
    """Bad arguments: the command name and the one-line reason."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line, not the usage text."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {message}")


def _whole_number(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argument type for whole numbers from ``low`` to ``high`` (None: no bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{what} {text} must be {bound}")
        return value

    return parse


_positive_int = _whole_number(1, None, "whole number")
_serial = _whole_number(0, UINT32_MAX, "serial number")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def host_and_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) split and checked."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (port 1-65535)")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    """The ``oemrelay`` argument parser with its three commands."""
    parser = _Parser(prog="oemrelay", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--version", action="version", version=f"oemrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    simulate = commands.add_parser(
        "simulate", help="a fleet of simulated devices against a relay"
    )
    simulate.add_argument("address", type=host_and_port, metavar="HOST:PORT")
    simulate.add_argument("--devices", type=_positive_int, default=1, help="devices (1)")
    simulate.add_argument("--records", type=_positive_int, default=10, help="records per upload (10)")
    until = simulate.add_mutually_exclusive_group()
    until.add_argument("--uploads", type=_positive_int, help="committed uploads per device (1)")
    until.add_argument("--duration", type=_positive_float, help="seconds to run instead")
    simulate.add_argument(
        "--rate", type=_positive_float,
        help="uploads per second for the whole fleet, evenly, each device on its own cadence"
        " (default: each as soon as the last committed)",
    )
    simulate.add_argument("--serial-base", type=_serial, default=100000, help="first serial (100000)")
    simulate.add_argument("--backoff", type=_positive_float, default=1.0,
                          help="seconds before reconnecting after a withheld commit (1)")
    simulate.add_argument("--timeout", type=_positive_float, default=30.0,
                          help="seconds to wait for each answer of the relay (30)")
    simulate.add_argument("--tls", action="store_true", help="connect with TLS")
    simulate.add_argument("--ca", metavar="FILE", help="PEM CA certificate to trust (with --tls)")
    simulate.add_argument("--insecure", action="store_true",
                          help="do not verify the relay's certificate (with --tls)")
    simulate.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    simulate.add_argument("--replay", metavar="FILE",
                          help="send captured frames (hex lines or binary) once, then a commit")

    decode = commands.add_parser("decode", help="captured device bytes to OEM JSON")
    decode.add_argument("source", metavar="HEX|FILE|-")
    decode.add_argument("--serial", type=_serial, default=0,
                        help="serial when the bytes hold no hello (0)")

    check = commands.add_parser("check-config", help="validate a relay.ini and say what would run")
    check.add_argument("config", metavar="relay.ini")
    return parser


# -- reading captures ------------------------------------------------------------------

_HEX_DIGITS = frozenset(string.hexdigits)


def capture_bytes(data: bytes) -> bytes:
    """
    The device bytes of a capture: hex text (spaces, newlines and ``#``
    comment lines allowed, as in ``tests/data/dm-captures.txt``) or raw binary.

    :raises CommandError: if it is neither.
    """
    if data.startswith(b"\x02\x55"):
        return data
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CommandError("input is neither hex text nor binary DM frames (02 55 ...)") from None
    digits = "".join(
        "".join(line.split())
        for line in text.splitlines()
        if not line.lstrip().startswith("#")
    )
    if not digits:
        raise CommandError("input holds no bytes")
    bad = next((c for c in digits if c not in _HEX_DIGITS), None)
    if bad is not None:
        raise CommandError(f"input is not hex: unexpected character {bad!r}")
    if len(digits) % 2:
        raise CommandError(f"input is not hex: odd number of digits ({len(digits)})")
    return bytes.fromhex(digits)


def capture_frames(data: bytes) -> list[Frame]:
    """
    The frames of a capture.

    :raises CommandError: if the bytes are not whole frames.
    """
    decoder = FrameDecoder()
    try:
        frames = decoder.feed(capture_bytes(data))
    except ProtocolError as error:
        raise CommandError(f"not DM frames: {error}") from None
    if decoder.buffered:
        raise CommandError(
            f"the last frame is incomplete: {decoder.buffered} bytes after frame {len(frames)}"
        )
    return frames


def _read_source(source: str, stdin: IO[bytes]) -> bytes:
    """The bytes named by ``source``: stdin for ``-``, a file, or the text itself."""
    if source == "-":
        return stdin.read()
    if os.path.exists(source):
        try:
            with open(source, "rb") as f:
                return f.read()
        except OSError as error:
            raise CommandError(f"cannot read {source}: {error.strerror}") from None
    return source.encode("utf-8", "replace")


# -- decode --------------------------------------------------------------------------


def decode_documents(frames: list[Frame], serial: int = 0) -> list[bytes]:
    """
    One OEM JSON document per upload: the records up to each commit request
    (or a new device's hello, or the end), under the latest hello.

    :raises CommandError: if a frame's records cannot be parsed, or there are none.
    """
    hello = Hello(serial, "", "")
    records: list[Record] = []
    documents = []

    def upload_ends() -> None:
        if records:
            documents.append(oem_document(hello, records))
            records.clear()

    for number, frame in enumerate(frames, 1):
        try:
            if frame.type == MessageType.HELLO:
                upload_ends()
                hello = parse_hello(frame.payload)
            elif frame.type == MessageType.DATA_RECORDS:
                records.extend(parse_data_records(frame.payload))
            elif frame.type == MessageType.FIXED_RECORDS:
                records.extend(parse_fixed_records(frame.payload))
            elif frame.type == MessageType.COMMIT_REQUEST:
                upload_ends()
        except ProtocolError as error:
            raise CommandError(f"frame {number} (type 0x{frame.type:02x}): {error}") from None
    upload_ends()
    if not documents:
        raise CommandError(f"no data records in {len(frames)} frames")
    return documents


def _decode(args, stdout: IO[str], stdin: IO[bytes]) -> int:
    frames = capture_frames(_read_source(args.source, stdin))
    for document in decode_documents(frames, args.serial):
        stdout.write(document.decode("utf-8") + "\n")
    return 0


# -- check-config ----------------------------------------------------------------------


def config_summary(config) -> list[str]:
    """What a loaded configuration would run, one line each, with no secret."""
    relay = config.relay
    lines = [f"{config.source}: OK"]
    lines += [f"devices listen on {description}" for description in relay.listen]
    used = connector_names(relay.connector) or tuple(config.connectors)[:1]
    for name, connector in config.connectors.items():
        default = " (used by devices)" if name in used else ""
        lines.append(f"connector {name}: {connector_target(connector)}{default}")
    lines.append(f"registry {url_without_password(relay.registry)}")
    if config.api.listen:
        lines += [f"API listens on {description}" for description in config.api.listen]
    else:
        lines.append("API off")
    return lines


def _check_config(args, stdout: IO[str]) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as error:
        raise CommandError(str(error)) from None
    stdout.write("\n".join(config_summary(config)) + "\n")
    return 0


# -- simulate -------------------------------------------------------------------------------


def check_fd_budget(devices: int, limits: tuple[int, int]) -> int:
    """
    The soft descriptor limit to set for ``devices`` connections.

    :param limits: the process's (soft, hard) RLIMIT_NOFILE.
    :raises CommandError: if the hard limit is too low.
    """
    soft, hard = limits
    needed = devices + SPARE_FDS
    if hard != -1 and needed > hard:
        raise CommandError(
            f"--devices {devices} needs {needed} file descriptors; this process may"
            f" open {hard}: run several simulators with different --serial-base"
        )
    return max(soft, needed) if soft != -1 else soft


def _raise_fd_limit(devices: int) -> None:
    import resource

    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = check_fd_budget(devices, limits)
    if wanted != limits[0]:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, limits[1]))


def client_endpoint_factory(reactor, args) -> Callable[[], object]:
    """Makes a new client endpoint for the relay at ``args.address``, TLS if asked."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    host, port = args.address
    if (args.ca or args.insecure) and not args.tls:
        raise CommandError("--ca and --insecure need --tls")
    if args.ca and args.insecure:
        raise CommandError("--ca and --insecure exclude each other")
    tls = None
    if args.tls:
        if args.insecure:
            tls = ssl.CertificateOptions(verify=False)
        else:
            trust = None
            if args.ca:
                try:
                    with open(args.ca, "rb") as f:
                        trust = ssl.Certificate.loadPEM(f.read())
                except (OSError, ValueError, ssl.SSL.Error) as error:
                    raise CommandError(f"--ca {args.ca}: cannot load: {error}") from None
            tls = ssl.optionsForClientTLS(host, trustRoot=trust)

    def endpoint():
        plain = HostnameEndpoint(reactor, host, port, timeout=args.timeout)
        return wrapClientTLS(tls, plain) if tls is not None else plain

    return endpoint


class Progress:
    """A one-line progress display, redrawn on ``stream`` every half second."""

    def __init__(self, fleet, clock, stream: IO[str]) -> None:
        from twisted.internet.task import LoopingCall

        self._fleet = fleet
        self._clock = clock
        self._stream = stream
        self._last = (clock.seconds(), 0)
        self._loop = LoopingCall(self.draw)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(PROGRESS_INTERVAL, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
            self._stream.write("\n")

    def draw(self) -> None:
        """Write the current line over the previous one."""
        stats = self._fleet.stats
        now = self._clock.seconds()
        then, records_then = self._last
        rate = (stats.records - records_then) / (now - then) if now > then else 0.0
        self._last = (now, stats.records)
        self._stream.write(
            f"\r{stats.uploads} uploads, {stats.records} records committed,"
            f" {stats.withheld} withheld, {rate:,.0f} records/s   "
        )
        self._stream.flush()


def summary_text(summary: dict) -> str:
    """The human-readable end-of-run summary."""
    latency = summary["commit_latency_ms"]
    return (
        f"devices            {summary['devices']}\n"
        f"uploads            {summary['uploads']}\n"
        f"records committed  {summary['records_committed']}\n"
        f"withheld           {summary['withheld']}\n"
        f"reconnects         {summary['reconnects']}\n"
        f"seconds            {summary['seconds']:.1f}\n"
        f"records/s          {summary['records_per_second']:,.1f}\n"
        f"commit latency ms  p50 {latency['p50']}  p95 {latency['p95']}  p99 {latency['p99']}\n"
    )


async def simulate(reactor, args, stdout: IO[str], stderr: IO[str]) -> int:
    """``oemrelay simulate``: run the fleet (or the replay) and print the outcome."""
    from .simulator import DeviceSettings, Fleet, SimulatorError, endpoint_connect

    endpoint_for = client_endpoint_factory(reactor, args)
    if args.replay:
        return await _replay(reactor, args, endpoint_for(), stdout)
    settings = DeviceSettings(
        records=args.records,
        uploads=0 if args.duration else (args.uploads or 1),
        interval=args.devices / args.rate if args.rate else 0.0,
        spread=bool(args.rate),
        backoff=args.backoff,
        reply_timeout=args.timeout,
    )
    fleet = Fleet(reactor, endpoint_connect(endpoint_for), args.devices, settings, args.serial_base)
    stop_at = reactor.callLater(args.duration, fleet.stop) if args.duration else None
    interrupted = reactor.addSystemEventTrigger("before", "shutdown", fleet.stop)
    progress = Progress(fleet, reactor, stderr) if stderr.isatty() else None
    if progress:
        progress.start()
    try:
        summary = await fleet.run()
    except SimulatorError as error:
        raise CommandError(f"cannot connect to {_address(args)}: {error}") from None
    finally:
        if progress:
            progress.stop()
        if stop_at is not None and stop_at.active():
            stop_at.cancel()
        reactor.removeSystemEventTrigger(interrupted)
    stdout.write(json.dumps(summary) + "\n" if args.json else summary_text(summary))
    return 0


async def _replay(reactor, args, endpoint, stdout: IO[str]) -> int:
    from .simulator import SimulatorError, describe_answer, replay

    frames = capture_frames(_read_source(args.replay, sys.stdin.buffer))
    try:
        answers, committed, problem = await replay(
            reactor, endpoint, frames, args.serial_base, args.timeout
        )
    except SimulatorError as error:
        raise CommandError(f"cannot connect to {_address(args)}: {error}") from None
    for frame in answers:
        stdout.write(describe_answer(frame) + "\n")
    if problem:
        stdout.write(f"{problem}\n")
    return 0 if committed else 1


def _address(args) -> str:
    host, port = args.address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _simulate_in_reactor(args, stdout: IO[str], stderr: IO[str]) -> int:
    from twisted.internet import reactor

    from .simulator import SimulatorError

    if not args.replay:
        _raise_fd_limit(args.devices)
    outcome: list[int] = []

    async def run() -> None:
        try:
            outcome.append(await simulate(reactor, args, stdout, stderr))
        except (CommandError, SimulatorError) as error:
            stderr.write(f"oemrelay simulate: {error}\n")
            outcome.append(1)
        except Exception as error:  # a bug: still one line, with its kind
            stderr.write(f"oemrelay simulate: internal error: {type(error).__name__}: {error}\n")
            outcome.append(1)
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    reactor.run()
    return outcome[0] if outcome else 1


# -- entry point --------------------------------------------------------------------------


def run(
    argv: Sequence[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[bytes] | None = None,
) -> int:
    """Run one ``oemrelay`` command; its exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    stdin = stdin or sys.stdin.buffer
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as error:
        stderr.write(f"{error}\n")
        return 2
    try:
        if args.command == "decode":
            return _decode(args, stdout, stdin)
        if args.command == "check-config":
            return _check_config(args, stdout)
    except CommandError as error:
        stderr.write(f"oemrelay {args.command}: {error}\n")
        return 1
    return _simulate_in_reactor(args, stdout, stderr)


def main() -> None:
    """The console script."""
    raise SystemExit(run())


if __name__ == "__main__":
    main()
