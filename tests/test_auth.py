"""
Tests for :mod:`oemrelay.auth`: Azure IoT Hub shared access signatures and
OAuth 2.0 client credentials, against the fakes in :mod:`tests.fake_azure`
and :mod:`tests.fake_oauth` through ``StubTreq``, with a ``task.Clock``.
"""

from __future__ import annotations

import json
from base64 import b64encode

from twisted.internet.defer import CancelledError, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from treq.testing import StubTreq

from oemrelay.auth import (
    AuthError,
    AzureSas,
    OAuth2ClientCredentials,
    default_sas_resource,
    iothub_message_id,
    iothub_url,
    sas_token,
)
from oemrelay.codec import Hello
from oemrelay.relay import DeviceProfile
from oemrelay.templates import device_fields, expand_url

from .fake_azure import FakeIoTHub
from .fake_oauth import FakeOAuth

NOW = 1_700_000_000
HUB = "myhub.azure-devices.net"
KEY_1 = b64encode(bytes(range(32))).decode("ascii")
KEY_2 = b64encode(bytes(range(32, 64))).decode("ascii")
POLICY_KEY = b64encode(b"policy key of thirty-two bytes!!").decode("ascii")
URL = iothub_url("myhub", "[CUSTOM1]")
RESOURCE = default_sas_resource(URL)


def fields(device_id: str, key: str, serial: int = 129336) -> dict[str, str]:
    """The placeholder values of a device whose profile holds id and key."""
    hello = Hello(serial, "353323081669730", "89610185001824844630", 34, 2, 1, 9)
    return device_fields(hello, DeviceProfile(custom1=device_id, custom3=key))


