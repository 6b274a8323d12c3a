"""
The configuration reference in ``docs/configuration.rst``, kept equal to the
schema in :mod:`oemrelay.config`.

The prose of that page is written by hand; each section's list of keys sits
between two comment lines, ``.. BEGIN keys SECTION`` and ``.. END keys
SECTION`` (SECTION: ``relay``, ``api`` or a connector ``type``), and is
generated from the keys' defaults and ``doc`` texts.  Every section of
:data:`oemrelay.config.SCHEMA` must have its block, so a new section or key
cannot go undocumented (``tests/test_config_reference.py`` checks the
committed page).  Regenerate after changing a key::

    python -m oemrelay.config_reference docs/configuration.rst
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Mapping, Sequence

from .config import SCHEMA, Key

_BLOCK = re.compile(
    r"^\.\. BEGIN keys (?P<section>\S+)\n.*?^\.\. END keys (?P=section)\n",
    re.MULTILINE | re.DOTALL,
)

_WIDTH = 78


def _term(name: str, key: Key) -> str:
    if key.default is None:
        return f"``{name}`` (required)"
    if key.default == "":
        return f"``{name}`` (default: empty)"
    return f"``{name}`` (default ``{key.default}``)"


def key_list(keys: Mapping[str, Key]) -> str:
    """One section's keys as a reST definition list: name, default, then the doc."""
    entries = []
    for name, key in keys.items():
        body = textwrap.fill(
            " ".join(key.doc.split()),
            _WIDTH,
            initial_indent="    ",
            subsequent_indent="    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        entries.append(f"{_term(name, key)}\n{body}\n")
    return "\n".join(entries)


def regenerate(text: str, schema: Mapping[str, Mapping[str, Key]] = SCHEMA) -> str:
    """
    ``text`` with every generated block rewritten from ``schema``.

    :raises ValueError: if a block names a section the schema does not have,
        or a section of the schema has no block.
    """
    found = []

    def rewrite(match: re.Match) -> str:
        section = match["section"]
        if section not in schema:
            raise ValueError(f"a block names section {section!r}, which the schema does not have")
        found.append(section)
        return (
            f".. BEGIN keys {section}\n\n{key_list(schema[section])}\n.. END keys {section}\n"
        )

    result = _BLOCK.sub(rewrite, text)
    missing = [section for section in schema if section not in found]
    if missing:
        raise ValueError(
            "no '.. BEGIN keys SECTION' ... '.. END keys SECTION' block for "
            + ", ".join(missing)
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the page named on the command line; with ``--check``, only say if it is stale."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [arg for arg in args if arg != "--check"]
    if len(paths) != 1:
        print("usage: python -m oemrelay.config_reference [--check] docs/configuration.rst", file=sys.stderr)
        return 2
    (path,) = paths
    try:
        with open(path, encoding="utf-8") as page:
            text = page.read()
        new = regenerate(text)
    except (OSError, ValueError) as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 1
    if new == text:
        return 0
    if check:
        print(f"{path}: out of date; run python -m oemrelay.config_reference {path}", file=sys.stderr)
        return 1
    with open(path, "w", encoding="utf-8") as page:
        page.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
