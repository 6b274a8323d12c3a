"""
The operator console in a real browser: Playwright driving Debian's Chromium
headless against the real daemon, with scripted devices (see
:mod:`tests.console_harness`).

Without Playwright or Chromium these tests skip with a message, unless
``CI`` is set (``.ci/run`` installs both): there they fail, so CI never
passes without running them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .console_harness import (
    HOSTILE_TRACE,
    PROJECT,
    TOKEN,
    EndServer,
    Relay,
    fill_registry,
    launch_browser,
    sign_in,
    wait_until,
)

SERIAL = 424242


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        raise AssertionError(f"the browser tests cannot run in CI: {reason}")
    raise SkipTest(f"{reason}; install chromium (apt) and playwright (pip) to run them")


class _BrowserTestCase(SynchronousTestCase):
    """A relay, an end server and a signed-out browser page, per test."""

    #: Extra [relay] keys for the relay under test.
    relay_keys = ""

    def setUp(self) -> None:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            _unavailable("Playwright is not installed")
        self.end_server = EndServer()
        self.addCleanup(self.end_server.close)
        self.relay = Relay(self.mktemp_dir(), self.end_server, self.relay_keys)
        self.addCleanup(self.relay.stop)
        self.playwright = sync_playwright().start()
        self.addCleanup(self.playwright.stop)
        try:
            self.browser = launch_browser(self.playwright)
        except Exception as error:
            _unavailable(f"Chromium did not start: {str(error).splitlines()[0]}")
        self.addCleanup(self.browser.close)
        self.context = self.browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.dialogs: list[str] = []
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.console_errors: list[str] = []
        self.page.on(
            "console",
            lambda message: message.type == "error" and self.console_errors.append(message.text),
        )
        self.addCleanup(self.assert_token_not_logged)
        self.addCleanup(self.assert_no_policy_violation)

    def assert_no_policy_violation(self) -> None:
        """The page did nothing its Content-Security-Policy refused."""
        self.assertEqual(
            [text for text in self.console_errors if "Content Security Policy" in text], []
        )

    def mktemp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def assert_token_not_logged(self) -> None:
        self.assertNotIn(TOKEN, self.relay.output())

    def open_device(self, serial: int) -> None:
        self.page.goto(self.relay.console_url + f"#device/{serial}")
        self.page.wait_for_selector("#identity")


class SignInTests(_BrowserTestCase):
    """Signing in."""

    def test_wrong_token_then_right(self) -> None:
        """A wrong token says so; the right one shows the fleet; the token is in no URL."""
        requested: list[str] = []
        self.page.on("request", lambda request: requested.append(request.url))
        sign_in(self.page, self.relay, "not-the-token")
        self.page.wait_for_selector("#signin-error:has-text('wrong token')")
        sign_in(self.page, self.relay)
        self.page.wait_for_selector("#fleet-connected")
        self.assertTrue(self.page.is_visible("#nav"))
        self.assertTrue(requested)
        for url in requested:
            self.assertNotIn(TOKEN, url)
        stored = self.page.evaluate("sessionStorage.getItem('oemrelay.token')")
        self.assertEqual(stored, TOKEN)
        self.assertEqual(self.page.evaluate("localStorage.length"), 0)


class DeviceTests(_BrowserTestCase):
    """Finding, editing and commanding one device."""

    def setUp(self) -> None:
        super().setUp()
        self.relay.api("PUT", f"/api/devices/{SERIAL}", {"custom1": "old-key", "custom2": "depot-north"})
        sign_in(self.page, self.relay)
        self.page.wait_for_selector("#fleet-connected")

    def test_find_by_custom_field_edit_and_next_upload_uses_it(self) -> None:
        """Search by custom2 finds the device; custom1 saved on its page is in the next upload's URL."""
        self.page.click("nav a[href='#devices']")
        self.page.fill("#search", "depot-no")
        self.page.click("#search-go")
        self.page.wait_for_selector(f"#devices tr[data-serial='{SERIAL}']")
        self.assertEqual(self.page.locator("#devices tbody tr").count(), 1)
        self.page.click(f"#devices a[href='#device/{SERIAL}']")
        self.page.wait_for_selector("#field-custom1")
        self.page.fill("#field-custom1", "new-key")
        self.page.click("#fields-save")
        self.page.wait_for_selector("#fields-status:has-text('saved')")
        device = self.relay.connect(SERIAL)
        self.addCleanup(device.close)
        sent = device.upload()
        path, document = self.end_server.posts[-1]
        self.assertEqual(path, "/dm/new-key")
        self.assertEqual([r["SeqNo"] for r in document["Records"]], sent)

    def test_invalid_field_refused_as_the_api_does(self) -> None:
        """An unknown connector is refused on the page with the API's message."""
        self.open_device(SERIAL)
        self.page.fill("#field-connector", "nowhere")
        self.page.click("#fields-save")
        self.page.wait_for_selector("#fields-status:has-text(\"unknown connector 'nowhere'\")")

    def test_command_queued_and_delivered(self) -> None:
        """A command queued from the form is delivered in the device's next async session."""
        device = self.relay.connect(SERIAL)
        self.addCleanup(device.close)
        self.open_device(SERIAL)
        self.page.select_option("#command-type", "set_odometer")
        self.page.fill("#command-form input[name='metres']", "12340")
        self.page.click("#command-send")
        self.page.wait_for_selector("#command-status:has-text('queued as command')")
        self.assertEqual(len(device.async_session(status=1)), 1)
        self.page.wait_for_selector("#commands .command-status:has-text('delivered')")


