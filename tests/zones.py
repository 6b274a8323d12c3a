"""
Running a test under a time zone other than UTC.

Device times are UTC whatever the host's zone; the suite usually runs in UTC,
where a slip from ``gmtime`` to ``localtime`` would not show.
"""

from __future__ import annotations

import os
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

#: New Zealand time as a POSIX rule (UTC+12, +13 in summer), so it needs no
#: tzdata: a missing zone file would silently mean UTC.
AUCKLAND = "NZST-12NZDT,M9.5.0,M4.1.0/3"


def use_time_zone(case: SynchronousTestCase, zone: str = AUCKLAND) -> None:
    """Switch the process to ``zone`` until ``case`` ends."""
    if not hasattr(time, "tzset"):
        raise SkipTest("time.tzset is not available on this platform")
    before = os.environ.get("TZ")

    def restore() -> None:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()

    case.addCleanup(restore)
    os.environ["TZ"] = zone
    time.tzset()
    # A zone that did not take effect would let a localtime slip pass.
    case.assertNotEqual(time.timezone, 0, f"TZ={zone} left the process in UTC")
