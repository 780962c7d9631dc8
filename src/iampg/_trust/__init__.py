"""The shipped AWS trust store: which CA file verifies which endpoint's certificate.

The PEM files beside this module are built by ``tools/build_trust_store.py`` from AWS's
published certificates; ``manifest.json`` records where each certificate came from, its
fingerprint and validity, and when the store was built. Nothing is read at import time: a
file name is chosen from the endpoint, and the manifest is read only by :func:`describe`,
:func:`pieces` (once per CA file narrowed) and the ``iampg ca`` command.

Which file an endpoint gets (libpq reads the whole file on every connection, so each is as
small as what the endpoint's certificate chains to; and since an instance's certificate
chains to one CA of its region's set, ``iampg._narrow`` then learns, per server, which
certificate of the file verifies it and gives libpq that one alone; see that module):

- RDS and Aurora instance endpoints: ``rds-<region>.pem``, that region's RDS CAs
  (rds-ca-rsa2048-g1, AWS's default for new instances, first; then rds-ca-rsa4096-g1 and
  rds-ca-ecc384-g1: the order in which iampg tries them alone).
- Aurora cluster endpoints (``.cluster-``, ``.cluster-ro-``, ``.cluster-custom-``):
  ``aws-<region>.pem``, the region's RDS CAs plus Amazon Root CA 1. Why that root too: an
  Aurora PostgreSQL cluster in the express configuration is reached through an internet
  access gateway (a proxy layer in front of the cluster) under the same
  ``<name>.cluster-<id>.<region>.rds.amazonaws.com`` name as any cluster, and AWS does not
  document which CA that gateway's certificate chains to. The AWS front ends that sit in
  front of databases and are documented use AWS Certificate Manager certificates, which
  chain to the Amazon public roots: RDS Proxy ("RDS Proxy uses certificates from AWS
  Certificate Manager"), Aurora Serverless v1 ("downloading Amazon RDS certificates isn't
  required"), Aurora DSQL ("your client system must trust Amazon Root CA 1"). A cluster
  endpoint's name cannot tell an express cluster from a provisioned one, so its file covers
  both chains. Only Root CA 1, not all five public roots: libpq parses the whole file on
  every connection, and on the emulator a file of the RDS CAs and all five roots made a
  verified connect 2.5-8 % slower than the RDS CAs alone (benchmarks/tls.py, two runs of 300
  rounds; 4 and 9 certificates with the emulator's CA). If the gateway's chain turns out to
  end elsewhere, the verification error names the file and ``IAMPG_SSLROOTCERT`` fixes it.
  Instance endpoints, which the express configuration does not expose, keep the RDS CAs
  alone.
- RDS Proxy endpoints (a ``proxy-`` label): ``amazon-roots.pem`` (Amazon Root CA 1-4,
  Starfield Services Root CA G2).
- Aurora DSQL: ``amazon-root-ca-1.pem``, Amazon Root CA 1 alone, the root AWS says a DSQL
  client must trust (one certificate: a verified DSQL connect parses 1 certificate, not 5).
- A host name that is not an AWS name (a tunnel alias, a private DNS name, the emulator):
  ``aws-<region>.pem``, since the name does not say what is behind it.
- A region without a file of its own (not in the store yet): ``rds-global.pem``, every
  region's RDS CAs and the public roots.

The environment variable ``IAMPG_SSLROOTCERT`` names a file to use instead (a newer bundle
from AWS, a private CA, the emulator's CA); ``IAMPG_SSLROOTCERT=system`` passes libpq's
``sslrootcert=system`` (libpq >= 16: the operating system's store). Such a file, or an
``sslrootcert`` given, is narrowed like iampg's own when it holds 2 to 5 certificates (an
AWS region bundle, say), in its own order; a larger one and ``system`` are read whole.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iampg.errors import ConfigurationError

if TYPE_CHECKING:
    from iampg._endpoint import Endpoint

__all__ = ["ENV_VAR", "describe", "directory", "override", "pieces", "root_file"]

ENV_VAR = "IAMPG_SSLROOTCERT"
"""The environment variable that names a CA file to use instead of the shipped store."""

_DIR = Path(__file__).resolve().parent
_AWS_RDS_NAME = re.compile(r"\.rds\.amazonaws\.com(?:\.cn)?$")
AMAZON_ROOTS = "amazon-roots.pem"
AMAZON_ROOT_CA_1 = "amazon-root-ca-1.pem"
GLOBAL = "rds-global.pem"


def directory() -> Path:
    """Return the directory that holds the shipped trust store."""
    return _DIR


@cache
def _shipped() -> frozenset[str]:
    return frozenset(p.name for p in _DIR.glob("*.pem"))


def covers(region: str) -> bool:
    """Tell whether the store holds a CA set of the region's own (not only the fallback)."""
    return f"rds-{region}.pem" in _shipped()


