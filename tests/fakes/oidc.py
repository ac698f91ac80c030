"""Google's OIDC signing certificates endpoint on loopback, and ID tokens signed like Google's.

`CertsServer` serves what https://www.googleapis.com/oauth2/v1/certs serves, a JSON object
`{kid: PEM X.509 certificate}`, for keys generated in the test, and counts its fetches.
`mint_token` signs ID tokens shaped like the ones Eventarc sends; every header field and claim
can be replaced, or left out with `OMIT`, to make each bad case. `remove_signature` does to one
what Cloud Run IAM does before a private service sees it.
"""

import base64
import datetime
import enum
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Final, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt

INVOKER: Final = "eventarc-trigger@example-project.iam.gserviceaccount.com"
SERVICE_HOST: Final = "notifier-abc123-ew.a.run.app"
SERVICE_URL: Final = f"https://{SERVICE_HOST}"
GOOGLE_ISSUER: Final = "https://accounts.google.com"
# https://cloud.google.com/run/docs/troubleshooting#signature-removed
SIGNATURE_REMOVED: Final = "SIGNATURE_REMOVED_BY_GOOGLE"


class Omit(enum.Enum):
    OMIT = enum.auto()


OMIT: Final = Omit.OMIT
"""Pass as a claim or header value to leave that field out of the token."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    certificate_pem: str

    @classmethod
    def generate(cls, kid: str) -> Self:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fake-google-oidc-{kid}")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(private_key, hashes.SHA256())
        )
        certificate_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        return cls(kid=kid, private_key=private_key, certificate_pem=certificate_pem)


def mint_token(
    key: SigningKey,
    *,
    header: Mapping[str, object] | None = None,
    **claims: object,
) -> str:
    """An ID token like Google's for `INVOKER` and `SERVICE_URL`, valid for an hour from now.

    `claims` replace the defaults (iss, aud, azp, sub, email, email_verified, iat, exp);
    `header` replaces alg, kid or typ. `OMIT` removes a field.
    """
    issued_at = int(time.time())
    payload: dict[str, object] = {
        "iss": GOOGLE_ISSUER,
        "aud": SERVICE_URL,
        "azp": "112233445566778899000",
        "sub": "112233445566778899000",
        "email": INVOKER,
        "email_verified": True,
        "iat": issued_at,
        "exp": issued_at + 3600,
    }
    payload.update(claims)
    header_fields: dict[str, object] = {"alg": "RS256", "kid": key.kid, "typ": "JWT"}
    header_fields.update(header or {})
    # Encoded here rather than by jwt.encode, which always writes alg and typ.
    signing_input = ".".join(
        _segment({name: value for name, value in fields.items() if value is not OMIT})
        for fields in (header_fields, payload)
    )
    signer = crypt.RSASigner(key.private_key)  # type: ignore[no-untyped-call]
    signature: bytes = signer.sign(signing_input.encode())
    return f"{signing_input}.{_unpadded_b64(signature)}"


def remove_signature(token: str) -> str:
    """The token as Cloud Run IAM forwards it to a private service once it has checked it."""
    signed_part, _, _ = token.rpartition(".")
    return f"{signed_part}.{SIGNATURE_REMOVED}"


def _segment(fields: Mapping[str, object]) -> str:
    return _unpadded_b64(json.dumps(fields).encode())


def _unpadded_b64(data: bytes) -> str:
    # JWTs use unpadded base64url (RFC 7515, section 2).
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class CertsServer:
    """A certificates endpoint on 127.0.0.1, served from a background thread.

    `cache_control` is sent as the Cache-Control header (none when None); `status` other than
    200 answers that status with an empty object; `body` replaces the JSON document;
    `delay` seconds are waited before answering; `redirect_to` answers 302 to that URL;
    `hang_up` closes the connection without answering.
    """

    def __init__(self, *keys: SigningKey, cache_control: str | None = "public, max-age=3600"):
        self.cache_control = cache_control
        self.status = 200
        self.body: bytes | None = None
        self.delay = 0.0
        self.redirect_to: str | None = None
        self.hang_up = False
        self._lock = threading.Lock()
        self._certificates = {key.kid: key.certificate_pem for key in keys}
        self._fetches = 0
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fake-oidc-certs",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/oauth2/v1/certs"

    @property
    def fetches(self) -> int:
        with self._lock:
            return self._fetches

    def publish(self, key: SigningKey) -> None:
        with self._lock:
            self._certificates[key.kid] = key.certificate_pem

    def withdraw(self, kid: str) -> None:
        with self._lock:
            del self._certificates[kid]

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering: the port is closed, so fetches are refused."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _answer(self) -> tuple[int, bytes, str | None]:
        with self._lock:
            self._fetches += 1
            document = json.dumps(self._certificates).encode()
            status, body, cache_control = self.status, self.body, self.cache_control
        if status != 200:
            return status, b"{}", None
        return status, document if body is None else body, cache_control


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, endpoint: CertsServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.endpoint = endpoint


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        endpoint = self.server.endpoint
        if endpoint.delay:
            time.sleep(endpoint.delay)
        status, body, cache_control = endpoint._answer()
        if endpoint.hang_up:
            self.close_connection = True
            return
        if endpoint.redirect_to is not None:
            self.send_response(302)
            self.send_header("Location", endpoint.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        if cache_control is not None:
            self.send_header("Cache-Control", cache_control)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the test's output is the test's own."""
