"""Throwaway certificate authority and server certificate for the emulator's TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iampg._wire.protocol import ALPN_PROTOCOL

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

__all__ = ["ALPN_PROTOCOL", "TlsFiles", "make_certificates", "server_context"]

_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")
_VALIDITY = dt.timedelta(days=7)
_BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files written by :func:`make_certificates`.

    Attributes:
        ca_file: The CA certificate, for ``sslrootcert``.
        cert_file: The server certificate.
        key_file: The server's private key (unencrypted, readable by the owner only).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alt_names(hostnames: Sequence[str], *, loopback: bool) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    extra = (*_LOOPBACK_NAMES, *_LOOPBACK_IPS) if loopback else ()
    for name in (*hostnames, *extra):
        key = name.lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_certificates(
    hostnames: Sequence[str],
    directory: Path,
    *,
    loopback: bool = False,
    organization: str = "iampg emulator",
) -> TlsFiles:
    """Create a CA and a server certificate it signed, and write both as PEM files.

    The server certificate names every host name in its subject alternative names, and
    nothing else, as a production endpoint's does: ``sslmode=verify-full`` with
    ``sslrootcert`` set to the CA file works for those names only (dial another address
    with ``hostaddr``). Keys are EC P-256: fast to make. Both certificates are valid from an
    hour ago for a week.

    Args:
        hostnames: DNS names (or IP literals) the server answers to.
        directory: An existing private directory to write the files in.
        loopback: Also name ``localhost``, ``127.0.0.1`` and ``::1``.
        organization: The organisation both certificates name (the CA is
            ``<organization> CA``): what a client's error messages show.

    Returns:
        The paths of the files written.
    """
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - _BACKDATE, now + _VALIDITY
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{organization} CA", organization)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0] if hostnames else "localhost", organization))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_subject_alt_names(hostnames, loopback=loopback), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.touch(mode=0o600)
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """Return a server-side TLS context (TLS 1.2+, ALPN ``postgresql``) for the files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert_file, files.key_file)
    context.set_alpn_protocols([ALPN_PROTOCOL])
    return context
