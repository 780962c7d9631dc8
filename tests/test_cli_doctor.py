"""iampg doctor: one line per check against the emulator, the failing step named with its fix."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from iampg import Endpoint
from iampg.cli import main
from iampg.emulator import Backend, Emulator
from support import EmulatorFactory, endpoint_for

CHECKS = ["endpoint", "credentials", "token", "dns", "tcp", "tls", "authentication", "query"]


def doctor_args(emu: Emulator, *extra: str, host: str | None = None) -> list[str]:
    return [
        "doctor",
        host or emu.host,
        "--user",
        "postgres",
        "--port",
        str(emu.port),
        "--hostaddr",
        emu.listen_host,
        "--sslmode",
        "verify-full",
        "--sslrootcert",
        str(emu.ca_file),
        "--timeout",
        "5",
        *extra,
    ]


def statuses(out: str) -> dict[str, str]:
    """Map each check's name to PASS/WARN/FAIL/SKIP from the human report."""
    found = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in {"PASS", "WARN", "FAIL", "SKIP"}:
            found[words[1]] = words[0]
    return found


def run_json(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, dict[str, str]]]:
    code = main([*args, "--json"])
    report = json.loads(capsys.readouterr().out)
    return code, {check["name"]: check for check in report["checks"]}


def test_all_checks_pass_against_the_emulator(
    emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every check passes through the emulator; exit 0; no token in the output."""
    code = main(doctor_args(emulator))
    out = capsys.readouterr().out
    assert code == 0, out
    assert statuses(out) == dict.fromkeys(CHECKS, "PASS")
    assert "X-Amz-" not in out
    assert "verified (host name and chain" in out
    assert "commonName=" + emulator.host in out
    assert out.rstrip().endswith("all checks passed")


def test_json_report_lists_every_check(
    emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one JSON object with ok and a status per check, and nothing else."""
    code, checks = run_json(doctor_args(emulator), capsys)
    assert code == 0
    assert list(checks) == CHECKS
    assert {c["status"] for c in checks.values()} == {"pass"}
    assert checks["credentials"]["detail"].startswith("environment variables")


@pytest.fixture
def elsewhere(start_emulator: EmulatorFactory) -> Emulator:
    """An emulator whose host name does not imply a region, in us-east-1."""
    return start_emulator(hostnames=("db.emulator.test",), region="us-east-1")


def test_wrong_region_fails_authentication_with_its_causes(
    elsewhere: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token signed for another region: authentication fails, listing the region as a cause."""
    code = main(doctor_args(elsewhere, "--region", "eu-west-1"))
    out = capsys.readouterr().out
    assert code == 1
    found = statuses(out)
    assert found["token"] == "PASS"
    assert found["tls"] == "PASS"
    assert found["authentication"] == "FAIL"
    assert found["query"] == "SKIP"
    assert 'PAM authentication failed for user "postgres"' in out
    assert "eu-west-1" in out
    assert "likely causes" in out
    assert "fix:" in out
    assert "X-Amz-" not in out


def test_no_credentials_fails_the_credentials_step(
    emulator: Emulator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without AWS keys the credentials check fails with a fix; network checks still run."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, checks = run_json(doctor_args(emulator), capsys)
    assert code == 1
    assert checks["credentials"]["status"] == "fail"
    assert "AWS_PROFILE" in checks["credentials"]["fix"]
    assert checks["token"]["status"] == "skip"
    assert [checks[n]["status"] for n in ("dns", "tcp", "tls")] == ["pass"] * 3
    assert checks["authentication"]["status"] == "skip"


def closed_port() -> int:
    """Return a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_port_fails_the_tcp_step(
    emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening: the TCP check fails with a fix, the checks after it are skipped."""
    args = doctor_args(emulator)
    args[args.index("--port") + 1] = str(closed_port())
    args[args.index("--timeout") + 1] = "2"
    code, checks = run_json(args, capsys)
    assert code == 1
    assert checks["tcp"]["status"] == "fail"
    assert "security group" in checks["tcp"]["fix"]
    assert [checks[n]["status"] for n in ("tls", "authentication", "query")] == ["skip"] * 3
    assert checks["token"]["status"] == "pass"


def write_other_ca(path: Path) -> Path:
    """Write a CA certificate that did not sign the emulator's certificate to ``path``."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "another CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_untrusted_certificate_fails_the_tls_step(
    emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A CA file that did not sign the server's certificate: TLS fails and says what to pass."""
    other = write_other_ca(tmp_path / "other-ca.pem")
    args = doctor_args(emulator)
    args[args.index("--sslrootcert") + 1] = str(other)
    code, checks = run_json(args, capsys)
    assert code == 1
    assert checks["tls"]["status"] == "fail"
    assert "--sslrootcert" in checks["tls"]["fix"]
    assert checks["authentication"]["status"] == "skip"


def test_endpoint_without_region_fails_the_first_step(capsys: pytest.CaptureFixture[str]) -> None:
    """A host that names no region: the endpoint check fails; nothing is dialled."""
    code, checks = run_json(["doctor", "db.internal", "-U", "app"], capsys)
    assert code == 1
    assert checks["endpoint"]["status"] == "fail"
    assert "region" in checks["endpoint"]["detail"]
    assert [checks[n]["status"] for n in CHECKS[2:]] == ["skip"] * 6


def test_bad_timeout_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--timeout 0 is refused with exit 2 before any check runs."""
    assert main(["doctor", "db.internal", "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err


def test_dns_step_resolves_the_host_name(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without hostaddr the DNS check resolves the host (localhost) and the rest passes."""
    with Emulator(backend.dsn, hostnames=("localhost",), region="us-east-1") as emu:
        args = doctor_args(emu, "--region", "us-east-1")
        del args[args.index("--hostaddr") : args.index("--hostaddr") + 2]
        code, checks = run_json(args, capsys)
    assert code == 0, checks
    assert checks["dns"]["detail"].startswith("localhost → ")
    assert "127.0.0.1" in checks["dns"]["detail"]


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Return an empty home directory, HOME for the doctor and libpq alike."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    return path


def require_args(emu: Emulator) -> list[str]:
    """Return the doctor's arguments for ``sslmode=require`` and no ``sslrootcert``."""
    args = doctor_args(emu)
    args[args.index("--sslmode") + 1] = "require"
    del args[args.index("--sslrootcert") : args.index("--sslrootcert") + 2]
    return args


def require_endpoint(emu: Emulator) -> Endpoint:
    """Return the endpoint with ``sslmode=require`` and no ``sslrootcert``."""
    return endpoint_for(emu, sslmode="require", sslrootcert=None)


@pytest.mark.usefixtures("home")
def test_require_is_a_warning_not_a_failure(
    emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """sslmode=require: the TLS check warns "encrypted, not authenticated"; exit 0."""
    args = doctor_args(emulator)
    args[args.index("--sslmode") + 1] = "require"
    del args[args.index("--sslrootcert") : args.index("--sslrootcert") + 2]
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert statuses(out) == {**dict.fromkeys(CHECKS, "PASS"), "tls": "WARN"}
    assert "encrypted, not authenticated (sslmode=require checks nothing)" in out
    assert "chain checked" not in out
    assert "fix: use --sslmode verify-full" in out
    assert out.rstrip().endswith("all checks passed (warnings: tls)")
    code, checks = run_json(args, capsys)
    assert code == 0
    assert checks["tls"]["status"] == "warn"


def test_fresh_short_lived_certificate_is_not_due_for_renewal(
    emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """The emulator's week-long certificate, just made, is called short-lived, not ending."""
    code, checks = run_json(doctor_args(emulator), capsys)
    assert code == 0
    assert checks["tls"]["status"] == "pass"
    assert "short-lived certificate, expires in" in checks["tls"]["detail"]
    assert "renew" not in checks["tls"]["detail"]


@pytest.mark.parametrize(
    ("valid_days", "left_days", "text", "ending"),
    [
        (7, 6.9, "short-lived certificate, expires in 7 days", False),
        (7, 3, "short-lived certificate, expires in 3 days", False),
        (7, 1, "in 24 hours: renew it soon", True),
        (395, 20, "in 20 days: renew it soon", True),
        (395, 200, "", False),
        (395, -1, "(expired)", True),
    ],
)
def test_certificate_expiry_is_judged_by_the_validity_left(
    valid_days: float, left_days: float, text: str, ending: bool
) -> None:
    """Renewal is due with under 30 days and under a quarter of the validity left."""
    import datetime as dt

    from iampg._doctor import _expiry

    now = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    end = now + dt.timedelta(days=left_days)
    said, near = _expiry(end - dt.timedelta(days=valid_days), end, now)
    assert said.startswith(end.strftime("%Y-%m-%d"))
    assert text in said
    assert near is ending


def test_doctor_runs_without_the_command_line(emulator: Emulator) -> None:
    """Doctor takes an endpoint, a profile, a timeout and a stream; its report says the rest."""
    import io

    from iampg._doctor import Doctor

    out = io.StringIO()
    report = Doctor(endpoint_for(emulator), timeout=5, out=out).run()
    assert report.ok
    assert [c.name for c in report.checks] == CHECKS
    assert statuses(out.getvalue()) == dict.fromkeys(CHECKS, "PASS")
    assert json.loads(report.to_json())["ok"] is True
    assert report.summary() == "all checks passed"


def test_doctor_from_python_names_python_settings(emulator: Emulator) -> None:
    """Run from Python, the doctor's fixes name keyword arguments, not command-line options."""
    from iampg._doctor import Doctor

    report = Doctor(endpoint_for(emulator, sslmode="require"), timeout=5).run()
    tls = {c.name: c for c in report.checks}["tls"]
    assert report.ok
    assert tls.status == "warn"
    # A root certificate was given: libpq checks the chain, never the host name.
    assert "chain checked, host name not checked (sslmode=require with sslrootcert)" in tls.detail
    assert "any server with a certificate from this CA receives the token" in tls.detail
    assert "not authenticated" not in tls.detail
    assert tls.fix.startswith("use sslmode='verify-full' (with sslrootcert=... for")


def test_require_with_a_foreign_root_crt_fails_as_libpq_does(
    emulator: Emulator, capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    """~/.postgresql/root.crt exists: libpq checks the chain under require; so does the doctor."""
    root = write_other_ca(home / ".postgresql" / "root.crt")
    code, checks = run_json(require_args(emulator), capsys)
    assert code == 1
    tls = checks["tls"]
    assert tls["status"] == "fail"
    assert tls["detail"].startswith(
        f"the server certificate did not verify against {root} "
        "(libpq's default root certificate file): "
    )
    assert f"libpq verifies the server against {root} whenever that file exists" in tls["fix"]
    assert checks["authentication"]["status"] == "skip"
    # libpq itself refuses the same server with the same HOME
    import psycopg

    import iampg

    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        iampg.connect(require_endpoint(emulator)).close()


def test_require_with_the_servers_ca_in_root_crt_names_the_file(
    emulator: Emulator, capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    """The emulator's CA as ~/.postgresql/root.crt: chain checked, and the file named."""
    root = home / ".postgresql" / "root.crt"
    root.parent.mkdir()
    root.write_bytes(emulator.ca_file.read_bytes())
    code, checks = run_json(require_args(emulator), capsys)
    assert code == 0, checks
    tls = checks["tls"]
    assert tls["status"] == "warn"
    assert (
        "chain checked, host name not checked "
        "(sslmode=require with libpq's default root certificate file)"
    ) in tls["detail"]
    assert tls["detail"].endswith(f"; verified against {root}")


def test_pgsslrootcert_is_the_root_file_when_no_sslrootcert_is_given(
    emulator: Emulator, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PGSSLROOTCERT wins over root.crt, as in libpq, for the doctor run from Python too."""
    from iampg._doctor import Doctor

    write_other_ca(home / ".postgresql" / "root.crt")
    endpoint = require_endpoint(emulator)
    monkeypatch.setenv("PGSSLROOTCERT", str(emulator.ca_file))
    tls = {c.name: c for c in Doctor(endpoint, timeout=5).run().checks}["tls"]
    assert tls.status == "warn"
    assert "(sslmode=require with PGSSLROOTCERT)" in tls.detail
    assert tls.detail.endswith(f"; verified against {emulator.ca_file}")
    other = write_other_ca(home / "other.pem")
    monkeypatch.setenv("PGSSLROOTCERT", str(other))
    tls = {c.name: c for c in Doctor(endpoint, timeout=5).run().checks}["tls"]
    assert tls.status == "fail"
    assert f"did not verify against {other} (PGSSLROOTCERT)" in tls.detail


def test_require_with_a_missing_sslrootcert_checks_nothing_and_says_so(
    emulator: Emulator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """libpq reads a missing sslrootcert under require as no root file: nothing is checked."""
    missing = tmp_path / "missing.pem"
    code, checks = run_json([*require_args(emulator), "--sslrootcert", str(missing)], capsys)
    assert code == 0, checks
    assert checks["tls"]["status"] == "warn"
    assert (
        f"encrypted, not authenticated (sslmode=require checks nothing, {missing} does not exist)"
    ) in checks["tls"]["detail"]


def test_require_with_sslrootcert_system_is_refused_as_by_libpq(
    emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """libpq 16 and later refuse sslrootcert=system with a weaker sslmode than verify-full."""
    code, checks = run_json([*require_args(emulator), "--sslrootcert", "system"], capsys)
    assert code == 1
    assert checks["tls"]["detail"] == (
        'weak sslmode "require" may not be used with sslrootcert=system'
    )
    assert checks["tls"]["fix"] == "use --sslmode verify-full (or PGSSLMODE)"
