"""
Per-device authentication for the HTTP connector.

Two schemes:

- Azure IoT Hub shared access signatures (:func:`sas_token`,
  :class:`AzureSas`): a device's key (one of its profile fields) signs its
  resource URI and an expiry; the token is cached per device and renewed
  before it expires.  :func:`iothub_url`, :func:`default_sas_resource` and
  :func:`iothub_message_id` fill in the rest of an IoT Hub connector.
- OAuth 2.0 client credentials (RFC 6749 section 4.4,
  :class:`OAuth2ClientCredentials`): one bearer token for the connector,
  fetched from a token endpoint, shared by every device and renewed shortly
  before it expires or when the resource server refuses it.

Keys, signatures, tokens and client secrets never appear in exception
messages; every message is one line that may be logged as it is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from base64 import b64encode
from collections import OrderedDict
from collections.abc import Mapping
from urllib.parse import quote, quote_plus, urlencode, urlsplit

from automat import MethodicalMachine
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

# default_sas_resource and iothub_url are part of this module's interface too.
from .iothub import SAS_PREFIX, decode_sas_key, default_sas_resource, iothub_url  # noqa: F401
from .templates import expand

# --- Azure IoT Hub shared access signatures --------------------------------


def _sas_signature(encoded_resource: str, expiry: str, key: bytes) -> str:
    """The base64 HMAC-SHA256 of ``<encoded resource>\\n<expiry>`` (not URL-encoded)."""
    message = f"{encoded_resource}\n{expiry}".encode("utf-8")
    return b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode("ascii")


def sas_token(
    resource_uri: str, key_base64: str, expiry: int, policy: str | None = None
) -> str:
    """
    An Azure shared access signature for ``resource_uri``, valid until ``expiry``.

    The algorithm of Microsoft's reference implementations (the IoT Hub
    security guide's Python sample, ``azure-iot-device``'s ``sastoken.py``):
    the resource URI is percent-encoded with nothing left safe (so ``/``
    becomes ``%2F``; its case is kept), the string
    ``<encoded resource>\\n<expiry>`` is signed with HMAC-SHA256 keyed with
    the base64-decoded key, and the base64 digest is percent-encoded.

    :param resource_uri: the token's scope, such as
        ``myhub.azure-devices.net/devices/dev1`` (not URL-encoded).
    :param key_base64: a device key or shared access policy key, as Azure
        shows it (standard base64).
    :param expiry: seconds since the Unix epoch.
    :param policy: the shared access policy's name (``skn``), for a policy key.
    :return: ``SharedAccessSignature sr=...&sig=...&se=...[&skn=...]``, the
        value of an ``Authorization`` header.
    :raises ValueError: if the resource is empty or the key is not base64;
        the message holds no key material.
    """
    if not resource_uri:
        raise ValueError("the SAS resource URI is empty")
    if isinstance(expiry, bool) or not isinstance(expiry, int) or expiry < 0:
        raise ValueError("the SAS expiry must be a non-negative integer (epoch seconds)")
    key = decode_sas_key(key_base64)
    encoded_resource = quote(resource_uri, safe="")
    signature = _sas_signature(encoded_resource, str(expiry), key)
    token = (
        f"{SAS_PREFIX}sr={encoded_resource}"
        f"&sig={quote(signature, safe='')}&se={expiry}"
    )
    if policy:
        token += f"&skn={quote(policy, safe='')}"
    return token


class AzureSas:
    """
    ``Authorization`` header values for Azure IoT Hub, one SAS per device.

    The key and the resource are templates over the device's fields (see
    :mod:`oemrelay.templates`); by default the key is the profile's
    ``CUSTOM3``.  A device whose key field already holds a complete
    ``SharedAccessSignature ...`` string (one made with ``az iot hub
    generate-sas-token``, say) gets that string unchanged.

    Tokens live ``ttl`` seconds and are cached per (resource, key, policy);
    a cached token is renewed once less than a tenth of ``ttl`` or five
    minutes, whichever is smaller, remains.  The cache is an LRU of at most
    ``max_cached`` entries: a device seen again moves to the front, and the
    least recently used entry is dropped when the cache is full (an expired
    entry is replaced when its device is next seen).

    :param resource_template: the token's scope, usually
        ``<hub>.azure-devices.net/devices/[CUSTOM1]``; see
        :func:`default_sas_resource`.  Substituted values are not escaped
        (the whole resource is percent-encoded when signed).
    :param clock: gives the current time as epoch seconds (the reactor).
    :param key_template: where the device's base64 key comes from.
    :param policy: a shared access policy name (``skn``) when the key is a
        policy key rather than a device key.
    :param ttl: how long each token is valid, in seconds.
    :param max_cached: the most tokens kept.
    """

    def __init__(
        self,
        *,
        resource_template: str,
        clock: IReactorTime,
        key_template: str = "[CUSTOM3]",
        policy: str | None = None,
        ttl: int = 3600,
        max_cached: int = 4096,
    ) -> None:
        if not resource_template:
            raise ValueError("the SAS resource template is empty")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise ValueError("the SAS ttl must be a positive whole number of seconds")
        if max_cached < 1:
            raise ValueError("the SAS cache must hold at least one token")
        self._resource_template = resource_template
        self._key_template = key_template
        self._policy = policy or None
        self._ttl = ttl
        self._renew_margin = min(ttl / 10, 300)
        self._clock = clock
        self._max_cached = max_cached
        self._cache: OrderedDict[tuple[str, str, str | None], tuple[str, int]] = OrderedDict()

    def authorization(self, fields: Mapping[str, str]) -> str:
        """
        The ``Authorization`` header value for one device.

        :param fields: the device's placeholder values, as given by
            :func:`oemrelay.templates.device_fields`.
        :raises ValueError: if the device has no key, its key is not base64
            or its resource is empty; the message names the device's serial
            but no key material.
        """
        serial = fields.get("SERIAL", "?")
        key = expand(self._key_template, fields)
        if key.startswith(SAS_PREFIX):
            if "\r" in key or "\n" in key:
                raise ValueError(
                    f"the preset SAS of device {serial} contains CR or LF"
                )
            return key
        if not key.strip():
            raise ValueError(f"no SAS key for device {serial}")
        resource = expand(self._resource_template, fields)
        if not resource:
            raise ValueError(f"the SAS resource of device {serial} is empty")
        now = self._clock.seconds()
        cache_key = (resource, key, self._policy)
        cached = self._cache.get(cache_key)
        if cached is not None and now < cached[1] - self._renew_margin:
            self._cache.move_to_end(cache_key)
            return cached[0]
        expiry = int(now) + self._ttl
        try:
            token = sas_token(resource, key, expiry, self._policy)
        except ValueError as error:
            raise ValueError(f"device {serial}: {error}") from None
        self._cache[cache_key] = (token, expiry)
        self._cache.move_to_end(cache_key)
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return token

    def cached_tokens(self) -> int:
        """How many tokens the cache holds now."""
        return len(self._cache)


def iothub_message_id(serial: int, first_seq: int | None) -> str:
    """
    The ``iothub-messageid`` of one upload: ``dm-<serial>-<first seq>``.

    The same upload sent again (after a timeout, say) carries the same id,
    so the consumer can drop the duplicate.  An upload without records has
    ``empty`` in place of the sequence number.  Only ASCII letters, digits
    and ``-`` are used, well within IoT Hub's 128 characters.
    """
    return f"dm-{serial}-{'empty' if first_seq is None else first_seq}"


# --- OAuth 2.0 client credentials ------------------------------------------


class AuthError(Exception):
    """
    A credential could not be obtained.  The message is one line and holds
    no secret (no client secret, no token).
    """


_SAFE_OAUTH_ERROR = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
#: Visible ASCII only: nothing that could end or split a header line.
_USABLE_TOKEN = re.compile(r"[\x21-\x7e]+")


def _oauth_error_code(body: bytes) -> str | None:
    """The RFC 6749 ``error`` code of a refusal, if it is a plain word."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    code = document.get("error")
    if isinstance(code, str) and _SAFE_OAUTH_ERROR.fullmatch(code):
        return code
    return None


