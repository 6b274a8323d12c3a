"""
End-to-end start-up failures: the real ``twistd oemrelay`` exits non-zero
with one clear line when a resource it needs cannot be had.
"""

from __future__ import annotations

from .test_end_to_end import LISTEN, START_TIMEOUT, _RelayTestCase, unused_port


class StartFailureEndToEndTests(_RelayTestCase):
    """A relay that cannot start exits with status 1, not 0, so systemd sees it fail."""

    async def test_registry_cannot_open(self) -> None:
        """A PostgreSQL registry on a closed loopback port: one critical line, status 1."""
        port = unused_port()
        path = self.write_config(
            f"[relay]\nlisten = {LISTEN}\n"
            f"registry = postgresql://relay:hunter2@127.0.0.1:{port}/oemrelay?connect_timeout=2\n\n"
            "[connector:main]\ntype = file\npath = uploads.jsonl\n"
        )
        daemon, _ = self.spawn_twistd(path)
        self.daemon = daemon
        await self.wait_until(lambda: daemon.ended, "twistd to exit", START_TIMEOUT)

        self.assertEqual(daemon.exit_code, 1)
        output = daemon.output.decode("utf-8", "replace")
        lines = [line for line in output.splitlines() if "cannot open registry" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(f"127.0.0.1:{port}", lines[0])
        self.assertNotIn("Traceback", output)
        self.assertNotIn("hunter2", output)
