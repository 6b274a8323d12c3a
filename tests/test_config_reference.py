"""
Tests for :mod:`oemrelay.config_reference`: docs/configuration.rst is the
text the schema gives, and the generator refuses pages that miss a section.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from oemrelay.config import SCHEMA, Key
from oemrelay.config_reference import key_list, main, regenerate

PAGE = Path(__file__).parent.parent / "docs" / "configuration.rst"

_SCHEMA = {
    "relay": {
        "listen": Key(str, "tcp:20500", "Where devices connect."),
        "node": Key(str, "", "This relay's name."),
    },
    "file": {"path": Key(str, None, "The file.")},
}

_PAGE = (
    "Intro.\n\n.. BEGIN keys relay\nstale\n.. END keys relay\n\n"
    "Middle.\n\n.. BEGIN keys file\n.. END keys file\nEnd.\n"
)


class CommittedPageTests(SynchronousTestCase):
    """The committed configuration reference."""

    def test_page_is_generated(self) -> None:
        """docs/configuration.rst equals its regeneration: no key is undocumented or stale."""
        text = PAGE.read_text(encoding="utf-8")
        self.assertEqual(
            regenerate(text),
            text,
            "run: python -m oemrelay.config_reference docs/configuration.rst",
        )

    def test_every_key_listed(self) -> None:
        """Every key of every section appears on the page as a term."""
        text = PAGE.read_text(encoding="utf-8")
        for section, keys in SCHEMA.items():
            for name in keys:
                self.assertIn(f"\n``{name}`` (", text, f"[{section}] {name}")


class RegenerateTests(SynchronousTestCase):
    """Rewriting the generated blocks."""

    def test_blocks_rewritten_prose_kept(self) -> None:
        """Each block becomes its section's key list; the text around it stays."""
        result = regenerate(_PAGE, _SCHEMA)
        self.assertEqual(
            result,
            "Intro.\n\n.. BEGIN keys relay\n\n"
            "``listen`` (default ``tcp:20500``)\n    Where devices connect.\n\n"
            "``node`` (default: empty)\n    This relay's name.\n"
            "\n.. END keys relay\n\nMiddle.\n\n.. BEGIN keys file\n\n"
            "``path`` (required)\n    The file.\n\n.. END keys file\nEnd.\n",
        )

    def test_idempotent(self) -> None:
        """A regenerated page regenerates to itself."""
        once = regenerate(_PAGE, _SCHEMA)
        self.assertEqual(regenerate(once, _SCHEMA), once)

    def test_missing_section(self) -> None:
        """A schema section without a block is an error naming it."""
        page = _PAGE.replace(".. BEGIN keys file\n.. END keys file\n", "")
        with self.assertRaises(ValueError) as caught:
            regenerate(page, _SCHEMA)
        self.assertIn("file", str(caught.exception))

    def test_unknown_section(self) -> None:
        """A block naming a section the schema lacks is an error naming it."""
        page = _PAGE + ".. BEGIN keys spool\n.. END keys spool\n"
        with self.assertRaises(ValueError) as caught:
            regenerate(page, _SCHEMA)
        self.assertIn("spool", str(caught.exception))

    def test_long_doc_wrapped(self) -> None:
        """A long doc is wrapped to indented lines of at most 78 characters, words whole."""
        doc = " ".join(["``tcp:20500:interface=::``"] + ["word"] * 40)
        lines = key_list({"listen": Key(str, "x", doc)}).splitlines()[1:]
        self.assertGreater(len(lines), 1)
        for line in lines:
            self.assertTrue(line.startswith("    ") and len(line) <= 78, line)
        self.assertEqual(" ".join(line.strip() for line in lines), doc)


class MainTests(SynchronousTestCase):
    """``python -m oemrelay.config_reference [--check] PAGE``."""

    def write(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.write_text(text, encoding="utf-8")
        return path

    def run_main(self, *args: str) -> tuple[int, str]:
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            status = main(list(args))
        return status, stderr.getvalue()

    def test_check_stale(self) -> None:
        """--check on a stale page exits 1, says how to fix it and leaves it alone."""
        path = self.write(PAGE.read_text(encoding="utf-8").replace("``listen`` (", "``old`` (", 1))
        before = path.read_text(encoding="utf-8")
        status, err = self.run_main("--check", str(path))
        self.assertEqual(status, 1)
        self.assertIn("out of date", err)
        self.assertEqual(path.read_text(encoding="utf-8"), before)

    def test_rewrite(self) -> None:
        """Without --check a stale page is rewritten to the generated text."""
        fresh = PAGE.read_text(encoding="utf-8")
        path = self.write(fresh.replace("``listen`` (", "``old`` (", 1))
        self.assertEqual(self.run_main(str(path)), (0, ""))
        self.assertEqual(path.read_text(encoding="utf-8"), fresh)

    def test_page_without_blocks(self) -> None:
        """A page missing blocks is one line naming the file, exit 1."""
        path = self.write("No blocks.\n")
        status, err = self.run_main(str(path))
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn(str(path), err)

    def test_usage(self) -> None:
        """No page named: usage on stderr, exit 2."""
        status, err = self.run_main()
        self.assertEqual(status, 2)
        self.assertIn("usage", err)