def _expires_in(value: object) -> float:
    """A token's lifetime from the ``expires_in`` member (3600 s when absent)."""
    if value is None:
        return 3600.0
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        # Some servers (Azure AD v1) send a string.
        return float(value)
    raise ValueError


class OAuth2ClientCredentials:
    """
    A bearer token from an OAuth 2.0 token endpoint, by the client
    credentials grant (RFC 6749 section 4.4).

    The token is cached until shortly before it expires (a tenth of its
    lifetime or a minute before, whichever is sooner).  Callers asking
    while a fetch is under way share that fetch.  A failed fetch is not
    cached: the next call tries again.  The rules are one table of automat
    transitions between three states: ``_empty`` (no usable token),
    ``_fetching`` (one fetch under way, callers waiting) and ``_cached``.

    :param http_client: a :class:`treq.client.HTTPClient` (or ``StubTreq``).
    :param clock: times the request and the token's lifetime.
    :param token_url: the token endpoint.
    :param client_id: the client's identifier.
    :param client_secret: the client's secret.
    :param scope: space-separated scopes to ask for; not sent when empty.
    :param timeout: the most seconds one fetch (request and answer) may take.
    :param credentials_in_body: send ``client_id`` and ``client_secret`` as
        form fields rather than HTTP Basic (RFC 6749 section 2.3.1 prefers
        Basic; some servers only take the body).
    """

    def __init__(
        self,
        http_client,
        clock: IReactorTime,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str = "",
        timeout: float = 10,
        credentials_in_body: bool = False,
    ) -> None:
        if not token_url or not client_id:
            raise ValueError("OAuth2 needs a token URL and a client id")
        if timeout <= 0:
            raise ValueError("the OAuth2 timeout must be positive")
        self._client = http_client
        self._clock = clock
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = scope
        self._timeout = timeout
        self._credentials_in_body = credentials_in_body
        # The host is safe to name in errors; path and query may not be.
        self._target = urlsplit(token_url).netloc.rpartition("@")[2] or "token endpoint"
        self._token: str | None = None
        self._renew_at = 0.0
        self._waiters: list[Deferred[str]] = []
        self._fetch: Deferred[tuple[str, float]] | None = None
        self._timer = None

    def __repr__(self) -> str:
        return f"<OAuth2ClientCredentials {self._client_id!r} at {self._target}>"

    def token(self) -> Deferred[str]:
        """
        A valid access token: the cached one, or a new one once it is
        about to expire or has been invalidated.

        :return: a Deferred firing with the token, or failing with
            :class:`AuthError`.  Cancelling it leaves a shared fetch running
            for the other callers (and for the cache).
        """
        if self._token is not None and self._clock.seconds() >= self._renew_at:
            self._expired()
        waiter: Deferred[str] = Deferred(self._forget_waiter)
        self._wanted(waiter)
        return waiter

    def invalidate(self, token: str) -> None:
        """
        Drop ``token`` from the cache, if it is still the cached token, so
        the next :meth:`token` fetches another.  Call this when the resource
        server refuses ``token`` (401); a token already replaced by a newer
        one is left alone, so many refusals cause one fetch.
        """
        # A token is held only in the cached state.
        if self._token is not None and hmac.compare_digest(
            self._token.encode("utf-8"), token.encode("utf-8")
        ):
            self._invalidated()

    # -- the machine: empty, fetching, cached -----------------------------------

    _machine = MethodicalMachine()

    @_machine.state(initial=True)
    def _empty(self) -> None:
        """No usable token, no fetch under way."""

    @_machine.state()
    def _fetching(self) -> None:
        """One fetch is under way; every caller waits for it."""

    @_machine.state()
    def _cached(self) -> None:
        """A token is held until its renewal time."""

    @_machine.input()
    def _wanted(self, waiter: Deferred[str]) -> None:
        "A caller wants a token."

    @_machine.input()
    def _fetched(self, token: str, renew_at: float) -> None:
        "The token endpoint gave a token."

    @_machine.input()
    def _fetch_failed(self, failure: Failure) -> None:
        "The fetch failed (and not by our own timeout)."

    @_machine.input()
    def _timed_out(self) -> None:
        "The fetch took longer than the timeout."

    @_machine.input()
    def _expired(self) -> None:
        "The cached token's renewal time has come."

    @_machine.input()
    def _invalidated(self) -> None:
        "The resource server refused the cached token."

    @_machine.output()
    def _start_fetch(self, waiter: Deferred[str]) -> None:
        # Not addTimeout: a cancelled treq request fails with
        # ResponseNeverReceived, not CancelledError, so the timeout is an
        # input of its own and is reported as one.
        self._timer = self._clock.callLater(self._timeout, self._timed_out)
        self._fetch = Deferred.fromCoroutine(self._fetch_token())
        self._fetch.addCallbacks(lambda result: self._fetched(*result), self._fetch_failed)

    @_machine.output()
    def _add_waiter(self, waiter: Deferred[str]) -> None:
        self._waiters.append(waiter)

    @_machine.output()
    def _give_cached(self, waiter: Deferred[str]) -> None:
        waiter.callback(self._token)

    @_machine.output()
    def _keep_token(self, token: str, renew_at: float) -> None:
        self._stop_fetch()
        self._token, self._renew_at = token, renew_at
        for waiter in self._take_waiters():
            waiter.callback(token)

    @_machine.output()
    def _report_failure(self, failure: Failure) -> None:
        self._stop_fetch()
        if failure.check(AuthError):
            error = failure.value
        else:
            error = AuthError(
                f"OAuth2 token request to {self._target} failed ({failure.type.__name__})"
            )
        self._fail_waiters(error)

    @_machine.output()
    def _abandon_fetch(self) -> None:
        # Cancelled while already empty, its failure is ignored.
        fetch, self._fetch, self._timer = self._fetch, None, None
        fetch.cancel()
        self._fail_waiters(
            AuthError(
                f"OAuth2 token endpoint {self._target} did not answer"
                f" within {self._timeout:g}s"
            )
        )

    @_machine.output()
    def _forget_token(self) -> None:
        self._token, self._renew_at = None, 0.0

    # fmt: off
    _empty.upon(_wanted, enter=_fetching, outputs=[_add_waiter, _start_fetch])
    _empty.upon(_fetch_failed, enter=_empty, outputs=[])  # the abandoned fetch's cancellation

    _fetching.upon(_wanted, enter=_fetching, outputs=[_add_waiter])
    _fetching.upon(_fetched, enter=_cached, outputs=[_keep_token])
    _fetching.upon(_fetch_failed, enter=_empty, outputs=[_report_failure])
    _fetching.upon(_timed_out, enter=_empty, outputs=[_abandon_fetch])

    _cached.upon(_wanted, enter=_cached, outputs=[_give_cached])
    _cached.upon(_expired, enter=_empty, outputs=[_forget_token])
    _cached.upon(_invalidated, enter=_empty, outputs=[_forget_token])
    # fmt: on

    def _stop_fetch(self) -> None:
        timer, self._fetch, self._timer = self._timer, None, None
        if timer is not None and timer.active():
            timer.cancel()

    def _take_waiters(self) -> list[Deferred[str]]:
        waiters, self._waiters = self._waiters, []
        return waiters

    def _fail_waiters(self, error: AuthError) -> None:
        for waiter in self._take_waiters():
            waiter.errback(Failure(error))

    def _forget_waiter(self, waiter: Deferred[str]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _request(self) -> tuple[bytes, dict[bytes, list[bytes]]]:
        form = [("grant_type", "client_credentials")]
        if self._scope:
            form.append(("scope", self._scope))
        headers = {
            b"Content-Type": [b"application/x-www-form-urlencoded"],
            b"Accept": [b"application/json"],
        }
        if self._credentials_in_body:
            form += [("client_id", self._client_id), ("client_secret", self._client_secret)]
        else:
            # RFC 6749 2.3.1: each part form-urlencoded, then Basic.
            pair = f"{quote_plus(self._client_id)}:{quote_plus(self._client_secret)}"
            headers[b"Authorization"] = [b"Basic " + b64encode(pair.encode("utf-8"))]
        return urlencode(form).encode("ascii"), headers

    async def _fetch_token(self) -> tuple[str, float]:
        started = self._clock.seconds()
        body, headers = self._request()
        try:
            response = await self._client.post(self._token_url, data=body, headers=headers)
            answer = await response.content()
        except CancelledError:
            raise
        except ResponseFailed as error:
            reasons = ", ".join(reason.type.__name__ for reason in error.reasons)
            raise AuthError(
                f"OAuth2 token request to {self._target} failed ({reasons or 'ResponseFailed'})"
            ) from None
        except Exception as error:
            raise AuthError(
                f"OAuth2 token request to {self._target} failed ({type(error).__name__})"
            ) from None
        if not 200 <= response.code < 300:
            code = _oauth_error_code(answer)
            raise AuthError(
                f"OAuth2 token endpoint {self._target} answered {response.code}"
                + (f" ({code})" if code else "")
            )
        try:
            document = json.loads(answer)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise AuthError(
                f"OAuth2 token endpoint {self._target} answered with no JSON object"
            )
        token = document.get("access_token")
        if not isinstance(token, str) or not _USABLE_TOKEN.fullmatch(token):
            raise AuthError(
                f"OAuth2 token endpoint {self._target} answered with no usable access_token"
            )
        try:
            lifetime = _expires_in(document.get("expires_in"))
        except (ValueError, OverflowError):  # OverflowError: an int too large for a float
            raise AuthError(
                f"OAuth2 token endpoint {self._target} answered with an invalid expires_in"
            ) from None
        renew_at = started + lifetime - min(60.0, max(lifetime, 0.0) / 10)
        return token, renew_at