def _regional(prefix: str, region: str) -> Path:
    name = f"{prefix}-{region}.pem"
    return _DIR / (name if name in _shipped() else GLOBAL)


def override(environ: Mapping[str, str] | None = None) -> Path | None:
    """Return the CA file ``IAMPG_SSLROOTCERT`` names, or None when it is not set.

    Raises:
        ConfigurationError: It names a file that does not exist.
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    if not value:
        return None
    if value == "system":
        return Path(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigurationError(
            f"{ENV_VAR} names {value!r}, which is not a file: point it at a PEM file of CA "
            f"certificates (for example AWS's global-bundle.pem), or unset it to use iampg's "
            f"shipped trust store"
        )
    return path


def root_file(endpoint: Endpoint, *, environ: Mapping[str, str] | None = None) -> Path:
    """Return the smallest CA file that holds what the endpoint's certificate chains to.

    Args:
        endpoint: The endpoint whose certificate libpq will verify.
        environ: Where to look up ``IAMPG_SSLROOTCERT`` (default: ``os.environ``).

    Returns:
        The path to pass as libpq's ``sslrootcert``: the file ``IAMPG_SSLROOTCERT`` names
        when it is set, else one of the shipped files (see the module docstring).

    Raises:
        ConfigurationError: ``IAMPG_SSLROOTCERT`` names a file that does not exist.
    """
    if (chosen := override(environ)) is not None:
        return chosen
    if endpoint.kind == "dsql":
        return _DIR / AMAZON_ROOT_CA_1
    host = endpoint.host.lower()
    if not _AWS_RDS_NAME.search(host):
        return _regional("aws", endpoint.region)
    labels = host.split(".")
    if any(label.startswith("proxy-") for label in labels):
        return _DIR / AMAZON_ROOTS
    if any(label.startswith("cluster-") for label in labels):
        return _regional("aws", endpoint.region)
    return _regional("rds", endpoint.region)


def pieces(path: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """Return the shipped one-certificate files of a shipped file, in the order to try them.

    None for a file that is not iampg's or has none (``iampg._narrow`` then splits it
    itself). ``rds-<region>.pem`` has ``ca-<region>-rsa2048.pem``, ``-rsa4096`` and
    ``-ecc384``; ``aws-<region>.pem`` the same and ``amazon-root-ca-1.pem``.
    """
    candidate = _store_file(path)
    if candidate is None:
        return None
    info = _manifest()["files"].get(candidate.name) or {}
    names = info.get("pieces")
    return None if not names else tuple(str(_DIR / name) for name in names)


def _store_file(path: str | os.PathLike[str]) -> Path | None:
    """Return ``path`` if it names a file of the shipped store (symbolic links resolved)."""
    candidate = Path(path)
    try:
        return candidate if candidate.resolve().parent == _DIR else None
    except (OSError, RuntimeError):
        return None


@cache
def _manifest() -> dict[str, Any]:
    import json  # noqa: PLC0415 -- read only by describe() and `iampg ca`

    data: dict[str, Any] = json.loads((_DIR / "manifest.json").read_text(encoding="utf-8"))
    return data


def built() -> dt.date:
    """Return the date the shipped store was built."""
    return dt.date.fromisoformat(_manifest()["built"])


def _age(today: dt.date | None = None) -> str:
    days = ((today or dt.datetime.now(dt.timezone.utc).date()) - built()).days
    return f"{built().isoformat()}, {days} day{'' if days == 1 else 's'} ago"


def _what(info: Mapping[str, Any]) -> str:
    region = info.get("region")
    if info["kind"] == "amazon-roots":
        return "Amazon public roots (RDS Proxy)"
    if info["kind"] == "amazon-root-ca-1":
        return "Amazon Root CA 1 (Aurora DSQL)"
    if region == "*":
        return (
            "RDS CA set of every region the store holds (not GovCloud, China or regions "
            "newer than the store), with the Amazon public roots"
        )
    if info["kind"] == "aws":
        return f"RDS CA set for {region}, with Amazon Root CA 1"
    if info["kind"] == "ca":
        return f"one RDS CA of {region}"
    return f"RDS CA set for {region}"


def describe(path: str | os.PathLike[str], *, today: dt.date | None = None) -> str | None:
    """Return a one-line summary of a shipped CA file, or None for a file that is not iampg's.

    Example: ``iampg's RDS CA set for us-east-1: 3 certificates, built 2026-12-02, 0 days
    ago``.

    Args:
        path: A CA file, as given to libpq's ``sslrootcert``.
        today: The date to count the age from (default: today).
    """
    candidate = _store_file(path)
    if candidate is None:
        return None
    info = _manifest()["files"].get(candidate.name)
    if info is None:
        return None
    count = len(info["certificates"])
    plural = "" if count == 1 else "s"
    return f"iampg's {_what(info)}: {count} certificate{plural}, built {_age(today)}"


def report(*, today: dt.date | None = None) -> list[str]:
    """Return lines describing the whole store: where, how old, what it holds."""
    manifest = _manifest()
    certs = {c["sha256"]: c for c in manifest["certificates"]}
    files = manifest["files"]
    regions = sorted({i["region"] for i in files.values() if i.get("region") not in (None, "*")})
    earliest = min(certs.values(), key=lambda c: c["not_after"])
    rds = sum(c["role"] == "rds" for c in certs.values())
    roots = sum(c["role"] == "amazon-root" for c in certs.values())
    lines = [
        f"trust store: {_DIR}",
        f"built: {_age(today)}",
        (
            f"contents: {len(files)} files, {len(certs)} certificates ({rds} RDS CAs for "
            f"{len(regions)} regions, {roots} Amazon public roots)"
        ),
        f"earliest expiry: {earliest['not_after'][:10]} ({_subject_cn(earliest['subject'])})",
        f"regions: {' '.join(regions)}",
    ]
    for name in (AMAZON_ROOTS, AMAZON_ROOT_CA_1, GLOBAL):
        count = len(files[name]["certificates"])
        plural = "" if count == 1 else "s"
        lines.append(f"{name}: {count} certificate{plural}: {_what(files[name])}")
    for prefix, what in (("rds", "the region's RDS CAs"), ("aws", "the same + Amazon Root CA 1")):
        counts = sorted(
            {len(i["certificates"]) for n, i in files.items() if _per_region(n, prefix)}
        )
        span = "-".join(dict.fromkeys(str(c) for c in (counts or [0])[:: max(len(counts) - 1, 1)]))
        lines.append(f"{prefix}-<region>.pem: {span} certificates each: {what}")
    alone = sum(info["kind"] == "ca" for info in files.values())
    lines.append(
        f"ca-<region>-<rsa2048|rsa4096|ecc384>.pem: {alone} files of 1 certificate: each RDS CA "
        "alone, what a verified connect reads once iampg has learned the server's CA"
    )
    return lines


def _per_region(name: str, prefix: str) -> bool:
    return name.startswith(f"{prefix}-") and name not in (GLOBAL, AMAZON_ROOTS, AMAZON_ROOT_CA_1)


def _subject_cn(subject: str) -> str:
    match = re.search(r"CN=((?:[^,\\]|\\.)*)", subject)
    return match.group(1) if match else subject
