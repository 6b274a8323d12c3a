"""
The HTTP(S) connector: one POST of OEM JSON per upload; 2xx means accepted.

URL, headers and Basic credentials are templates over the device's dynamic
fields.  Values put into the URL are percent-encoded; a header that would
contain CR or LF after substitution is refused (the upload is not sent).
Per-device authentication (:mod:`oemrelay.auth`): Basic, an Azure IoT Hub
shared access signature, or an OAuth2 bearer token fetched again once when
the end server answers 401; mutual TLS with ``client_cert``/``client_key``.
Nothing that may carry a secret (the URL's path and query, header values,
credentials) is written to logs or to failure reasons.

Uploads go through :class:`~oemrelay.connectors.http_client.HttpClient`
(pooled keep-alive connections, one deadline per POST on a timer they
share); only the OAuth2 token endpoint, asked about once an hour, is reached
through treq.
"""

from __future__ import annotations

import hashlib
import json
import re
from base64 import b64decode, b64encode
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import quote, quote_plus, unquote, urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IPolicyForHTTPS

from treq.client import HTTPClient

from ..auth import AuthError, AzureSas, OAuth2ClientCredentials, iothub_message_id
from ..codec import Hello
from ..config import HttpConnectorConfig
from ..events import RelayObserver
from ..oneline import one_line
from ..oem_json import oem_document_of_frames
from ..relay import DeliveryFailed, DeviceProfile, StatelessLink, Upload
from ..templates import device_fields, expand, expand_url
from .http_client import Answer, HttpClient

log = Logger(namespace="oemrelay.connectors.http")

#: The Content-Type of each body format (a configured header may override it).
_CONTENT_TYPES = {"json": b"application/json", "form": b"application/x-www-form-urlencoded"}


def form_body(document: bytes) -> bytes:
    """``DeviceData=<document>`` form-encoded, as older OEM Servers posted it."""
    return b"DeviceData=" + quote_plus(document).encode("ascii")


#: How much of a refusing end server's answer is quoted in the log.
_QUOTED_BODY = 200

#: What stands in a quoted answer for a secret the relay sent.
REDACTED = "[redacted]"

#: Headers whose values are not secret and help to read a refusal.
_PLAIN_HEADERS = frozenset({b"content-type", b"iothub-messageid", b"idempotency-key"})


def secrets_sent(
    headers: Mapping[bytes, list[bytes]], url: str, fields: Mapping[str, str]
) -> set[str]:
    """
    Every secret value one request carried, in each form an end server that
    echoes the request may write it back: header values (the Basic
    credentials, their base64, a bearer token, each part of a SAS token, raw
    and percent-decoded), the URL's path and query, the custom fields.
    """
    found: set[str] = set()
    for name, values in headers.items():
        if name.lower() in _PLAIN_HEADERS:
            continue
        for value in values:
            found |= _parts_of_header(value.decode("utf-8", "replace"))
    parts = urlsplit(url)
    found.add(parts.query)
    if parts.path != "/":  # a bare / holds nothing, and is in every echo
        found.add(parts.path)
    for pair in parts.query.split("&"):
        found.add(pair.partition("=")[2])
    for name in ("CUSTOM1", "CUSTOM2", "CUSTOM3"):
        found.add(fields.get(name, ""))
    # Echoed in JSON, in a form, or percent-encoded.
    found |= {unquote(value) for value in found}
    found |= {quote(value, safe="") for value in found}
    found |= {json.dumps(value)[1:-1] for value in found}
    found.discard("")
    return found