class LiveViewTests(_BrowserTestCase):
    """The live view and recordings."""

    def setUp(self) -> None:
        super().setUp()
        sign_in(self.page, self.relay)
        self.page.wait_for_selector("#fleet-connected")
        self.device = self.relay.connect(SERIAL)
        self.addCleanup(self.device.close)
        self.open_device(SERIAL)

    def watch(self) -> None:
        self.page.click("#live-start")
        self.page.wait_for_selector("#live-state:has-text('watching')")

    def test_upload_appears_within_a_second(self) -> None:
        """An upload and its commit show in the live view less than a second after it is sent."""
        self.watch()
        started = time.monotonic()
        sent = self.device.upload(records=3)
        self.page.wait_for_selector("#live-events li[data-kind='commit']", timeout=1000)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 1.0)
        upload_text = self.page.text_content("#live-events li[data-kind='upload']")
        self.assertIn(f"3 records from seq {sent[0]}", upload_text)
        self.assertIn('"SerNo": 424242', upload_text)

    def test_hostile_trace_shown_as_text(self) -> None:
        """A trace line holding markup is shown as those characters; no element made, no script run."""
        self.watch()
        self.device.upload(records=1, trace=HOSTILE_TRACE)
        trace = self.page.wait_for_selector("#live-events li[data-kind='trace']")
        self.assertIn(HOSTILE_TRACE, trace.text_content())
        self.assertEqual(self.page.locator("#live-events img").count(), 0)
        self.assertEqual(self.page.locator("img").count(), 0)
        time.sleep(0.2)
        self.assertEqual(self.dialogs, [])

    def test_record_and_decode_download(self) -> None:
        """A recording made from the page downloads as a capture oemrelay decode reads."""
        self.page.fill("#record-minutes", "2")
        self.page.click("#record")
        self.page.wait_for_selector("#record-status:has-text('recording 1')")
        sent = self.device.upload(records=2)
        self.page.click("nav a[href='#recordings']")
        self.page.wait_for_selector("#recordings tr[data-recording='1']")
        with self.page.expect_download() as download_info:
            self.page.click("#recordings tr[data-recording='1'] button.download")
        path = download_info.value.path()
        decoded = subprocess.run(
            [sys.executable, "-m", "oemrelay.cli", "decode", str(path)],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "PYTHONPATH": str(PROJECT)},
        )
        self.assertEqual(decoded.returncode, 0, decoded.stderr)
        import json

        (document,) = [json.loads(line) for line in decoded.stdout.splitlines()]
        self.assertEqual(document["SerNo"], SERIAL)
        self.assertEqual([r["SeqNo"] for r in document["Records"]], sent)


