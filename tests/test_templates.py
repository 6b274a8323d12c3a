"""
Tests for :mod:`oemrelay.templates`: the ``[SERIAL]``-style dynamic fields of
connector settings.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from oemrelay.codec import Hello
from oemrelay.relay import DeviceProfile
from oemrelay.templates import (
    PLACEHOLDERS,
    device_fields,
    expand,
    expand_url,
    has_placeholders,
)

HELLO = Hello(129336, "353323081669730", "89610185001824844630", 34, 2, 1, 9)
PROFILE = DeviceProfile("one", "two", "three")
FIELDS = device_fields(HELLO, PROFILE)


class DeviceFieldsTests(SynchronousTestCase):
    """:func:`device_fields` maps every placeholder to the device's value."""

    def test_values(self) -> None:
        """Serial, IMEI and ICCID come from the hello, CUSTOM1..3 from the profile."""
        self.assertEqual(
            FIELDS,
            {
                "SERIAL": "129336",
                "IMEI": "353323081669730",
                "ICCID": "89610185001824844630",
                "CUSTOM1": "one",
                "CUSTOM2": "two",
                "CUSTOM3": "three",
            },
        )

    def test_every_placeholder(self) -> None:
        """Every placeholder word has a value, and nothing else does."""
        self.assertEqual(set(FIELDS), set(PLACEHOLDERS))

    def test_empty_profile(self) -> None:
        """A device without a profile has empty custom fields."""
        fields = device_fields(HELLO, DeviceProfile())
        self.assertEqual(
            (fields["CUSTOM1"], fields["CUSTOM2"], fields["CUSTOM3"]), ("", "", "")
        )

    def test_values_are_text(self) -> None:
        """The serial, an integer in the hello, is given as decimal text."""
        self.assertIsInstance(FIELDS["SERIAL"], str)


class HasPlaceholdersTests(SynchronousTestCase):
    """:func:`has_placeholders` tells device-dependent templates apart."""

    def test_each_placeholder(self) -> None:
        """Each of the six words in brackets is a placeholder."""
        for word in PLACEHOLDERS:
            self.assertTrue(has_placeholders(f"https://h/x/[{word}]"), word)

    def test_plain(self) -> None:
        """Text without brackets has no placeholders."""
        self.assertFalse(has_placeholders("https://example.com/dm"))

    def test_other_brackets(self) -> None:
        """Bracketed text that is not one of the six words is no placeholder."""
        self.assertFalse(has_placeholders("http://[::1]:8080/[serial]/[FOO]/[SERIAL"))

    def test_lowercase(self) -> None:
        """Placeholders are upper case only, as in OEM Server."""
        self.assertFalse(has_placeholders("[imei]"))


class ExpandTests(SynchronousTestCase):
    """:func:`expand` substitutes placeholders verbatim (for headers and credentials)."""

    def test_all(self) -> None:
        """Every placeholder is replaced by its value."""
        self.assertEqual(
            expand("[SERIAL]|[IMEI]|[ICCID]|[CUSTOM1]|[CUSTOM2]|[CUSTOM3]", FIELDS),
            "129336|353323081669730|89610185001824844630|one|two|three",
        )

    def test_repeated(self) -> None:
        """A placeholder used twice is replaced twice."""
        self.assertEqual(expand("[SERIAL]-[SERIAL]", FIELDS), "129336-129336")

    def test_adjacent_and_at_the_ends(self) -> None:
        """Placeholders side by side, first and last, keep the text between them."""
        self.assertEqual(expand("[SERIAL][CUSTOM1]/x/[CUSTOM2]", FIELDS), "129336one/x/two")

    def test_same_template_other_device(self) -> None:
        """A template expanded for one device expands afresh for the next (it is split once, not its result kept)."""
        self.assertEqual(expand("d/[SERIAL]", FIELDS), "d/129336")
        self.assertEqual(expand("d/[SERIAL]", dict(FIELDS, SERIAL="7")), "d/7")

    def test_verbatim(self) -> None:
        """Without an escape function values are inserted as they are."""
        fields = dict(FIELDS, CUSTOM1="a/b c&d")
        self.assertEqual(expand("Bearer [CUSTOM1]", fields), "Bearer a/b c&d")

    def test_no_placeholders(self) -> None:
        """A template without placeholders comes back unchanged."""
        self.assertEqual(expand("X-Static: 1", FIELDS), "X-Static: 1")

    def test_not_recursive(self) -> None:
        """A value that looks like a placeholder is not expanded again."""
        fields = dict(FIELDS, CUSTOM1="[SERIAL]")
        self.assertEqual(expand("[CUSTOM1]", fields), "[SERIAL]")

    def test_other_brackets_untouched(self) -> None:
        """Bracketed text that is not a placeholder is left as written."""
        self.assertEqual(expand("[Serial] [X] [] [[IMEI]]", FIELDS), "[Serial] [X] [] [353323081669730]")

    def test_escape(self) -> None:
        """The escape function is applied to substituted values only."""
        self.assertEqual(expand("<[CUSTOM2]>", FIELDS, str.upper), "<TWO>")


class ExpandUrlTests(SynchronousTestCase):
    """:func:`expand_url` percent-encodes every substituted value."""

    def test_plain_values(self) -> None:
        """Digits and letters are inserted unchanged."""
        self.assertEqual(
            expand_url("https://example.com/dm/[SERIAL]?imei=[IMEI]", FIELDS),
            "https://example.com/dm/129336?imei=353323081669730",
        )

    def test_reserved_characters(self) -> None:
        """'/', '?', '&', '=', '#', '%' and spaces in a value are percent-encoded."""
        fields = dict(FIELDS, CUSTOM1="a/b?c&d=e f#g%h")
        self.assertEqual(
            expand_url("https://example.com/x/[CUSTOM1]?k=[CUSTOM1]", fields),
            "https://example.com/x/a%2Fb%3Fc%26d%3De%20f%23g%25h"
            "?k=a%2Fb%3Fc%26d%3De%20f%23g%25h",
        )

    def test_non_ascii(self) -> None:
        """Non-ASCII text is encoded as UTF-8 percent escapes."""
        fields = dict(FIELDS, CUSTOM3="é")
        self.assertEqual(expand_url("http://h/[CUSTOM3]", fields), "http://h/%C3%A9")

    def test_template_text_untouched(self) -> None:
        """The template's own characters are not encoded, only the values."""
        self.assertEqual(
            expand_url("http://h/a b/[SERIAL]?x=1&y=2", FIELDS),
            "http://h/a b/129336?x=1&y=2",
        )

    def test_ipv6_literal(self) -> None:
        """An IPv6 literal host such as http://[::1]:8080/ is untouched."""
        self.assertEqual(
            expand_url("http://[::1]:8080/dm/[SERIAL]", FIELDS),
            "http://[::1]:8080/dm/129336",
        )
