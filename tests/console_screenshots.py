"""
Regenerate the screenshots in docs/console.rst: ``python -m tests.console_screenshots``
(from the project root, with Playwright and /usr/bin/chromium installed).

It starts the real daemon with a small simulated fleet (tests.console_harness),
signs in, and saves one PNG per page into docs/console/.
"""

from __future__ import annotations

import os
import sys
import tempfile

from .console_harness import HOSTILE_TRACE, PROJECT, EndServer, Relay, launch_browser, sign_in

OUTPUT = PROJECT / "docs" / "console"
SERIAL = 424242


def main() -> int:
    from playwright.sync_api import sync_playwright

    OUTPUT.mkdir(parents=True, exist_ok=True)
    end_server = EndServer()
    directory = tempfile.mkdtemp(prefix="oemrelay-screenshots-")
    relay = Relay(directory, end_server)
    devices = []
    try:
        for number, serial in enumerate((SERIAL, 424243, 424244)):
            relay.api("PUT", f"/api/devices/{serial}",
                      {"custom1": f"key-{serial}", "custom2": ("depot-north", "depot-south")[number % 2]})
        relay.api("PUT", "/api/devices/500001", {"custom1": "preloaded", "custom2": "spare"})
        for serial in (424243, 424244):
            devices.append(relay.connect(serial))
            devices[-1].upload(records=3)
        device = relay.connect(SERIAL)
        devices.append(device)
        relay.api("POST", f"/api/devices/{SERIAL}/commands", {"type": "set_odometer", "metres": 12340})
        with sync_playwright() as playwright:
            browser = launch_browser(playwright)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(relay.console_url)
            page.wait_for_selector("#token")
            page.screenshot(path=str(OUTPUT / "signin.png"))
            sign_in(page, relay)
            page.wait_for_selector("#fleet-connected")
            page.screenshot(path=str(OUTPUT / "fleet.png"))
            page.click("nav a[href='#devices']")
            page.wait_for_selector("#devices-status:has-text('shown')")
            page.fill("#search", "depot-")
            page.click("#search-go")
            page.wait_for_selector(f"#devices tr[data-serial='{SERIAL}']")
            page.screenshot(path=str(OUTPUT / "devices.png"))
            page.goto(relay.console_url + f"#device/{SERIAL}")
            page.wait_for_selector("#commands")
            page.click("#live-start")
            page.wait_for_selector("#live-state:has-text('watching')")
            page.fill("#record-minutes", "5")
            page.click("#record")
            page.wait_for_selector("#record-status:has-text('recording')")
            device.async_session(status=1)
            device.upload(records=2, trace=HOSTILE_TRACE)
            page.wait_for_selector("#live-events li[data-kind='commit']")
            page.wait_for_selector("#commands .command-status:has-text('delivered')")
            page.screenshot(path=str(OUTPUT / "device.png"), full_page=True)
            page.click("nav a[href='#recordings']")
            page.wait_for_selector("#recordings")
            page.screenshot(path=str(OUTPUT / "recordings.png"))
            page.click("nav a[href='#import']")
            page.fill("#csv", "serial,custom1,custom2,custom3,connector\n600001,a,b,c,\n600002,a,b,c,nowhere\n")
            page.click("#import-send")
            page.wait_for_selector("#import-result.error")
            page.screenshot(path=str(OUTPUT / "import.png"))
            page.click("nav a[href='#deadletters']")
            page.wait_for_selector("#deadletters-none, #deadletters")
            page.screenshot(path=str(OUTPUT / "deadletters.png"))
            browser.close()
    finally:
        for device in devices:
            device.close()
        relay.stop()
        end_server.close()
    for name in sorted(os.listdir(OUTPUT)):
        print(OUTPUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
