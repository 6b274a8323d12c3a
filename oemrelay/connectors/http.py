"""
The HTTP(S) connector: one POST of OEM JSON per upload; 2xx means accepted.

URL, headers and Basic credentials are templates over the device's dynamic
fields.  Values put into the URL are percent-encoded; a header that would
contain CR or LF after substitution is refused (the upload is not sent).
Nothing that may carry a secret (the URL's path and query, header values,
credentials) is written to logs or to failure reasons.
"""

from __future__ import annotations

from base64 import b64encode
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
# Twisted exports no public way to add one CA to the platform's; its trust-root
# interface has been stable since 14.0.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseFailed,
)
from zope.interface import implementer

from treq.client import HTTPClient

from ..codec import Hello
from ..config import HttpConnectorConfig
from ..oem_json import oem_document
from ..relay import DeliveryFailed, DeviceProfile, StatelessLink, Upload
from ..templates import device_fields, expand, expand_url

log = Logger(namespace="oemrelay.connectors.http")

#: How much of a refusing end server's answer is quoted in the log.
_QUOTED_BODY = 200


@implementer(IOpenSSLTrustRoot)
class PlatformTrustPlusCA:
    """Trust the system's CAs and one more, from ``ca_file`` (a private CA)."""

    def __init__(self, ca_file: str) -> None:
        self._ca_file = ca_file

    def _addCACertsToContext(self, context) -> None:  # noqa: N802 - Twisted's name
        context.set_default_verify_paths()
        context.load_verify_locations(self._ca_file)


def build_http_client(reactor, config: HttpConnectorConfig) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client with its own connection pool; HTTPS is always verified."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    trust = PlatformTrustPlusCA(config.ca_file) if config.ca_file else None
    agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool)
    return HTTPClient(agent), pool


def _timed_out(result: object, timeout: float) -> None:
    # Cancelling a request in flight fails it with ResponseNeverReceived, not
    # CancelledError, which addTimeout's own conversion would not recognise.
    raise TimeoutError(f"no answer within {timeout}s")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe_error(error: BaseException) -> str:
    if isinstance(error, ResponseFailed):
        return "; ".join(
            _one_line(str(reason.value) or reason.type.__name__)
            for reason in error.reasons
        )
    return _one_line(str(error)) or type(error).__name__


class HttpConnector(Service):
    """POSTs each upload to the configured URL."""

    def __init__(
        self,
        config: HttpConnectorConfig,
        http_client: HTTPClient,
        clock: IReactorTime,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self.name = config.name
        self._config = config
        self._client = http_client
        self._clock = clock
        self._pool = pool
        self._link = StatelessLink(self.deliver)
        # The host is safe to log; path and query may hold per-device secrets.
        self._target = urlsplit(config.url).netloc.split("@")[-1]

    def open_link(self, hello: Hello, on_lost) -> StatelessLink:
        return self._link

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None

    def request_headers(self, hello: Hello, profile: DeviceProfile) -> dict[bytes, list[bytes]]:
        """
        The headers for one device's POST.

        :raises DeliveryFailed: if a substituted value would split the header.
        """
        fields = device_fields(hello, profile)
        headers = {b"Content-Type": [b"application/json"]}
        for name, template in self._config.headers:
            value = expand(template, fields)
            if "\r" in value or "\n" in value:
                raise DeliveryFailed(
                    f"connector {self.name}: header {name} would contain CR or LF"
                    " after substitution; not sent"
                )
            if name.lower() == "content-type":
                headers[b"Content-Type"] = [value.encode("utf-8")]
            else:
                headers.setdefault(name.encode("ascii"), []).append(value.encode("utf-8"))
        if self._config.username or self._config.password:
            credentials = (
                f"{expand(self._config.username, fields)}:"
                f"{expand(self._config.password, fields)}"
            )
            headers[b"Authorization"] = [b"Basic " + b64encode(credentials.encode("utf-8"))]
        return headers

    def deliver(self, upload: Upload, profile: DeviceProfile) -> Deferred[None]:
        return Deferred.fromCoroutine(self._post(upload, profile))

    async def _post(self, upload: Upload, profile: DeviceProfile) -> None:
        url = expand_url(self._config.url, device_fields(upload.hello, profile))
        headers = self.request_headers(upload.hello, profile)
        body = oem_document(upload.hello, upload.records)
        try:
            # A redirect is a refusal: following it would re-send the upload
            # as a GET (303) or put the request URL into the reason (301).
            request = self._client.post(
                url, data=body, headers=headers, allow_redirects=False
            )
            response = await request.addTimeout(
                self._config.timeout, self._clock, _timed_out
            )
            answer = await self._client_content(response)
        except TimeoutError:
            raise DeliveryFailed(
                f"connector {self.name}: {self._target} did not answer within"
                f" {self._config.timeout:g}s"
            ) from None
        except CancelledError:
            raise
        except Exception as error:
            raise DeliveryFailed(
                f"connector {self.name}: POST to {self._target} failed:"
                f" {_describe_error(error)}"
            ) from None
        if not 200 <= response.code < 300:
            quoted = _one_line(answer[:_QUOTED_BODY].decode("utf-8", "replace"))
            raise DeliveryFailed(
                f"connector {self.name}: {self._target} answered {response.code}"
                + (f": {quoted}" if quoted else "")
            )

    def _client_content(self, response) -> Deferred[bytes]:
        # Read the whole answer so the connection can go back to the pool.
        return response.content().addTimeout(
            self._config.timeout, self._clock, _timed_out
        )