def clock_at(seconds: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


class SasTokenTests(SynchronousTestCase):
    """:func:`sas_token` follows Azure's published algorithm."""

    def test_published_example(self) -> None:
        """The azure-iot-sdk-node vector (key 'password', 'uri', 12345) is reproduced."""
        key = b64encode(b"password").decode()
        self.assertEqual(
            sas_token("uri", key, 12345),
            "SharedAccessSignature sr=uri"
            "&sig=kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk%3D&se=12345",
        )

    def test_device_vector(self) -> None:
        """A device token signs the percent-encoded resource, a newline and the expiry."""
        encoded = "myhub.azure-devices.net%2Fdevices%2FDev-1"
        # Computed outside Python: printf 'myhub.azure-devices.net%%2Fdevices%%2FDev-1\n1700003600'
        #   | openssl dgst -sha256 -mac HMAC -macopt hexkey:000102...1f -binary | base64
        # gives gwbsvoOPDRs1nrJmI+3y+6nx9cgWjCx2UY4ZqLVMFeA= (KEY_1 is bytes 0 to 31).
        self.assertEqual(
            sas_token("myhub.azure-devices.net/devices/Dev-1", KEY_1, 1700003600),
            f"SharedAccessSignature sr={encoded}"
            "&sig=gwbsvoOPDRs1nrJmI%2B3y%2B6nx9cgWjCx2UY4ZqLVMFeA%3D&se=1700003600",
        )

    def test_policy_name_appended(self) -> None:
        """A policy name is added as skn after se; the signature does not cover it."""
        with_policy = sas_token(HUB, POLICY_KEY, 99, "device")
        without = sas_token(HUB, POLICY_KEY, 99)
        self.assertEqual(with_policy, without + "&skn=device")

    def test_resource_fully_encoded(self) -> None:
        """Every reserved character of the resource is percent-encoded; case is kept."""
        token = sas_token("Hub.example/devices/a b:c", KEY_1, 1)
        self.assertTrue(token.startswith("SharedAccessSignature sr=Hub.example%2Fdevices%2Fa%20b%3Ac&"))

    def test_invalid_base64_key(self) -> None:
        """A key that is not base64 is a ValueError that does not quote the key."""
        key = "not*base64*secretvalue"
        error = self.assertRaises(ValueError, sas_token, HUB, key, 1)
        self.assertIn("not valid base64", str(error))
        self.assertNotIn("secretvalue", str(error))

    def test_empty_key(self) -> None:
        """An empty key is refused."""
        self.assertRaises(ValueError, sas_token, HUB, "", 1)

    def test_empty_resource(self) -> None:
        """An empty resource is refused."""
        self.assertRaises(ValueError, sas_token, "", KEY_1, 1)


class FakeIoTHubTests(SynchronousTestCase):
    """:class:`FakeIoTHub` checks tokens as IoT Hub does."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.hub = FakeIoTHub(
            {"dev1": KEY_1, "dev10": KEY_2},
            {"device": POLICY_KEY},
            clock=self.clock,
        )
        self.stub = StubTreq(self.hub)
        self.sas = AzureSas(resource_template=RESOURCE, clock=self.clock)

    def post(self, device_id: str, authorization: str, **headers: str) -> int:
        url = expand_url(URL, {"CUSTOM1": device_id})
        all_headers = {"Authorization": authorization, **headers}
        response = self.successResultOf(
            self.stub.post(url, data=b'{"a": 1}', headers=all_headers)
        )
        self.successResultOf(response.content())
        return response.code

    def test_accepts_token_from_azure_sas(self) -> None:
        """A token made by AzureSas with the device's key is accepted and the body kept."""
        code = self.post("dev1", self.sas.authorization(fields("dev1", KEY_1)))
        self.assertEqual(code, 204)
        self.assertEqual(
            [(m.device_id, m.body) for m in self.hub.messages], [("dev1", b'{"a": 1}')]
        )

    def test_records_message_id(self) -> None:
        """The iothub-messageid header is kept with the message."""
        self.post(
            "dev1",
            self.sas.authorization(fields("dev1", KEY_1)),
            **{"iothub-messageid": iothub_message_id(129336, 7)},
        )
        self.assertEqual(self.hub.messages[0].message_id, "dm-129336-7")

    def test_rejects_expired_token(self) -> None:
        """A token whose se is in the past is refused with 401."""
        token = sas_token(f"{HUB}/devices/dev1", KEY_1, NOW - 1)
        self.assertEqual(self.post("dev1", token), 401)
        self.assertEqual(self.hub.rejections[-1].reason, "expired")
        self.assertEqual(self.hub.messages, [])

    def test_token_expires_with_time(self) -> None:
        """A token accepted now is refused once its lifetime has passed."""
        token = self.sas.authorization(fields("dev1", KEY_1))
        self.assertEqual(self.post("dev1", token), 204)
        self.clock.advance(3601)
        self.assertEqual(self.post("dev1", token), 401)

    def test_rejects_wrong_key(self) -> None:
        """A token signed with another key is refused."""
        token = self.sas.authorization(fields("dev1", KEY_2))
        self.assertEqual(self.post("dev1", token), 401)
        self.assertEqual(self.hub.rejections[-1].reason, "wrong signature")

    def test_rejects_other_device_token(self) -> None:
        """dev1's valid token does not let a request post as dev10."""
        token = self.sas.authorization(fields("dev1", KEY_1))
        self.assertEqual(self.post("dev10", token), 401)
        self.assertEqual(self.hub.rejections[-1].reason, "wrong resource")

    def test_rejects_tampered_expiry(self) -> None:
        """Changing se after signing breaks the signature."""
        token = sas_token(f"{HUB}/devices/dev1", KEY_1, NOW + 10)
        self.assertEqual(self.post("dev1", token.replace(f"se={NOW + 10}", f"se={NOW + 99}")), 401)

    def test_resource_case_insensitive(self) -> None:
        """The resource is compared without regard to case, as Azure does."""
        token = sas_token(f"{HUB.upper()}/devices/DEV1", KEY_1, NOW + 10)
        self.assertEqual(self.post("dev1", token), 204)

    def test_hub_policy_token(self) -> None:
        """A policy token scoped to the whole hub is accepted for any device."""
        sas = AzureSas(
            resource_template=HUB, key_template=POLICY_KEY, policy="device", clock=self.clock
        )
        token = sas.authorization(fields("dev10", ""))
        self.assertEqual(self.post("dev10", token), 204)

    def test_prefix_stops_at_segment(self) -> None:
        """A policy token for devices/dev1 does not cover devices/dev10."""
        token = sas_token(f"{HUB}/devices/dev1", POLICY_KEY, NOW + 10, "device")
        self.assertEqual(self.post("dev10", token), 401)
        self.assertEqual(self.hub.rejections[-1].reason, "wrong resource")

    def test_unknown_policy(self) -> None:
        """A token naming an unknown policy is refused."""
        token = sas_token(HUB, POLICY_KEY, NOW + 10, "registryRead")
        self.assertEqual(self.post("dev1", token), 401)
        self.assertEqual(self.hub.rejections[-1].reason, "unknown policy")

    def test_missing_authorization(self) -> None:
        """A request without a SharedAccessSignature is refused."""
        self.assertEqual(self.post("dev1", "Bearer abc"), 401)

    def test_special_device_id(self) -> None:
        """A device id with reserved characters works through expand_url and AzureSas."""
        device_id = "dm:129336 a"
        self.hub.devices[device_id] = KEY_1
        self.assertEqual(self.post(device_id, self.sas.authorization(fields(device_id, KEY_1))), 204)
        self.assertEqual(self.hub.messages[0].device_id, device_id)


class AzureSasTests(SynchronousTestCase):
    """:class:`AzureSas` makes, caches and renews per-device tokens."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.sas = AzureSas(resource_template=RESOURCE, clock=self.clock)

    def test_token_for_device(self) -> None:
        """The token covers the device's resource and lives ttl seconds."""
        self.assertEqual(
            self.sas.authorization(fields("dev1", KEY_1)),
            sas_token(f"{HUB}/devices/dev1", KEY_1, NOW + 3600),
        )

    def test_cached(self) -> None:
        """A second call soon after gives the same token."""
        first = self.sas.authorization(fields("dev1", KEY_1))
        self.clock.advance(60)
        self.assertEqual(self.sas.authorization(fields("dev1", KEY_1)), first)

    def test_renewed_five_minutes_before_expiry(self) -> None:
        """With a one-hour ttl the token is renewed once five minutes remain."""
        first = self.sas.authorization(fields("dev1", KEY_1))
        self.clock.advance(3299)
        self.assertEqual(self.sas.authorization(fields("dev1", KEY_1)), first)
        self.clock.advance(1)
        self.assertEqual(
            self.sas.authorization(fields("dev1", KEY_1)),
            sas_token(f"{HUB}/devices/dev1", KEY_1, NOW + 3300 + 3600),
        )

    def test_renewed_a_tenth_before_expiry(self) -> None:
        """With a short ttl the token is renewed once a tenth of it remains."""
        sas = AzureSas(resource_template=RESOURCE, clock=self.clock, ttl=600)
        first = sas.authorization(fields("dev1", KEY_1))
        self.clock.advance(539)
        self.assertEqual(sas.authorization(fields("dev1", KEY_1)), first)
        self.clock.advance(1)
        self.assertNotEqual(sas.authorization(fields("dev1", KEY_1)), first)

    def test_per_device(self) -> None:
        """Two devices get different tokens, each for its own resource."""
        one = self.sas.authorization(fields("dev1", KEY_1))
        two = self.sas.authorization(fields("dev2", KEY_1))
        self.assertIn("sr=myhub.azure-devices.net%2Fdevices%2Fdev1&", one)
        self.assertIn("sr=myhub.azure-devices.net%2Fdevices%2Fdev2&", two)

    def test_new_key_new_token(self) -> None:
        """A changed key (a rotated profile) gets a fresh token at once."""
        first = self.sas.authorization(fields("dev1", KEY_1))
        self.assertNotEqual(self.sas.authorization(fields("dev1", KEY_2)), first)

    def test_cache_is_bounded_lru(self) -> None:
        """The cache keeps at most max_cached tokens, dropping the least recently used."""
        sas = AzureSas(resource_template=RESOURCE, clock=self.clock, max_cached=2)
        first_a = sas.authorization(fields("a", KEY_1))
        first_b = sas.authorization(fields("b", KEY_1))
        self.clock.advance(1)
        sas.authorization(fields("a", KEY_1))
        sas.authorization(fields("c", KEY_1))
        self.assertEqual(sas.cached_tokens(), 2)
        self.assertEqual(sas.authorization(fields("a", KEY_1)), first_a)
        self.assertNotEqual(sas.authorization(fields("b", KEY_1)), first_b)

    def test_preset_signature_passes_through(self) -> None:
        """A key field holding a complete SharedAccessSignature is used as it is."""
        preset = "SharedAccessSignature sr=x&sig=y&se=1"
        self.assertEqual(self.sas.authorization(fields("dev1", preset)), preset)

    def test_preset_signature_with_newline(self) -> None:
        """A preset signature that would split the header is refused."""
        self.assertRaises(
            ValueError,
            self.sas.authorization,
            fields("dev1", "SharedAccessSignature sr=x\r\nX-Evil: 1"),
        )

    def test_empty_key(self) -> None:
        """A device without a key is a ValueError naming its serial."""
        error = self.assertRaises(ValueError, self.sas.authorization, fields("dev1", "", 42))
        self.assertEqual(str(error), "no SAS key for device 42")

    def test_bad_key_names_device_not_key(self) -> None:
        """A device whose key is not base64 gets an error with its serial and no key."""
        key = "%%%topsecret%%%"
        error = self.assertRaises(ValueError, self.sas.authorization, fields("dev1", key, 42))
        self.assertIn("device 42", str(error))
        self.assertNotIn("topsecret", str(error))

    def test_key_template(self) -> None:
        """The key can come from another field."""
        sas = AzureSas(resource_template=RESOURCE, key_template="[CUSTOM2]", clock=self.clock)
        values = fields("dev1", "") | {"CUSTOM2": KEY_2}
        self.assertEqual(
            sas.authorization(values), sas_token(f"{HUB}/devices/dev1", KEY_2, NOW + 3600)
        )

    def test_bad_ttl(self) -> None:
        """A ttl that is not a positive whole number is refused."""
        self.assertRaises(ValueError, AzureSas, resource_template=RESOURCE, clock=self.clock, ttl=0)


class DefaultSasResourceTests(SynchronousTestCase):
    """:func:`default_sas_resource` derives the token scope from the URL."""

    def test_example(self) -> None:
        """Host and path up to /messages, query dropped, placeholder kept."""
        self.assertEqual(
            default_sas_resource(
                "https://myhub.azure-devices.net/devices/[CUSTOM1]/messages/events"
                "?api-version=2021-04-12"
            ),
            "myhub.azure-devices.net/devices/[CUSTOM1]",
        )

    def test_placeholder_host(self) -> None:
        """A placeholder in the host is kept (not taken for an IPv6 literal)."""
        self.assertEqual(
            default_sas_resource("https://[CUSTOM2].azure-devices.net/devices/[SERIAL]/messages/events"),
            "[CUSTOM2].azure-devices.net/devices/[SERIAL]",
        )

    def test_port_and_userinfo_dropped(self) -> None:
        """User info and port are not part of the resource."""
        self.assertEqual(
            default_sas_resource("https://u:p@hub.example:8443/devices/d/messages/events"),
            "hub.example/devices/d",
        )

    def test_without_messages(self) -> None:
        """A path without /messages is taken whole, less a trailing slash."""
        self.assertEqual(default_sas_resource("https://hub.example/devices/d/"), "hub.example/devices/d")

    def test_messages_must_be_a_segment(self) -> None:
        """A device id that starts with 'messages' is not cut."""
        self.assertEqual(
            default_sas_resource("https://h.example/devices/messagesbox/messages/events"),
            "h.example/devices/messagesbox",
        )

    def test_escapes_decoded(self) -> None:
        """Percent-escapes in the URL are decoded, since the resource is signed unescaped."""
        self.assertEqual(
            default_sas_resource("https://h.example/devices/a%3Ab/messages/events"),
            "h.example/devices/a:b",
        )

    def test_no_scheme(self) -> None:
        """A URL without a scheme is refused."""
        self.assertRaises(ValueError, default_sas_resource, "myhub.azure-devices.net/devices/x")


class IotHubUrlTests(SynchronousTestCase):
    """:func:`iothub_url` builds the device-to-cloud telemetry URL."""

    def test_bare_hub_name(self) -> None:
        """A bare hub name is completed with .azure-devices.net."""
        self.assertEqual(
            iothub_url("myhub", "[CUSTOM1]"),
            "https://myhub.azure-devices.net/devices/[CUSTOM1]/messages/events"
            "?api-version=2021-04-12",
        )

    def test_full_host_name(self) -> None:
        """A name with a dot is taken as the full host name."""
        self.assertEqual(
            iothub_url("myhub.azure-devices.cn", "[SERIAL]"),
            "https://myhub.azure-devices.cn/devices/[SERIAL]/messages/events"
            "?api-version=2021-04-12",
        )

    def test_literal_text_encoded(self) -> None:
        """Literal text around placeholders is percent-encoded; placeholders stay."""
        self.assertEqual(
            iothub_url("h", "dm:[SERIAL]/x").split("/messages")[0],
            "https://h.azure-devices.net/devices/dm%3A[SERIAL]%2Fx",
        )

    def test_not_a_host(self) -> None:
        """A URL or an empty string is refused as a hub."""
        self.assertRaises(ValueError, iothub_url, "https://myhub.azure-devices.net", "[CUSTOM1]")
        self.assertRaises(ValueError, iothub_url, " ", "[CUSTOM1]")

    def test_resource_round_trip(self) -> None:
        """The default resource of an IoT Hub URL is the hub host and device path."""
        self.assertEqual(
            default_sas_resource(iothub_url("myhub", "[CUSTOM1]")),
            "myhub.azure-devices.net/devices/[CUSTOM1]",
        )


class IotHubMessageIdTests(SynchronousTestCase):
    """:func:`iothub_message_id` names an upload the same way every time."""

    def test_deterministic(self) -> None:
        """A serial and first sequence number give dm-<serial>-<seq>, the id a resend carries too."""
        self.assertEqual(iothub_message_id(129336, 5), "dm-129336-5")

    def test_distinct(self) -> None:
        """Another sequence number or another device gives another id."""
        ids = {iothub_message_id(1, 5), iothub_message_id(1, 6), iothub_message_id(2, 5)}
        self.assertEqual(len(ids), 3)

    def test_no_records(self) -> None:
        """An upload without records has 'empty' for the sequence number."""
        self.assertEqual(iothub_message_id(7, None), "dm-7-empty")


SECRET = "s3cr3t+/=:&value"
TOKEN_URL = "https://auth.example/token"


class OAuth2ClientCredentialsTests(SynchronousTestCase):
    """:class:`OAuth2ClientCredentials` fetches, caches and renews one token."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.server = FakeOAuth({"relay": SECRET}, clock=self.clock)
        self.stub = StubTreq(self.server)
        self.oauth = self.credentials()

    def credentials(self, **options) -> OAuth2ClientCredentials:
        settings = {"client_id": "relay", "client_secret": SECRET, **options}
        return OAuth2ClientCredentials(self.stub, self.clock, TOKEN_URL, **settings)

    def assert_auth_error(self, deferred, *words: str) -> str:
        """The Deferred failed with AuthError naming ``words`` and no secret; its message."""
        message = str(self.failureResultOf(deferred, AuthError).value)
        for word in words:
            self.assertIn(word, message)
        self.assertNotIn(SECRET, message)
        self.assertNotIn("\n", message)
        for token in self.server.issued:
            self.assertNotIn(token, message)
        return message

    def test_fetches_with_basic(self) -> None:
        """The grant is form-encoded with HTTP Basic client authentication."""
        token = self.successResultOf(self.credentials(scope="telemetry.write").token())
        self.assertEqual(token, self.server.issued[0])
        request = self.server.token_requests[0]
        self.assertEqual(
            (request.auth_method, request.client_id, request.grant_type, request.scope),
            ("basic", "relay", "client_credentials", "telemetry.write"),
        )
        self.assertEqual(request.content_type, "application/x-www-form-urlencoded")

    def test_no_scope_when_empty(self) -> None:
        """An empty scope is not sent."""
        self.successResultOf(self.oauth.token())
        self.assertIsNone(self.server.token_requests[0].scope)

    def test_credentials_in_body(self) -> None:
        """With credentials_in_body the id and secret are form fields, not Basic."""
        token = self.successResultOf(self.credentials(credentials_in_body=True).token())
        self.assertEqual(token, self.server.issued[0])
        self.assertEqual(self.server.token_requests[0].auth_method, "body")

    def test_cached(self) -> None:
        """A second call within the lifetime reuses the token without a request."""
        first = self.successResultOf(self.oauth.token())
        self.clock.advance(3000)
        self.assertEqual(self.successResultOf(self.oauth.token()), first)
        self.assertEqual(len(self.server.token_requests), 1)

    def test_renewed_before_expiry(self) -> None:
        """A one-hour token is replaced a minute before it expires."""
        first = self.successResultOf(self.oauth.token())
        self.clock.advance(3539)
        self.assertEqual(self.successResultOf(self.oauth.token()), first)
        self.clock.advance(1)
        second = self.successResultOf(self.oauth.token())
        self.assertNotEqual(second, first)
        self.assertEqual(len(self.server.token_requests), 2)

    def test_short_lifetime(self) -> None:
        """A short-lived token is renewed when a tenth of its lifetime remains."""
        self.server.expires_in = 100
        first = self.successResultOf(self.oauth.token())
        self.clock.advance(89)
        self.assertEqual(self.successResultOf(self.oauth.token()), first)
        self.clock.advance(1)
        self.assertNotEqual(self.successResultOf(self.oauth.token()), first)

    def test_missing_expires_in(self) -> None:
        """Without expires_in a token is taken to live an hour."""
        self.server.expires_in = None
        first = self.successResultOf(self.oauth.token())
        self.clock.advance(3500)
        self.assertEqual(self.successResultOf(self.oauth.token()), first)
        self.clock.advance(100)
        self.assertNotEqual(self.successResultOf(self.oauth.token()), first)

    def test_expires_in_as_text(self) -> None:
        """An expires_in sent as a decimal string is understood."""
        self.server.token_answer = (200, b'{"access_token": "abc", "expires_in": "120"}')
        self.assertEqual(self.successResultOf(self.oauth.token()), "abc")
        self.clock.advance(107)
        self.assertEqual(self.successResultOf(self.oauth.token()), "abc")
        self.assertEqual(len(self.server.token_requests), 1)
        self.clock.advance(1)
        self.successResultOf(self.oauth.token())
        self.assertEqual(len(self.server.token_requests), 2)

    def test_shared_fetch(self) -> None:
        """Callers arriving while a fetch is under way share that one fetch."""
        self.server.hang = True
        first, second = self.oauth.token(), self.oauth.token()
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(len(self.server.token_requests), 1)
        self.server.release()
        self.stub.flush()
        self.assertEqual(self.successResultOf(first), self.server.issued[0])
        self.assertEqual(self.successResultOf(second), self.server.issued[0])
        self.assertEqual(len(self.server.issued), 1)

    def test_cancelled_caller_leaves_fetch(self) -> None:
        """One caller cancelling does not stop the fetch the others wait for."""
        self.server.hang = True
        first, second = self.oauth.token(), self.oauth.token()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.server.release()
        self.stub.flush()
        self.assertEqual(self.successResultOf(second), self.server.issued[0])

    def test_invalidate(self) -> None:
        """Invalidating the cached token makes the next call fetch another."""
        first = self.successResultOf(self.oauth.token())
        self.oauth.invalidate(first)
        second = self.successResultOf(self.oauth.token())
        self.assertNotEqual(second, first)
        self.assertEqual(len(self.server.token_requests), 2)

    def test_invalidate_stale_token(self) -> None:
        """Invalidating a token already replaced keeps the newer one."""
        first = self.successResultOf(self.oauth.token())
        self.oauth.invalidate(first)
        second = self.successResultOf(self.oauth.token())
        self.oauth.invalidate(first)
        self.assertEqual(self.successResultOf(self.oauth.token()), second)
        self.assertEqual(len(self.server.token_requests), 2)

    def test_refetch_after_revocation(self) -> None:
        """After a 401 for a revoked token, invalidate gives a token the resource takes."""
        api = "https://auth.example/api/telemetry"
        token = self.successResultOf(self.oauth.token())
        response = self.successResultOf(
            self.stub.post(api, data=b"x", headers={"Authorization": f"Bearer {token}"})
        )
        self.assertEqual(response.code, 204)
        self.server.revoke_all()
        response = self.successResultOf(
            self.stub.post(api, data=b"x", headers={"Authorization": f"Bearer {token}"})
        )
        self.assertEqual(response.code, 401)
        self.oauth.invalidate(token)
        token = self.successResultOf(self.oauth.token())
        response = self.successResultOf(
            self.stub.post(api, data=b"y", headers={"Authorization": f"Bearer {token}"})
        )
        self.assertEqual(response.code, 204)
        self.assertEqual([r.body for r in self.server.accepted], [b"x", b"y"])

    def test_wrong_secret(self) -> None:
        """A refused client is an AuthError with the status and the OAuth error code."""
        oauth = self.credentials(client_secret="wrong-" + SECRET)
        message = self.assert_auth_error(oauth.token(), "401", "invalid_client", "auth.example")
        self.assertNotIn("wrong-", message)

    def test_server_error_body_not_quoted(self) -> None:
        """A refusal's body is not quoted beyond a plain error code."""
        self.server.token_answer = (500, json.dumps({"error_description": SECRET}).encode())
        message = self.assert_auth_error(self.oauth.token(), "500")
        self.assertEqual(message, "OAuth2 token endpoint auth.example answered 500")

    def test_bad_json(self) -> None:
        """An answer that is not JSON is an AuthError."""
        self.server.token_answer = (200, b"<html>" + SECRET.encode())
        self.assert_auth_error(self.oauth.token(), "no JSON object")

    def test_no_access_token(self) -> None:
        """An answer without access_token is an AuthError."""
        self.server.token_answer = (200, b'{"token_type": "Bearer"}')
        self.assert_auth_error(self.oauth.token(), "no usable access_token")

    def test_unusable_access_token(self) -> None:
        """An access_token that would split a header is refused without quoting it."""
        self.server.token_answer = (200, b'{"access_token": "abc\\r\\nX-Evil: 1"}')
        message = self.assert_auth_error(self.oauth.token(), "no usable access_token")
        self.assertNotIn("Evil", message)

    def test_bad_expires_in(self) -> None:
        """An expires_in that is not a number is an AuthError."""
        self.server.token_answer = (200, b'{"access_token": "abc", "expires_in": "soon"}')
        message = self.assert_auth_error(self.oauth.token(), "invalid expires_in")
        self.assertNotIn("abc", message)

    def test_non_finite_expires_in(self) -> None:
        """An expires_in of NaN or Infinity (which Python's JSON reads) is refused."""
        self.server.token_answer = (200, b'{"access_token": "abc", "expires_in": Infinity}')
        self.assert_auth_error(self.oauth.token(), "invalid expires_in")

    def test_huge_expires_in(self) -> None:
        """An expires_in too large for a float is an invalid expires_in, not an OverflowError."""
        self.server.token_answer = (200, b'{"access_token": "abc", "expires_in": 1' + b"0" * 400 + b"}")
        self.assert_auth_error(self.oauth.token(), "invalid expires_in")

    def test_timeout(self) -> None:
        """A token endpoint that does not answer within the timeout is an AuthError."""
        self.server.hang = True
        deferred = self.credentials(timeout=5).token()
        self.clock.advance(4.9)
        self.assertNoResult(deferred)
        self.clock.advance(0.1)
        self.assert_auth_error(deferred, "did not answer within 5s")

    def test_fetch_after_timeout(self) -> None:
        """After a timed-out fetch the next call starts a new one, which can succeed."""
        self.server.hang = True
        abandoned = self.oauth.token()
        self.clock.advance(10)
        self.failureResultOf(abandoned, AuthError)
        self.server.hang = False
        self.assertEqual(len(self.server.token_requests), 1)
        token = self.successResultOf(self.oauth.token())
        self.assertEqual(len(self.server.token_requests), 2)
        self.assertEqual(token, self.server.issued[-1])

    def test_timer_stopped_by_answer(self) -> None:
        """A fetch answered in time leaves no timeout behind to fail or drop the cached token."""
        token = self.successResultOf(self.oauth.token())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(self.oauth.token()), token)
        self.assertEqual(len(self.server.token_requests), 1)

    def test_invalidate_during_fetch(self) -> None:
        """Invalidating while a fetch is under way changes nothing: the fetched token is cached."""
        self.server.hang = True
        waiting = self.oauth.token()
        self.oauth.invalidate("some-old-token")
        self.server.release()
        self.stub.flush()
        token = self.successResultOf(waiting)
        self.assertEqual(self.successResultOf(self.oauth.token()), token)
        self.assertEqual(len(self.server.token_requests), 1)

    def test_connection_failure(self) -> None:
        """A transport failure is an AuthError naming the kind of failure."""

        class Refusing:
            def post(self, *args, **kwargs):
                return fail(ConnectionRefusedError("auth.example"))

        oauth = OAuth2ClientCredentials(Refusing(), self.clock, TOKEN_URL, "relay", SECRET)
        self.assert_auth_error(oauth.token(), "failed (ConnectionRefusedError)")

    def test_failure_not_cached(self) -> None:
        """After a failed fetch the next call tries again."""
        self.server.token_answer = (503, b"")
        self.failureResultOf(self.oauth.token(), AuthError)
        self.server.token_answer = None
        self.assertEqual(self.successResultOf(self.oauth.token()), self.server.issued[0])
        self.assertEqual(len(self.server.token_requests), 2)

    def test_failure_reaches_every_waiter(self) -> None:
        """A failed shared fetch fails every caller that waited for it."""
        self.server.hang = True
        first, second = self.oauth.token(), self.oauth.token()
        self.clock.advance(10)
        self.assert_auth_error(first, "did not answer")
        self.assert_auth_error(second, "did not answer")

    def test_repr_hides_secret(self) -> None:
        """The object's repr names the client and host but not the secret."""
        self.successResultOf(self.oauth.token())
        text = repr(self.oauth)
        self.assertIn("relay", text)
        self.assertNotIn(SECRET, text)
        self.assertNotIn(self.server.issued[0], text)


