"""
Tests of ``etc/oemrelay.service`` and ``etc/oemrelay.socket``.

systemd's own tools judge the units: ``systemd-analyze verify`` must accept
both without a word and ``systemd-analyze security --offline=yes`` must rate
the service's exposure at 2.0 or better; ``systemd-socket-activate`` hands the
relay a socket the way ``oemrelay.socket`` does.  Where those tools are not
installed (``apt-get install systemd``; ``.ci/run`` installs it) those tests
are skipped with a message saying so.  The units' own consistency (the
socket matches the documented ``systemd:`` listen example, the state directory
is the working directory) is checked everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from ipaddress import IPv4Address
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from oemrelay.codec import MessageType

from .test_end_to_end import (
    DART_HELLO,
    LOOPBACK,
    REPLY_TIMEOUT,
    _Daemon,
    _RelayTestCase,
    twistd_command,
    unused_port,
)

PROJECT = Path(__file__).resolve().parent.parent
SERVICE = PROJECT / "etc" / "oemrelay.service"
SOCKET = PROJECT / "etc" / "oemrelay.socket"

#: The worst overall exposure ``systemd-analyze security`` may give the service.
MAX_EXPOSURE = 2.0

#: Seconds any systemd tool may take.
TOOL_TIMEOUT = 60

#: The socket-activated listen example of docs/configuration.rst, which oemrelay.socket serves.
DOCS_SYSTEMD_LISTEN = "systemd:domain=INET:index=0"

_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def systemd_tool(name: str) -> str:
    """
    The path of systemd's ``name`` tool.

    :raises SkipTest: if it is not installed.
    """
    path = shutil.which(name)
    if path is None:
        raise SkipTest(f"{name} is not installed (apt-get install systemd; .ci/run does)")
    return path


def unit_settings(path: Path) -> list[tuple[str, str, str]]:
    """Every ``(section, key, value)`` of a unit file in order; keys may repeat."""
    settings = []
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def values(path: Path, section: str, key: str) -> list[str]:
    """The values ``key`` has in ``section`` of the unit at ``path``."""
    return [v for s, k, v in unit_settings(path) if (s, k) == (section, key)]


def exposure(unit: Path) -> float:
    """The overall exposure ``systemd-analyze security --offline=yes`` gives ``unit``."""
    result = subprocess.run(
        [systemd_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )
    found = _EXPOSURE.search(result.stdout)
    if found is None:
        raise AssertionError(f"no exposure level in: {result.stdout[-2000:]}{result.stderr}")
    return float(found.group(1))


def verify(*units: Path) -> tuple[int, str]:
    """
    ``systemd-analyze verify`` of copies of ``units`` whose ``ExecStart``
    program exists (verify refuses a missing one): its exit status and output.
    """
    analyze = systemd_tool("systemd-analyze")
    with tempfile.TemporaryDirectory() as directory:
        program = Path(directory, "twistd")
        program.write_text("#!/bin/sh\n", encoding="utf-8")
        program.chmod(0o755)
        copies = []
        for unit in units:
            copy = Path(directory, unit.name)
            text = unit.read_text(encoding="utf-8")
            copy.write_text(text.replace("/opt/oemrelay/bin/twistd", str(program)), encoding="utf-8")
            copies.append(str(copy))
        result = subprocess.run(
            [analyze, "verify", *copies], capture_output=True, text=True, timeout=TOOL_TIMEOUT
        )
    return result.returncode, (result.stdout + result.stderr).replace(directory, "<dir>")


class SystemdAnalyzeTests(SynchronousTestCase):
    """systemd's own judgement of the units."""

    def test_service_exposure_at_most_two(self) -> None:
        """systemd-analyze security rates oemrelay.service at 2.0 or better."""
        self.assertLessEqual(exposure(SERVICE), MAX_EXPOSURE)

    def test_unhardened_service_exposure_above_two(self) -> None:
        """The same service without its hardening is rated above 2.0, so the check can fail."""
        with tempfile.TemporaryDirectory() as directory:
            bare = Path(directory, "oemrelay.service")
            bare.write_text(
                "[Service]\nUser=oemrelay\nExecStart=/opt/oemrelay/bin/twistd -n oemrelay\n",
                encoding="utf-8",
            )
            self.assertGreater(exposure(bare), MAX_EXPOSURE)

    def test_units_verify_without_a_word(self) -> None:
        """systemd-analyze verify accepts the socket and the service and prints nothing."""
        self.assertEqual(verify(SOCKET, SERVICE), (0, ""))

    def test_verify_reports_unknown_keys(self) -> None:
        """A misspelt key makes verify print a line, so silence means every key is known."""
        with tempfile.TemporaryDirectory() as directory:
            unit = Path(directory, "oemrelay.service")
            unit.write_text(
                SERVICE.read_text(encoding="utf-8").replace("LockPersonality=", "LockPersonalty="),
                encoding="utf-8",
            )
            _, output = verify(unit)
        self.assertIn("Unknown key 'LockPersonalty'", output)


