"""The client side of a PostgreSQL login: cleartext, MD5 and SCRAM-SHA-256 answers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct

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
