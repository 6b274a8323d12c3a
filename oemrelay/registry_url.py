"""
Registry URLs checked and shown without a database: a ``postgresql://`` URL's
connection arguments, its passwords, and its form fit for logs.

A leaf module, so that :mod:`oemrelay.config` can refuse a bad ``[relay]
registry`` at load time without importing the registry itself.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit


def url_without_password(url: str) -> str:
    """``url`` with the password removed from its user part and its query."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = userinfo.split(":", 1)[0] + "@" + host
    query = parts.query
    if query:
        query = urlencode(
            [
                (key, value)
                for key, value in parse_qsl(query, keep_blank_values=True)
                if key not in ("password", "sslpassword")
            ]
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_passwords(url: str) -> list[str]:
    """The passwords in ``url`` (user part and query), raw and decoded."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return []
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if unquote(key) in ("password", "sslpassword"):
            found.append(value)
    found += [unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def check_postgresql_url(url: str) -> None:
    """
    Check a ``postgresql://`` registry URL without connecting.

    :raises ValueError: as :meth:`Registry.from_url` would; one line, no password.
    """
    postgresql_pool_args(url)


def postgresql_pool_args(url: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """
    The ``adbapi.ConnectionPool`` arguments for a ``postgresql://`` URL.

    :raises ValueError: one line, passwords masked, if psycopg is missing or
        cannot parse the URL.
    """
    # psycopg is optional: only a postgresql:// registry needs it.
    try:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ValueError(
            "a postgresql:// registry needs the psycopg package (pip install 'psycopg[binary]')"
        ) from None
    try:
        given = conninfo_to_dict(url)
    except ProgrammingError as e:
        reason = (str(e).strip().splitlines() or ["cannot parse it"])[0]
        # libpq quotes the token it cannot parse, which may be the password.
        for secret in url_passwords(url):
            reason = reason.replace(secret, "***")
        raise ValueError(f"bad PostgreSQL URL {url_without_password(url)}: {reason}") from None
    defaults = {"connect_timeout": 10, "application_name": "oemrelay"}
    return (url,), {k: v for k, v in defaults.items() if k not in given}
