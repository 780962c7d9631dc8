"""The client side of a PostgreSQL login: cleartext, MD5 and SCRAM-SHA-256 answers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from .protocol import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    pack_message,
    password_message,
)


class ScramClient:
    """The client half of SCRAM-SHA-256 (RFC 7677), without channel binding."""

    def __init__(self, password: str, *, user: str = "", nonce: str | None = None) -> None:
        self._password = password
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._first_bare = f"n={user},r={self._nonce}"
        self._server_signature = b""

    def first_message(self) -> bytes:
        return f"n,,{self._first_bare}".encode()

    def final_message(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self._nonce):
            raise ValueError("server nonce does not extend the client nonce")
        salted = hashlib.pbkdf2_hmac("sha256", self._password.encode(), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self._server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_final(self, server_final: bytes) -> None:
        attrs = dict(item.split("=", 1) for item in server_final.decode().split(",") if "=" in item)
        if "v" not in attrs or not hmac.compare_digest(
            base64.b64decode(attrs["v"]), self._server_signature
        ):
            raise ValueError("the server's SCRAM signature does not match")


class BackendAuthError(Exception):
    """The gateway cannot log in to the backend; the client gets this error."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class BackendLogin:
    """Answers the backend's authentication requests with a password.

    Args:
        user: The user logging in (MD5 salts the password with it).
        password: The password; None to refuse any request for one.
        who: Who logs in, prefixed to the error messages (``"iampg emulator"``...).
        missing: What the error for a password asked for and absent says, after ``who``.
    """

    def __init__(
        self,
        user: str,
        password: str | None,
        *,
        who: str = "iampg emulator",
        missing: str = "the backend server asks for a password "
        "and the backend connection string has none",
    ) -> None:
        self._user = user
        self._who = who
        self._missing = missing
        self._password = password
        self._scram: ScramClient | None = None

    def answer(self, code: int, data: bytes) -> bytes | None:
        """Return the message answering AuthenticationRequest ``code``, or None for none."""
        if code == AUTH_SASL_CONTINUE and self._scram is not None:
            return pack_message(b"p", self._scram.final_message(data))
        if code == AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.verify_final(data)
            except ValueError:
                raise BackendAuthError(
                    "28000", f"{self._who}: the backend server failed SCRAM verification"
                ) from None
            return None
        if code not in (AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL):
            raise BackendAuthError(
                "28000",
                f"{self._who}: the backend server asks for an unsupported "
                f"authentication method ({code})",
            )
        password = self._password
        if password is None:
            raise BackendAuthError("28P01", f"{self._who}: {self._missing}")
        if code == AUTH_CLEARTEXT:
            return password_message(password)
        if code == AUTH_MD5:
            inner = hashlib.md5((password + self._user).encode()).hexdigest()  # noqa: S324
            outer = hashlib.md5(inner.encode() + data[:4]).hexdigest()  # noqa: S324
            return password_message(f"md5{outer}")
        if b"SCRAM-SHA-256" not in data.split(b"\0"):
            raise BackendAuthError(
                "28000", f"{self._who}: the backend server offers no SCRAM-SHA-256"
            )
        self._scram = ScramClient(password)
        first = self._scram.first_message()
        return pack_message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first)


@dataclass(frozen=True, repr=False)
class ScramVerifier:
    """What a server keeps to check SCRAM-SHA-256 proofs: never the password itself."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(cls, password: str, *, iterations: int = 4096) -> ScramVerifier:
        """Derive the verifier of ``password`` with a new random salt."""
        salt = secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        return cls(
            salt,
            iterations,
            hashlib.sha256(client_key).digest(),
            hmac.new(salted, b"Server Key", hashlib.sha256).digest(),
        )

    def __repr__(self) -> str:
        return "ScramVerifier(<hidden>)"


class ScramError(Exception):
    """A SCRAM exchange failed: a malformed message or a wrong password."""


class ScramServer:
    """The server half of SCRAM-SHA-256 (RFC 7677) without channel binding, for one login."""

    MECHANISM = "SCRAM-SHA-256"

    def __init__(self, verifier: ScramVerifier) -> None:
        self._verifier = verifier
        self._gs2 = ""
        self._first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def server_first(self, client_first: bytes) -> bytes:
        """Answer the client-first message.

        Raises:
            ScramError: The message is malformed or asks for channel binding.
        """
        try:
            text = client_first.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("malformed SCRAM message") from None
        parts = text.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y"):  # noqa: PLR2004
            raise ScramError("malformed SCRAM message (channel binding is not offered)")
        self._gs2 = f"{parts[0]},{parts[1]},"
        self._first_bare = parts[2]
        attrs = _attributes(self._first_bare)
        client_nonce = attrs.get("r", "")
        if not client_nonce or "m" in attrs:
            raise ScramError("malformed SCRAM message")
        self._nonce = client_nonce + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self._verifier.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self._verifier.iterations}"
        return self._server_first.encode()

    def server_final(self, client_final: bytes) -> bytes:
        """Check the client's proof and return the server-final message.

        Raises:
            ScramError: The message is malformed, or the proof is wrong (wrong password).
        """
        try:
            text = client_final.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("malformed SCRAM message") from None
        without_proof, sep, proof_text = text.rpartition(",p=")
        attrs = _attributes(without_proof)
        expected_binding = base64.b64encode(self._gs2.encode()).decode()
        if not sep or attrs.get("c") != expected_binding or attrs.get("r") != self._nonce:
            raise ScramError("malformed SCRAM message")
        try:
            proof = base64.b64decode(proof_text, validate=True)
        except ValueError:
            raise ScramError("malformed SCRAM message") from None
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        verifier = self._verifier
        signature = hmac.new(verifier.stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(signature):
            raise ScramError("wrong password")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key):
            raise ScramError("wrong password")
        server_signature = hmac.new(verifier.server_key, auth_message, hashlib.sha256).digest()
        return f"v={base64.b64encode(server_signature).decode()}".encode()


def _attributes(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)