class UnitConsistencyTests(SynchronousTestCase):
    """The units agree with each other, the docs and twistd."""

    def test_socket_serves_the_documented_listen_example(self) -> None:
        """The documented listen example is systemd:domain=INET:index=0 and the socket opens exactly one IPv4 stream."""
        self.assertIn(DOCS_SYSTEMD_LISTEN, (PROJECT / "docs" / "configuration.rst").read_text(encoding="utf-8"))
        listens = [(k, v) for s, k, v in unit_settings(SOCKET) if s == "Socket" and k.startswith("Listen")]
        self.assertEqual(len(listens), 1, listens)  # index=0 is the only descriptor
        key, address = listens[0]
        self.assertEqual(key, "ListenStream")
        host, _, port = address.rpartition(":")
        IPv4Address(host)  # domain=INET: an IPv4 address, not a dual-stack port
        self.assertTrue(0 < int(port) < 65536, port)

    def test_socket_activates_the_service(self) -> None:
        """oemrelay.socket hands its port to oemrelay.service."""
        self.assertEqual(values(SOCKET, "Socket", "Service"), [SERVICE.name])

    def test_twistd_stays_in_the_foreground_without_pidfile(self) -> None:
        """ExecStart runs twistd --nodaemon --pidfile= oemrelay with /etc/oemrelay/relay.ini."""
        (command,) = values(SERVICE, "Service", "ExecStart")
        self.assertEqual(
            command.split()[1:],
            ["--nodaemon", "--pidfile=", "oemrelay", "-c", "/etc/oemrelay/relay.ini"],
        )

    def test_working_directory_is_the_state_directory(self) -> None:
        """Relative paths in relay.ini land in the one writable directory, /var/lib/<StateDirectory>."""
        (state,) = values(SERVICE, "Service", "StateDirectory")
        self.assertEqual(values(SERVICE, "Service", "WorkingDirectory"), [f"/var/lib/{state}"])
        self.assertEqual(values(SERVICE, "Service", "ProtectSystem"), ["strict"])

    def test_no_start_step_as_the_service_user(self) -> None:
        """No ExecStartPre: the plugin cache is regenerated at install, by root (docs/deployment.rst)."""
        self.assertEqual(values(SERVICE, "Service", "ExecStartPre"), [])


class SocketActivationEndToEndTests(_RelayTestCase):
    """The relay on a socket handed over as oemrelay.socket hands it."""

    async def test_device_served_on_handed_over_socket(self) -> None:
        """With listen = systemd:domain=INET:index=0 the relay answers a device on the inherited socket."""
        activate = systemd_tool("systemd-socket-activate")
        port = unused_port()
        config = self.write_config(
            f"[relay]\nlisten = {DOCS_SYSTEMD_LISTEN}\n\n"
            "[connector:main]\ntype = file\npath = uploads.jsonl\n"
        )
        self.daemon = _Daemon()
        # systemd-socket-activate listens, then on the first connection execs
        # twistd (same process) with LISTEN_FDS=1, LISTEN_PID and, as systemd
        # sets it for a socket unit, LISTEN_FDNAMES (Twisted ignores
        # descriptors without names), and only the environment it is told to
        # pass on.
        passed_on = [f"--setenv={name}" for name in ("PATH", "PYTHONPATH") if name in os.environ]
        passed_on.append("--setenv=PYTHONUNBUFFERED=1")
        command = [activate, f"--listen={LOOPBACK}:{port}", f"--fdname={SOCKET.name}", *passed_on, "--", *twistd_command(config)]
        transport = self.reactor.spawnProcess(
            self.daemon,
            activate,
            command,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            path=os.path.dirname(config),
        )
        self.addCleanup(self._stop_daemon, self.daemon, transport)
        await self.wait_until(
            lambda: b"Listening on" in self.daemon.output or self.daemon.ended,
            "systemd-socket-activate to listen",
        )
        device = await self.connect_device(port)
        device.send(DART_HELLO)
        await self.wait_until(
            lambda: device.got(MessageType.HELLO_RESPONSE), "the hello answer", REPLY_TIMEOUT
        )
        self.assert_hello_response(device)
        self.assertIn(f"DeviceFactory starting on {port}".encode(), self.daemon.output)
