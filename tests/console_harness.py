"""
The console's browser harness, shared by the browser tests and the
screenshot command: a real ``twistd oemrelay`` daemon (SQLite registry, an
HTTP connector posting to a loopback end server at ``/dm/[CUSTOM1]``), blocking
scripted devices speaking the DM protocol, and Debian's Chromium driven
headless by Playwright.

Everything is on loopback.  No reactor runs in the test process: the daemon
is a subprocess, the end server a thread, Playwright's sync API its own loop.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from oemrelay.codec import (
    DebugText,
    Frame,
    FrameDecoder,
    MessageType,
    Record,
    encode_frame,
    seconds_since_2013,
)
from oemrelay.simulator import DeviceTrack, records_frames, simulated_hello

PROJECT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
TOKEN = "console-test-token-5d1f0c"
HOSTILE_TRACE = "<img src=x onerror=alert(1)>"


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_until(check, what: str, timeout: float = 10.0, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class EndServer:
    """An HTTP end server in a thread: answers ``status`` (200) and keeps each POST's path and JSON."""

    def __init__(self) -> None:
        posts = self.posts = []
        end_server = self
        self.status = 200

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                posts.append((self.path, json.loads(body)))
                self.send_response(end_server.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Device:
    """A scripted device on a blocking socket: hello, uploads, async sessions."""

    def __init__(self, port: int, serial: int) -> None:
        self.serial = serial
        self.track = DeviceTrack(serial)
        self.seq = 1000
        self._decoder = FrameDecoder()
        self._frames: list[Frame] = []
        self._socket = socket.create_connection((LOOPBACK, port), timeout=10)
        self._socket.sendall(simulated_hello(serial).to_frame())
        self.expect(MessageType.HELLO_RESPONSE)

    def expect(self, message_type: int, timeout: float = 10.0) -> Frame:
        """The next frame from the relay, which must be of ``message_type``."""
        self._socket.settimeout(timeout)
        while not self._frames:
            data = self._socket.recv(65536)
            if not data:
                raise AssertionError("the relay closed the connection")
            self._frames.extend(self._decoder.feed(data))
        frame = self._frames.pop(0)
        if frame.type != message_type:
            raise AssertionError(f"expected type 0x{message_type:02x}, got 0x{frame.type:02x}")
        return frame

    def upload(self, records: int = 2, trace: str | None = None) -> list[int]:
        """Send records (a trace line first, if given) and a commit request; wait for the commit."""
        now = seconds_since_2013(time.time())
        batch = []
        if trace is not None:
            batch.append(Record(self.seq, now, 21, (DebugText(1, trace.encode("utf-8")),)))
            self.seq += 1
        for _ in range(records):
            batch.append(self.track.record(self.seq, now))
            self.seq += 1
        self._socket.sendall(records_frames(batch) + encode_frame(MessageType.COMMIT_REQUEST))
        answer = self.expect(MessageType.COMMIT_RESPONSE)
        if answer.payload != b"\x01":
            raise AssertionError(f"commit refused: {answer.payload.hex()}")
        return [record.seq for record in batch]

    def async_session(self, status: int = 1) -> list[int]:
        """Ask for commands (0x22) and answer each 0x20 with ``status``; their ids."""
        self._socket.sendall(encode_frame(MessageType.ASYNC_SESSION_REQUEST))
        answered = []
        while True:
            self._socket.settimeout(10)
            while not self._frames:
                self._frames.extend(self._decoder.feed(self._socket.recv(65536)))
            frame = self._frames.pop(0)
            if frame.type == MessageType.ASYNC_SESSION_COMPLETE:
                return answered
            if frame.type != MessageType.ASYNC_MESSAGE:
                raise AssertionError(f"unexpected type 0x{frame.type:02x} in an async session")
            message_id = int.from_bytes(frame.payload[:4], "little")
            answered.append(message_id)
            self._socket.sendall(
                encode_frame(
                    MessageType.ASYNC_RESPONSE, message_id.to_bytes(4, "little") + bytes([status])
                )
            )

    def close(self) -> None:
        self._socket.close()


class Relay:
    """The real daemon in a subprocess, with an API on a loopback port."""

    def __init__(self, directory: str, end_server: EndServer, relay_keys: str = "") -> None:
        self.directory = directory
        self.device_port, self.api_port = unused_port(), unused_port()
        self.registry_path = os.path.join(directory, "registry.sqlite")
        config = os.path.join(directory, "relay.ini")
        with open(config, "w") as f:
            f.write(
                f"""\
[relay]
listen = tcp:{self.device_port}:interface={LOOPBACK}
connector = main
commit_timeout = 5
registry = sqlite:{self.registry_path}
{relay_keys}

[api]
listen = tcp:{self.api_port}:interface={LOOPBACK}
token = {TOKEN}

[connector:main]
type = http
url = http://{LOOPBACK}:{end_server.port}/dm/[CUSTOM1]
timeout = 5
"""
            )
        self.log_path = os.path.join(directory, "relay.log")
        self._log = open(self.log_path, "wb")
        environment = {**os.environ, "PYTHONPATH": str(PROJECT)}
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "--nodaemon", "--pidfile=", "oemrelay", "-c", config],
            stdout=self._log, stderr=subprocess.STDOUT, env=environment, cwd=directory,
        )
        wait_until(self._ready, "the relay's API", timeout=30, every=0.1)

    @property
    def console_url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}/console/"

    def _ready(self) -> bool:
        if self._process.poll() is not None:
            raise AssertionError(f"the relay exited: {self.output()}")
        try:
            self.api("GET", "/api/fleet")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One API call with the token; the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.api_port}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def connect(self, serial: int) -> Device:
        """A device connected and said hello, once the registry shows it connected."""
        device = Device(self.device_port, serial)
        wait_until(lambda: self._shown_connected(serial), "the hello")
        return device

    def _shown_connected(self, serial: int) -> bool:
        # The relay writes connections to the registry once a second: a new
        # device is unknown (404) until then.
        try:
            return self.api("GET", f"/api/devices/{serial}")["connected"]
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return False
            raise

    def output(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


def fill_registry(path: str, count: int, start: int = 1_000_000) -> None:
    """Insert ``count`` devices straight into the registry's SQLite file, in one transaction."""
    import sqlite3

    with sqlite3.connect(path, timeout=30) as database:
        database.executemany(
            "INSERT INTO devices (serial, imei, iccid, custom1, custom2, last_seen)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                (serial, f"35{serial:013d}", f"89{serial:018d}", f"key-{serial}",
                 f"depot-{serial % 97}", 1.7e9 + serial)
                for serial in range(start, start + count)
            ),
        )
    database.close()


def launch_browser(playwright):
    """Chromium, headless, as Debian ships it."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def sign_in(page, relay: Relay, token: str = TOKEN) -> None:
    page.goto(relay.console_url)
    page.fill("#token", token)
    page.click("#signin-form button")