class LargeFleetTests(_BrowserTestCase):
    """The device list at 100,000 devices."""

    def test_search_under_a_second(self) -> None:
        """With 100,000 registry rows a search by custom field shows its device in under a second."""
        fill_registry(self.relay.registry_path, 100_000)
        sign_in(self.page, self.relay)
        self.page.wait_for_selector("#fleet-connected")
        self.page.click("nav a[href='#devices']")
        self.page.wait_for_selector("#devices-status:has-text('shown')")
        self.page.fill("#search", "key-1054321")
        started = time.monotonic()
        self.page.click("#search-go")
        self.page.wait_for_selector("#devices tr[data-serial='1054321']", timeout=1000)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(self.page.locator("#devices tbody tr").count(), 1)
        # Sorted by last seen, the newest of the 100,000 comes first.
        self.page.fill("#search", "")
        self.page.select_option("#sort", "last_seen")
        wait_until(
            lambda: self.page.text_content("#devices tbody tr:first-child td:first-child") == "1099999",
            "the last-seen sort",
        )


class DeadLetterTests(_BrowserTestCase):
    """The dead letters page, against the relay's real spool (commit_policy = spooled, an end server refusing with 400)."""

    relay_keys = "commit_policy = spooled"

    def setUp(self) -> None:
        super().setUp()
        self.end_server.status = 400
        device = self.relay.connect(SERIAL)
        self.addCleanup(device.close)
        self.first_seqs = [device.upload(records=1, trace=HOSTILE_TRACE if n == 0 else None)[0] for n in range(3)]
        wait_until(lambda: len(self.relay.api("GET", "/api/deadletters")["deadletters"]) == 3, "three dead letters")
        sign_in(self.page, self.relay)
        self.page.wait_for_selector("#fleet-connected")

    def test_retry_discard_and_bulk(self) -> None:
        """A retry once the end server accepts delivers the upload; a bulk discard removes the rest; reasons are text."""
        self.page.click("nav a[href='#deadletters']")
        self.page.wait_for_selector("#deadletters tbody tr")
        self.assertIn("answered 400", self.page.text_content("#deadletters"))
        self.assertEqual(self.page.locator("#deadletters img").count(), 0)
        self.assertEqual(self.page.locator("#deadletters tbody tr").count(), 3)
        self.end_server.status = 200
        refused = len(self.end_server.posts)
        self.page.click("#deadletters tbody tr:first-child button:has-text('Retry')")
        self.page.wait_for_selector("#deadletters-status:has-text('1 done')")
        wait_until(lambda: len(self.end_server.posts) > refused, "the retried upload delivered")
        self.page.click("nav a[href='#deadletters']")
        self.page.wait_for_selector("#deadletters tbody tr")
        remaining = self.page.locator("#deadletters input[data-id]")
        wait_until(lambda: remaining.count() == 2, "two dead letters left")
        for index in range(2):
            remaining.nth(index).check()
        self.page.click("button:has-text('Discard selected')")
        self.page.wait_for_selector("#deadletters-none:has-text('no dead letters')")
        self.assertEqual(self.relay.api("GET", "/api/deadletters")["deadletters"], [])


class UnavailableBrowserTests(SynchronousTestCase):
    """What a missing browser does to these tests."""

    def test_fails_under_ci(self) -> None:
        """With CI set a missing browser is a failure, not a skip."""
        self.patch(os, "environ", {**os.environ, "CI": "true"})
        with self.assertRaises(AssertionError):
            _unavailable("Chromium did not start")

    def test_skips_locally(self) -> None:
        """Without CI a missing browser skips, saying what to install."""
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CI"})
        with self.assertRaises(SkipTest) as caught:
            _unavailable("Playwright is not installed")
        self.assertIn("pip", str(caught.exception))
