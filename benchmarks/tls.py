"""What verifying the server certificate adds to a new connection, by CA file size.

libpq reads the whole ``sslrootcert`` file on every connection, so a verified connect costs
the handshake's checks plus parsing that file. Each variant connects to the emulator with
the same token; only the TLS settings differ:

- ``require``: encrypted, certificate not checked (the opt-out).
- ``verify-full, 1 certificate``: the emulator's CA alone: what verifying costs besides
  reading a larger file.
- ``verify-full, rds-<region> size``: the file an RDS instance endpoint gets, with the
  emulator's CA in the place of the CA the server's chain ends in: the region's RSA4096 and
  ECC384 CAs and the emulator's CA (3 certificates, as in ``rds-<region>.pem``; the
  emulator's key is EC P-256, like an instance using rds-ca-ecc384-g1 signs with EC).
- ``verify-full, aws-<region> size``: the same plus Amazon Root CA 1, the file a cluster
  endpoint or a non-AWS host name gets (4 certificates, as in ``aws-<region>.pem``).
- ``verify-full, system store``: the operating system's bundle with the emulator's CA
  appended, what ``sslrootcert=system`` (libpq >= 16) makes libpq read.
- ``iampg verify-full, rds-<region> file``: :func:`iampg.connect` with the 3-certificate
  file above as the endpoint's CA file, in steady state: iampg has learned (after two
  trials that missed, made before timing) which one certificate verifies the emulator and
  gives libpq that certificate alone. Compared with ``iampg require``, :func:`iampg.connect`
  with ``sslmode=require``, so both sides pay iampg's own work (parameters checked, cached
  token); this is the row with the bar, ≤ 1.05x. The file is not one iampg ships (none
  holds the emulator's CA), so iampg splits it into its temporary directory instead of
  using the store's one-CA files: either way libpq reads a 1-certificate file.

The raw psycopg rows are context (what each file size costs libpq), reported only.

Rounds run each variant once in a shuffled order (seeded), the garbage collector untimed
before each connect; a verified variant's cost is the median of its per-round ratios to
``require`` (``iampg require`` for the iampg row) in the same round, with a bootstrap 95 %
interval of that median and the interquartile range of the ratios as spread.
``IAMPG_BENCH_TLS_ROUNDS`` sets the number of rounds (default 300; 40 with ``--quick``).
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

import iampg
from benchmarks._common import EmulatorInfo, Result, Stats, median_interval, ms, percentile
from iampg import Endpoint, TokenProvider, _trust

SYSTEM_BUNDLES = (
    Path("/etc/ssl/certs/ca-certificates.crt"),  # Debian, Ubuntu, Alpine
    Path("/etc/pki/tls/certs/ca-bundle.crt"),  # Fedora, RHEL
    Path("/etc/ssl/cert.pem"),  # macOS, BSD
)
REQUIRE = "require"
ONE = "verify-full, 1 certificate"
SMALL = "verify-full, rds-<region> size"
MEDIUM = "verify-full, aws-<region> size"
SYSTEM = "verify-full, system store"
IAMPG_REQUIRE = "iampg require"
IAMPG = "iampg verify-full, rds-<region> file"


def _certs(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    blocks = data.split(marker)[:-1]
    return [b[b.index(b"-----BEGIN CERTIFICATE-----") :] + marker + b"\n" for b in blocks]


def _cn(pem: bytes) -> str:
    """Return a certificate's common name."""
    from cryptography import x509  # noqa: PLC0415 -- only when the files are written
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    attrs = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _ca_files(emu: EmulatorInfo, workdir: Path) -> dict[str, tuple[Path, int]]:
    """Write the CA files each verified variant reads; return (path, certificates) per variant."""
    ca = Path(emu.ca_file).read_bytes()
    shipped = _trust.directory()
    (workdir / "ca.pem").write_bytes(ca)
    files: dict[str, tuple[Path, int]] = {ONE: (workdir / "ca.pem", 1)}
    # The region's CAs without its RSA2048 one, whose place the emulator's CA takes.
    region = _certs((shipped / "rds-us-east-1.pem").read_bytes())
    kept = [c for c in region if _cn(c) != "Amazon RDS us-east-1 Root CA RSA2048 G1"]
    root_ca_1 = _certs((shipped / "amazon-root-ca-1.pem").read_bytes())
    for name, certs, file in (
        (SMALL, kept, "rds-us-east-1.pem"),
        (MEDIUM, kept + root_ca_1, "aws-us-east-1.pem"),
    ):
        path = workdir / file
        path.write_bytes(b"".join(certs) + ca)
        files[name] = (path, len(certs) + 1)
    for system in SYSTEM_BUNDLES:
        if system.is_file():
            certs = _certs(system.read_bytes())
            path = workdir / "system.pem"
            path.write_bytes(b"".join(certs) + ca)
            files[SYSTEM] = (path, len(certs) + 1)
            break
    return files