class FakeOAuthTests(SynchronousTestCase):
    """:class:`FakeOAuth` enforces what a real authorization server would."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.server = FakeOAuth({"relay": SECRET}, clock=self.clock, expires_in=60)
        self.stub = StubTreq(self.server)

    def test_expired_token_refused(self) -> None:
        """The protected resource refuses a token past its expires_in."""
        oauth = OAuth2ClientCredentials(self.stub, self.clock, TOKEN_URL, "relay", SECRET)
        token = self.successResultOf(oauth.token())
        self.clock.advance(60)
        response = self.successResultOf(
            self.stub.get("https://auth.example/api", headers={"Authorization": f"Bearer {token}"})
        )
        self.assertEqual(response.code, 401)
        self.assertEqual(
            response.headers.getRawHeaders("WWW-Authenticate"), ['Bearer error="invalid_token"']
        )

    def test_both_client_auth_methods_refused(self) -> None:
        """Basic and body credentials together are an invalid_request."""
        basic = b64encode(f"relay:{SECRET}".encode()).decode()
        response = self.successResultOf(
            self.stub.post(
                TOKEN_URL,
                data=b"grant_type=client_credentials&client_id=relay&client_secret=x",
                headers={
                    "Authorization": f"Basic {basic}",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(self.server.issued, [])
