"""
One-line text for log lines and error reasons.

Exception texts (libpq's, OpenSSL's, a refusing end server's) may span lines;
a log line or a reason the relay reports must not.
"""

from __future__ import annotations


def one_line(value: object) -> str:
    """``str(value)`` with every run of white space, newlines included, made one space."""
    return " ".join(str(value).split())