def _measure(
    variants: dict[str, Callable[[], Any]], rounds: int
) -> tuple[dict[str, Stats], dict[str, list[float]]]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm caches and the emulator's TLS state
        fn().close()
    order = list(variants.items())
    rng = random.Random(20261202)
    for _ in range(rounds):
        rng.shuffle(order)
        for name, fn in order:
            gc.collect()
            start = time.perf_counter()
            conn = fn()
            samples[name].append(time.perf_counter() - start)
            conn.close()
    ratios = {
        name: [v / r for v, r in zip(values, samples[_BASELINE[name]], strict=True)]
        for name, values in samples.items()
        if name not in _BASELINE.values()
    }
    return {name: Stats.of(values) for name, values in samples.items()}, ratios


# What each variant is compared with, paired per round.
_BASELINE = {ONE: REQUIRE, SMALL: REQUIRE, MEDIUM: REQUIRE, SYSTEM: REQUIRE, IAMPG: IAMPG_REQUIRE}


def _learned(endpoint: Any, provider: TokenProvider) -> str:
    """Connect until iampg verifies with one certificate; return the file libpq then reads."""
    used = ""
    for _ in range(6):  # two trials miss (the emulator's CA is last), the third verifies
        with iampg.connect(endpoint, provider=provider) as conn:
            used = next(
                o.val or b"" for o in conn.pgconn.info if o.keyword == b"sslrootcert"
            ).decode()
    return used


def _connect_with(base: dict[str, Any], sslrootcert: str, token: str) -> Callable[[], Any]:
    return lambda: psycopg.connect(**base, sslrootcert=sslrootcert, password=token)


def run(rds: EmulatorInfo, *, quick: bool = False, rounds: int | None = None) -> list[Result]:
    """Time the variants; the bar: iampg's verify-full with a region file <= 1.05x require."""
    rounds = rounds or int(os.environ.get("IAMPG_BENCH_TLS_ROUNDS", "0")) or (40 if quick else 300)
    provider = TokenProvider(rds.endpoint("postgres"))
    token = provider.token()
    base = {k: v for k, v in rds.conninfo("postgres").items() if k != "sslrootcert"}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="iampg-bench-tls-") as tmp:
        files = _ca_files(rds, Path(tmp))
        variants: dict[str, Callable[[], Any]] = {
            REQUIRE: lambda: psycopg.connect(**{**base, "sslmode": "require"}, password=token),
        }
        for name, (path, _) in files.items():
            variants[name] = _connect_with(base, str(path), token)
        region_file, count = files[SMALL]
        narrowed = rds.endpoint("postgres", sslrootcert=str(region_file))
        opted_out = Endpoint(
            rds.host,
            user="postgres",
            port=rds.port,
            hostaddr=rds.listen_host,
            region=rds.region,
            sslmode="require",
            connect_timeout="10",
        )
        learned = _learned(narrowed, provider)
        files[IAMPG] = (region_file, count)
        variants[IAMPG] = lambda: iampg.connect(narrowed, provider=provider)
        variants[IAMPG_REQUIRE] = lambda: iampg.connect(opted_out, provider=provider)
        stats, ratios = _measure(variants, rounds)
        still = _learned(narrowed, provider)
    load_after = os.getloadavg()
    results = []
    for name, values in ratios.items():
        path, count = files[name]
        baseline = _BASELINE[name]
        median = statistics.median(values)
        low, high = percentile(values, 0.25), percentile(values, 0.75)
        ci_low, ci_high = median_interval(values)
        extra = stats[name].median - stats[baseline].median
        barred = name == IAMPG
        if barred:
            read = "1 certificate" if learned != str(path) else "all of it"
            what = (
                f"new connection, iampg.connect with a {count}-certificate rds-<region> file, "
                f"steady state (libpq reads {read})"
            )
            compared = "iampg.connect with sslmode=require, paired per round"
            rid = "tls_iampg"
        else:
            what = f"new connection, {name} ({count} certificates in sslrootcert)"
            compared = "the same connect with sslmode=require, paired per round"
            rid = "tls_" + name.split(", ")[1].split(" ")[0].replace("<region>", "region")
        results.append(
            Result(
                id=rid,
                what=what,
                compared_with=compared,
                figures=(
                    f"{name} {ms(stats[name].median)} vs {baseline} "
                    f"{ms(stats[baseline].median)} ({extra * 1e3:+.2f} ms); load average "
                    f"{load_before[0]:.2f} -> {load_after[0]:.2f}; {rounds} rounds"
                ),
                claim=(
                    f"{median:.3f}x {baseline} (median of per-round ratios, 95 % interval "
                    f"{ci_low:.3f}-{ci_high:.3f}, IQR {low:.3f}-{high:.3f})"
                ),
                bar="≤ 1.05x iampg require" if barred else "report only",
                passed=median <= 1.05 if barred else None,
                ratio=median,
                details={
                    "unit": "seconds per connect+close",
                    "certificates": count,
                    "certificates_read": 1 if barred and learned != str(path) else count,
                    "learned_file_kept": learned == still if barred else None,
                    "ratio_p25": low,
                    "ratio_p75": high,
                    "ratio_median_95ci": (ci_low, ci_high),
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                    **{k: v.__dict__ for k, v in stats.items()},
                },
            )
        )
    return results
