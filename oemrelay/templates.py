"""
Dynamic fields in connector settings: ``[SERIAL] [IMEI] [ICCID] [CUSTOM1]
[CUSTOM2] [CUSTOM3]``, as in OEM Server's connector configuration.

Only these six words are placeholders; any other bracketed text (an IPv6
literal in a URL, say) is left as written.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote

from .codec import Hello

if TYPE_CHECKING:  # the relay imports the configuration, which imports this
    from .relay import DeviceProfile

PLACEHOLDERS = ("SERIAL", "IMEI", "ICCID", "CUSTOM1", "CUSTOM2", "CUSTOM3")
_PLACEHOLDER = re.compile(r"\[(" + "|".join(PLACEHOLDERS) + r")\]")


def device_fields(hello: Hello, profile: DeviceProfile) -> dict[str, str]:
    """The values of every placeholder for one device."""
    return {
        "SERIAL": str(hello.serial),
        "IMEI": hello.imei,
        "ICCID": hello.iccid,
        "CUSTOM1": profile.custom1,
        "CUSTOM2": profile.custom2,
        "CUSTOM3": profile.custom3,
    }


def has_placeholders(template: str) -> bool:
    """Whether ``template`` depends on the device."""
    return _PLACEHOLDER.search(template) is not None


@functools.lru_cache(maxsize=256)
def _parts(template: str) -> tuple[str, ...]:
    """
    ``template`` split once: its text, then each placeholder's name and the
    text after it (a template comes from the configuration and is expanded
    per upload; a regex substitution each time cost twice this).
    """
    return tuple(_PLACEHOLDER.split(template))


def expand(
    template: str,
    fields: Mapping[str, str],
    escape: Callable[[str], str] = str,
) -> str:
    """``template`` with each placeholder replaced by ``escape(value)``."""
    parts = _parts(template)
    if len(parts) == 1:
        return template
    expanded = list(parts)
    for index in range(1, len(parts), 2):
        expanded[index] = escape(fields[parts[index]])
    return "".join(expanded)


def expand_url(template: str, fields: Mapping[str, str]) -> str:
    """A URL template expanded with every substituted value percent-encoded."""
    return expand(template, fields, lambda value: quote(value, safe=""))