def _parts_of_header(value: str) -> set[str]:
    parts = {value}
    scheme, _, credential = value.partition(" ")
    if not credential:
        return parts
    parts.add(credential)
    if scheme.lower() == "basic":
        try:
            user_password = b64decode(credential, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return parts
        user, _, password = user_password.partition(":")
        parts |= {user_password, user, password}
    elif scheme == "SharedAccessSignature":
        for pair in credential.split("&"):
            parts.add(pair.partition("=")[2])
    return parts


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each of ``secrets`` replaced by :data:`REDACTED`."""
    # Longest first, so a secret is hidden whole before any part of it is.
    ordered = sorted(set(secrets) - {""}, key=len, reverse=True)
    if not ordered:
        return text
    return re.sub("|".join(map(re.escape, ordered)), REDACTED, text)


def quote_answer(answer: bytes, secrets: set[str]) -> str:
    """The start of an end server's answer, for a log line, with ``secrets`` hidden."""
    # Enough of the answer that a secret which starts in the quoted part is
    # seen whole, and so redacted, before the cut.
    longest = max(map(len, secrets), default=0)
    window = answer[: 4 * (_QUOTED_BODY + longest)].decode("utf-8", "replace")
    return one_line(redact(window[: _QUOTED_BODY + longest], secrets)[:_QUOTED_BODY])


#: Refusals worth trying again besides 5xx: Request Timeout, Too Many Requests.
_RETRYABLE_STATUSES = frozenset({408, 429})


def idempotency_key(upload: Upload) -> str:
    """
    The ``Idempotency-Key`` of an upload: a hash of the serial and the
    records' bytes as the device sent them, so a retry, and a resend after a
    withheld commit, carry the same key however the device split the records
    into messages.
    """
    digest = hashlib.sha256(b"oemrelay-upload\0%d\0" % upload.hello.serial)
    previous_type = None
    for frame in upload.frames:
        if frame.type != previous_type:
            # Records of another message type are laid out differently.
            digest.update(b"\0type%d\0" % frame.type)
            previous_type = frame.type
        digest.update(frame.payload)
    return digest.hexdigest()[:32]


def retry_after_seconds(value: bytes | None, now: float) -> float | None:
    """
    A ``Retry-After`` value in seconds from ``now`` (delay-seconds or an
    HTTP date; a date in the past is 0), or None if absent or unreadable.
    """
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None  # not an HTTP date, which is always GMT
    return max(0.0, when.timestamp() - now)


class _QuietClientFactory(_HTTP11ClientFactory):
    """The token pool's per-connection factory, without a "Starting factory" line per connection."""

    noisy = False


class _QuietConnectionPool(HTTPConnectionPool):
    _factory = _QuietClientFactory


def tls_policy(config: HttpConnectorConfig) -> IPolicyForHTTPS | None:
    """
    How HTTPS is verified (:func:`oemrelay.tls.client_tls_policy`); None for
    an ``http://`` end server with no TLS keys, which then never loads
    pyOpenSSL.
    """
    if not config.uses_tls:
        return None
    from ..tls import client_tls_policy

    return client_tls_policy(config.ca_file, config.client_cert, config.client_key)


def build_http_client(reactor, config: HttpConnectorConfig) -> HttpClient:
    """
    The client uploads are POSTed with; HTTPS is always verified.

    It keeps up to ``pool_size`` connections per end server and sends no
    more requests than that at once to one server, so connections are
    reused rather than opened and closed per upload.
    """
    return HttpClient(reactor, config.pool_size, tls_policy(config))


def build_token_client(reactor, config: HttpConnectorConfig) -> HTTPClient:
    """
    A treq client for the OAuth2 token endpoint, with the uploads' TLS
    trust.  A token is fetched about once an hour: its connections are not
    kept.
    """
    pool = _QuietConnectionPool(reactor, persistent=False)
    policy = tls_policy(config)
    agent = Agent(reactor, policy, pool=pool) if policy else Agent(reactor, pool=pool)
    # The token endpoint's cookies must never travel with a later request.
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(agent, cookiejar=no_cookies)


def _describe_error(error: BaseException) -> str:
    return one_line(str(error)) or type(error).__name__


class HttpConnector(Service):
    """
    POSTs each upload to the configured URL.

    :param http_client: what uploads are POSTed with (an
        :class:`~oemrelay.connectors.http_client.HttpClient`, see
        :func:`build_http_client`): its ``post(url, headers, body,
        timeout)`` gives a Deferred ``Answer``.
    :param token_client: with ``auth = oauth2``, a treq client for the token
        endpoint (see :func:`build_token_client`).
    """

    def __init__(
        self,
        config: HttpConnectorConfig,
        http_client: HttpClient,
        clock: IReactorTime,
        observers: RelayObserver | None = None,
        token_client: HTTPClient | None = None,
    ) -> None:
        self.name = config.name
        self._config = config
        self._client = http_client
        self._clock = clock
        self._observers = observers or RelayObserver()
        self._link = StatelessLink(self.deliver)
        # The host is safe to log; path and query may hold per-device secrets.
        self._target = urlsplit(config.url).netloc.split("@")[-1]
        self._sas: AzureSas | None = None
        self._oauth: OAuth2ClientCredentials | None = None
        if config.auth_scheme == "azure-sas":
            self._sas = AzureSas(
                resource_template=config.sas_resource,
                clock=clock,
                key_template=config.sas_key,
                policy=config.sas_policy or None,
                ttl=config.token_ttl,
            )
        elif config.auth_scheme == "oauth2":
            if token_client is None:
                raise ValueError("an oauth2 connector needs a client for its token endpoint")
            self._oauth = OAuth2ClientCredentials(
                token_client,
                clock,
                config.token_url,
                config.client_id,
                config.client_secret,
                config.scope,
                config.timeout,
            )

    def open_link(self, hello: Hello, on_lost) -> StatelessLink:
        return self._link

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._client.close()

    def request_headers(self, hello: Hello, profile: DeviceProfile) -> dict[bytes, list[bytes]]:
        """
        The headers for one device's POST, but for an OAuth2 bearer token.

        :raises DeliveryFailed: if a substituted value would split a header,
            or the device's SAS key is missing or unusable.
        """
        return self._headers(hello, device_fields(hello, profile))

    def _headers(self, hello: Hello, fields: Mapping[str, str]) -> dict[bytes, list[bytes]]:
        headers = {b"Content-Type": [_CONTENT_TYPES[self._config.body]]}
        for name, template in self._config.headers:
            value = self._header_value(name, expand(template, fields))
            if name.lower() == "content-type":
                headers[b"Content-Type"] = [value]
            else:
                headers.setdefault(name.encode("ascii"), []).append(value)
        if self._config.auth_scheme == "basic":
            credentials = (
                f"{expand(self._config.username, fields)}:"
                f"{expand(self._config.password, fields)}"
            )
            headers[b"Authorization"] = [b"Basic " + b64encode(credentials.encode("utf-8"))]
        elif self._sas is not None:
            try:
                authorization = self._sas.authorization(fields)
            except ValueError as error:
                raise DeliveryFailed(
                    f"connector {self.name}: device {hello.serial}: {error}", "auth"
                ) from None
            headers[b"Authorization"] = [self._header_value("Authorization", authorization)]
        return headers

    def _header_value(self, name: str, value: str) -> bytes:
        if "\r" in value or "\n" in value:
            raise DeliveryFailed(
                f"connector {self.name}: header {name} would contain CR or LF"
                " after substitution; not sent",
                "request",
            )
        return value.encode("utf-8")

    def deliver(self, upload: Upload, profile: DeviceProfile) -> Deferred[None]:
        # Plain callbacks, not a coroutine: Deferred.fromCoroutine per upload
        # was a measurable part of the hot path.
        fields = device_fields(upload.hello, profile)
        try:
            headers = self._headers(upload.hello, fields)
        except DeliveryFailed:
            return fail()
        url = expand_url(self._config.url, fields)
        if self._config.iothub:
            message_id = iothub_message_id(upload.hello.serial, upload.first_seq)
            headers[b"iothub-messageid"] = [message_id.encode("ascii")]
        headers[b"Idempotency-Key"] = [idempotency_key(upload).encode("ascii")]
        body = oem_document_of_frames(upload.hello, upload.frames)
        if self._config.body == "form":
            body = form_body(body)
        if self._oauth is not None:
            return Deferred.fromCoroutine(self._post_with_token(url, headers, body, fields))
        return self._send(url, headers, body).addCallback(
            self._judge, url, headers, fields
        )

    async def _post_with_token(
        self, url: str, headers: dict, body: bytes, fields: Mapping[str, str]
    ) -> None:
        # A 401 may mean the token was revoked early: fetch a new one, once.
        for attempt in (1, 2):
            token = await self._bearer_token()
            headers[b"Authorization"] = [f"Bearer {token}".encode("ascii")]
            answer = await self._send(url, headers, body)
            if answer.code != 401:
                break
            self._oauth.invalidate(token)
        self._judge(answer, url, headers, fields)

    def _judge(self, answer: Answer, url: str, headers: dict, fields: Mapping[str, str]) -> None:
        """Nothing for a 2xx answer; otherwise raises the refusal's DeliveryFailed."""
        code = answer.code
        if 200 <= code < 300:
            return None
        # An end server echoing the request must not put its secrets in the log.
        secrets = secrets_sent(headers, url, fields)
        quoted = quote_answer(answer.body, secrets)
        retryable = code in _RETRYABLE_STATUSES or code >= 500
        raise DeliveryFailed(
            f"connector {self.name}: {self._target} answered {code}"
            + (f": {quoted}" if quoted else ""),
            retryable=retryable,
            retry_after=(
                retry_after_seconds(answer.header(b"retry-after"), self._clock.seconds())
                if retryable
                else None
            ),
        )

    async def _bearer_token(self) -> str:
        try:
            return await self._oauth.token()
        except AuthError as error:
            raise DeliveryFailed(f"connector {self.name}: {error}", "auth") from None

    def _send(self, url: str, headers: dict, body: bytes) -> Deferred[Answer]:
        """One POST: its answer, or DeliveryFailed if there was none."""
        started = self._clock.seconds()
        try:
            # A redirect is never followed (the client follows none): it is
            # a refusal, as following it would re-send the upload as a GET
            # (303) or put the request URL into the reason (301).
            sent = self._client.post(url, headers, body, self._config.timeout)
        except Exception:
            sent = fail()
        return sent.addCallbacks(
            self._answered, self._not_answered, callbackArgs=(started,), errbackArgs=(started,)
        )

    def _answered(self, answer: Answer, started: float) -> Answer:
        self._attempted(f"{answer.code // 100}xx", started)
        return answer

    def _not_answered(self, failure: Failure, started: float) -> Failure:
        error = failure.value
        if isinstance(error, CancelledError):
            return failure
        if isinstance(error, TimeoutError):
            self._attempted("timeout", started)
            raise DeliveryFailed(
                f"connector {self.name}: {self._target} did not answer within"
                f" {self._config.timeout:g}s",
                "timeout",
                retryable=True,
            )
        self._attempted("error", started)
        raise DeliveryFailed(
            f"connector {self.name}: POST to {self._target} failed:"
            f" {_describe_error(error)}",
            "unreachable",
            retryable=True,
        )

    def _attempted(self, outcome: str, started: float) -> None:
        self._observers.delivery_attempted(
            self.name, outcome, self._clock.seconds() - started
        )
