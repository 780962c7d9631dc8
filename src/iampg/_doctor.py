"""The connection doctor: one check after another, each naming what failed and the fix.

Built from an endpoint, an AWS profile, a timeout and an output stream; the ``iampg doctor``
command only parses its arguments into those and prints the report.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from iampg._connecting import DEFAULT_ROOT_SOURCE, RootFile, libpq_root_file
from iampg._dsn import connect_params
from iampg._endpoint import Endpoint, _infer
from iampg._options import option
from iampg._tokens import TokenProvider
from iampg.errors import AuthenticationError, ConfigurationError, Error

__all__ = ["Check", "Doctor", "Report", "Status"]

Status = Literal["pass", "warn", "fail", "skip"]
"""``warn``: the check passed with a reservation worth fixing (it does not fail the run)."""

_LABELS: dict[Status, str] = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}


@dataclass
class Check:
    """One line of the doctor's report.

    Attributes:
        name: The check (``endpoint``, ``credentials``, ``token``, ``dns``, ``tcp``, ``tls``,
            ``authentication``, ``query``).
        status: ``pass``, ``warn``, ``fail`` or ``skip``.
        detail: What the check found; never a secret.
        fix: What to do about a failure or a warning, or ``""``.
    """

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Report:
    """Every check the doctor ran, in order.

    Attributes:
        checks: The checks.
    """

    checks: list[Check]

    @property
    def ok(self) -> bool:
        """Whether no check failed (warnings do not count)."""
        return all(check.status != "fail" for check in self.checks)

    def summary(self) -> str:
        """Return the closing line: all passed (with any warnings), or what failed."""
        if not self.ok:
            return f"failed: {', '.join(c.name for c in self.checks if c.status == 'fail')}"
        warned = [check.name for check in self.checks if check.status == "warn"]
        return (
            f"all checks passed (warnings: {', '.join(warned)})"
            if warned
            else ("all checks passed")
        )

    def to_json(self) -> str:
        """Return the report as one JSON object: ``ok`` and the checks."""
        return json.dumps({"ok": self.ok, "checks": [asdict(c) for c in self.checks]}, indent=2)


class _CheckFailedError(Exception):
    """A doctor check failed: ``detail`` says what happened, ``fix`` what to do."""

    def __init__(self, detail: str, fix: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


class _Warned(Exception):  # noqa: N818 -- not an error: a check that passed with a reservation
    """A check passed with a reservation: ``detail`` says what, ``fix`` what to do."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_VERIFYING_MODES = frozenset({"verify-ca", "verify-full"})
_EXPIRY_WARNING = dt.timedelta(days=30)  # a certificate expiring sooner may need renewing ...
_EXPIRY_FRACTION = 0.25  # ... unless it still has this much of its validity left (short-lived)
_PSYCOPG_FIX = (
    "pip install 'psycopg[binary]' (or install the system's libpq) where the doctor runs; "
    "the checks above ran without it, and an asyncpg-only program does not need it"
)
_CREDENTIALS_FIX = (
    "set AWS_PROFILE (then `aws sso login` if it uses SSO), or AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, or run where a role is attached; check with "
    "`aws sts get-caller-identity`"
)


class Doctor:
    """Diagnose a connection: run the checks in order, each using what earlier ones found.

    Args:
        endpoint: The endpoint, or a function that builds it: its
            :class:`iampg.ConfigurationError` becomes the failed ``endpoint`` check.
        profile: The AWS profile to sign with (default: botocore's default chain).
        timeout: Seconds each network check may take.
        out: Where each check's line is written as soon as it is done, or ``None``.
        allow_insecure: Allow an ``sslmode`` that may send the token unencrypted to a host
            other than loopback (as :func:`iampg.connect` does).
        preset: The service preset whose connection defaults apply (see
            :func:`iampg.connect`); by default the endpoint's service's.

    Raises:
        ConfigurationError: ``timeout`` is not a positive number of seconds.
    """

    def __init__(
        self,
        endpoint: Endpoint | Callable[[], Endpoint],
        *,
        profile: str | None = None,
        timeout: float = 10.0,
        out: TextIO | None = None,
        allow_insecure: bool = False,
        preset: str | None = None,
    ) -> None:
        if not timeout > 0:
            raise ConfigurationError(f"the timeout must be more than 0 seconds, not {timeout}")
        self._make_endpoint = endpoint if callable(endpoint) else lambda: endpoint
        self.profile = profile
        self.timeout = float(timeout)
        self.out = out
        self.allow_insecure = allow_insecure
        self.preset = preset  # the service's connection defaults (None: from the endpoint)
        self.endpoint: Endpoint | None = None
        self.params: dict[str, str] = {}
        self.provider: TokenProvider | None = None
        self.addresses: list[str] = []
        self.checks: list[Check] = []
        self.connection: Any = None  # the psycopg connection the authentication check opened

    def run(self) -> Report:
        """Run every check (a check whose prerequisite failed is skipped); return the report."""
        try:
            return Report(self._run())
        finally:
            if self.connection is not None:
                self.connection.close()
                self.connection = None

    def _run(self) -> list[Check]:
        steps: list[tuple[str, Callable[[], str], tuple[str, ...]]] = [
            ("endpoint", self.check_endpoint, ()),
            ("credentials", self.check_credentials, ()),
            ("token", self.check_token, ("endpoint", "credentials")),
            ("dns", self.check_dns, ("endpoint",)),
            ("tcp", self.check_tcp, ("dns",)),
            ("tls", self.check_tls, ("tcp",)),
            ("authentication", self.check_auth, ("token", "tcp", "tls")),
            ("query", self.check_query, ("authentication",)),
        ]
        status: dict[str, Status] = {}
        for name, step, needs in steps:
            blocked = [n for n in needs if status.get(n) == "fail"]
            blocked += [n for n in needs if status.get(n) == "skip" and n != "tls"]
            if blocked:
                check = Check(name, "skip", f"needs {', '.join(blocked)}")
            else:
                try:
                    check = Check(name, "pass", step())
                except _Warned as exc:
                    check = Check(name, "warn", exc.detail, exc.fix)
                except _CheckFailedError as exc:
                    check = Check(name, "fail", exc.detail, exc.fix)
                except _Skipped as exc:
                    check = Check(name, "skip", str(exc))
            status[name] = check.status
            self.checks.append(check)
            self.emit(check)
        return self.checks

    def emit(self, check: Check) -> None:
        """Write a check's line as soon as it is done (when there is an output stream)."""
        out = self.out
        if out is None:
            return
        label = _LABELS[check.status]
        lines = check.detail.splitlines() or [""]
        out.write(f"{label}  {check.name:<15} {lines[0]}\n")
        out.writelines(f"{'':22}{line}\n" for line in lines[1:])
        if check.fix:
            out.write(f"{'':6}fix: {check.fix}\n")
        out.flush()

    # -- the checks -----------------------------------------------------------------------

    def check_endpoint(self) -> str:
        try:
            ep = self._make_endpoint()
            params = connect_params(ep, allow_insecure=self.allow_insecure)
        except ConfigurationError as exc:
            raise _CheckFailedError(str(exc), "fix the endpoint (see iampg doctor --help)") from exc
        self.endpoint = ep
        self.params = params
        source = "from the host name" if _infer(ep.host)[1] else "given"
        service = "Aurora DSQL" if ep.kind == "dsql" else "RDS/Aurora"
        addr = f" via {ep.hostaddr}" if ep.hostaddr else ""
        return (
            f"{ep.host}:{ep.port}{addr}, user {ep.user!r}, database {ep.dbname!r}; "
            f"{service} in {ep.region} (region {source}); sslmode={params['sslmode']}"
        )

    def check_credentials(self) -> str:
        from iampg._aws import AwsSigner, describe_signing_error  # noqa: PLC0415

        region = self.endpoint.region if self.endpoint is not None else None
        try:
            info = AwsSigner.shared(profile=self.profile).describe_credentials(region)
        except ConfigurationError as exc:
            raise _CheckFailedError(str(exc), _CREDENTIALS_FIX) from exc
        except Exception as exc:  # botocore's own errors, SSO and STS client errors …
            if type(exc).__name__ == "NoCredentialsError":
                detail = "no AWS credentials found in the default chain"
            else:
                detail = describe_signing_error(exc)
            raise _CheckFailedError(detail, _CREDENTIALS_FIX) from exc
        profile = f", profile {self.profile!r}" if self.profile else ""
        kind = "temporary" if info.temporary else "long-term"
        shown = f"key …{info.key_suffix}" if info.key_suffix else "key (short)"
        expires = "" if info.expires_in is None else f", expire in {info.expires_in / 60:.0f} min"
        return f"{info.source} [{info.method}]{profile}: {kind}, {shown}{expires}"

    def check_token(self) -> str:
        assert self.endpoint is not None
        self.provider = TokenProvider(self.endpoint, profile=self.profile)
        try:
            self.provider.token()
        except Error as exc:
            raise _CheckFailedError(
                str(exc),
                "fix the credentials (see the credentials check) and the region",
            ) from exc
        stats = self.provider.stats()
        service = "dsql" if self.endpoint.kind == "dsql" else "rds-db"
        valid = f"; usable for {stats.expires_in:.0f} s" if stats.expires_in is not None else ""
        return f"signed for {service} in {self.endpoint.region}{valid}"

    def check_dns(self) -> str:
        assert self.endpoint is not None
        ep = self.endpoint
        if ep.hostaddr:
            self.addresses = [ep.hostaddr]
            return f"hostaddr {ep.hostaddr} given: {ep.host} is not resolved (TLS still checks it)"
        try:
            self.addresses = _resolve(ep.host, ep.port, self.timeout)
        except (OSError, TimeoutError) as exc:
            raise _CheckFailedError(
                f"cannot resolve {ep.host}: {exc}",
                "check the host name for typos and that the cluster exists; a private endpoint "
                "resolves only inside its VPC: connect through a tunnel and pass "
                f"{option('hostaddr')}",
            ) from exc
        return f"{ep.host} → {', '.join(self.addresses)}"

    def check_tcp(self) -> str:
        assert self.endpoint is not None
        port = self.endpoint.port
        errors = []
        for address in self.addresses:
            started = time.perf_counter()
            try:
                with socket.create_connection((address, port), timeout=self.timeout):
                    pass
            except OSError as exc:
                errors.append(f"{address}:{port}: {_os_error(exc)}")
                continue
            self.addresses = [address, *(a for a in self.addresses if a != address)]
            took = (time.perf_counter() - started) * 1000
            return f"connected to {address}:{port} in {took:.0f} ms"
        raise _CheckFailedError(
            "; ".join(errors),
            "check the port, that the cluster or instance is running and publicly accessible "
            "(or that you are inside its VPC), and that its security group and your firewall "
            f"allow TCP {port} from here",
        )

    def check_tls(self) -> str:
        assert self.endpoint is not None
        ep = self.endpoint
        sslmode = self.params.get("sslmode", "require")
        if sslmode == "disable":
            raise _Skipped("sslmode=disable: the token would travel unencrypted")
        root = libpq_root_file(self.params)
        context, verified = self._ssl_context(sslmode, root)
        address = self.addresses[0]
        try:
            with socket.create_connection((address, ep.port), timeout=self.timeout) as sock:
                sock.sendall(_SSL_REQUEST)
                answer = sock.recv(1)
                if answer != b"S":
                    raise _CheckFailedError(
                        "the server does not accept TLS"
                        if answer == b"N"
                        else f"unexpected answer to the TLS request: {answer!r}",
                        "IAM authentication needs TLS: check that this is the database's port "
                        "and not a proxy that strips TLS",
                    )
                sni = None if _is_ip(ep.host) else ep.host
                with context.wrap_socket(sock, server_hostname=sni) as tls:
                    version = tls.version() or "TLS"
                    cert = tls.getpeercert()
                    der = tls.getpeercert(binary_form=True)
        except ssl.SSLCertVerificationError as exc:
            if root.source == DEFAULT_ROOT_SOURCE:
                fix = (
                    f"libpq verifies the server against {root.path} whenever that file exists, "
                    f"with sslmode={sslmode} too: add the server's CA to that file, pass "
                    f"{option('sslrootcert')} with the server's CA (`iampg ca` names the one "
                    "iampg uses for this endpoint), or move the file away"
                )
            else:
                fix = (
                    "connect with the cluster's own host name (for tunnels keep "
                    f"{option('host')} and add {option('hostaddr')}); `iampg ca` shows the CA "
                    "file used and how old it is: for a CA newer than iampg's trust store, point "
                    f"IAMPG_SSLROOTCERT (or {option('sslrootcert')}) at AWS's current bundle"
                )
            raise _CheckFailedError(
                f"the server certificate did not verify against {root.path} ({root.source}): "
                f"{exc.verify_message}",
                fix,
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise _CheckFailedError(
                f"TLS handshake failed: {_os_error(exc)}",
                "check that the port is PostgreSQL's and that nothing intercepts TLS",
            ) from exc
        subject, expires, ending = _certificate_summary(cert, der)
        found = f"{version}; certificate {subject}, expires {expires}"
        if sslmode not in _VERIFYING_MODES:
            # libpq's require with a root certificate checks the chain (as verify-ca does)
            # but never the host name: a server of another name with a certificate from the
            # same CA would pass.
            missing = "" if root.source == DEFAULT_ROOT_SOURCE else f", {root.path} does not exist"
            said = (
                f"chain checked, host name not checked (sslmode={sslmode} with {root.source}): "
                f"any server with a certificate from this CA receives the token; "
                f"verified against {root.path}"
                if verified
                else f"encrypted, not authenticated (sslmode={sslmode} checks nothing"
                f"{missing}): "
                "whoever answers on this address receives the token"
            )
            raise _Warned(
                f"{found}; {said}",
                f"use {option('sslmode', 'verify-full')} (with {option('sslrootcert')} for "
                "your own CA file) so the server has to prove it is the database",
            )
        if ending:
            raise _Warned(
                f"{found}; verified ({verified})",
                "the server's certificate is near its end: rotate the database's certificate "
                "authority (RDS: modify the instance's CA) before it expires",
            )
        return f"{found}; verified ({verified})"

    def _ssl_context(self, sslmode: str, root: RootFile) -> tuple[ssl.SSLContext, str]:
        """Build a context like libpq's for ``sslmode``; return it and how it verifies.

        libpq verifies the chain whenever its root certificate file exists, whatever the
        ``sslmode`` (``require`` then behaves as ``verify-ca``); ``verify-ca`` and
        ``verify-full`` fail without it; only ``verify-full`` checks the host name.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if root.path == "system":
            if sslmode not in _VERIFYING_MODES:  # libpq 16 and later refuse to connect
                raise _CheckFailedError(
                    f'weak sslmode "{sslmode}" may not be used with sslrootcert=system',
                    f"use {option('sslmode', 'verify-full')}",
                )
        elif not Path(root.path).exists():
            if sslmode in _VERIFYING_MODES:
                raise _CheckFailedError(
                    f"sslmode={sslmode} needs a root certificate and {root.path} "
                    f"({root.source}) does not exist",
                    f"pass {option('sslrootcert', 'FILE')} (the RDS CA bundle) or "
                    f"{option('sslrootcert', 'system')}",
                )
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context, ""
        try:
            if root.path == "system":
                context.load_default_certs()
            else:
                context.load_verify_locations(cafile=root.path)
        except (OSError, ssl.SSLError) as exc:
            raise _CheckFailedError(
                f"cannot load the root certificates in {root.path} ({root.source}): "
                f"{_os_error(exc)}",
                "pass a readable PEM file of CA certificates",
            ) from exc
        context.check_hostname = sslmode == "verify-full"
        what = "host name and chain" if sslmode == "verify-full" else "chain only"
        return context, f"{what}, sslmode={sslmode}, {root.source}={root.path}"

    def check_auth(self) -> str:
        try:
            import psycopg  # noqa: PLC0415

            from iampg._pool import connect  # noqa: PLC0415
        except ImportError as exc:  # no psycopg, or one without a libpq it can load
            raise _CheckFailedError(
                "not run: the login check needs psycopg with a libpq "
                f"(pip install 'psycopg[binary]'): {' '.join(str(exc).split())}",
                _PSYCOPG_FIX,
            ) from exc

        assert self.provider is not None
        ep = self.provider.endpoint
        try:
            self.connection = connect(
                provider=self.provider,
                connect_timeout=str(max(1, round(self.timeout))),
                autocommit=True,
                allow_insecure=self.allow_insecure,
                preset=self.preset,
            )
        except AuthenticationError as exc:
            raise _CheckFailedError(
                str(exc).strip(),
                "work through the likely causes above; the server's log (or CloudTrail) "
                "has the exact reason",
            ) from exc
        except psycopg.OperationalError as exc:
            text = " ".join(str(exc).split())
            fix = "see the server's message"
            if "timeout" in text:
                fix = (
                    "a paused Aurora Serverless cluster takes 15-30 s to resume: retry with "
                    f"{option('timeout', '60')}; otherwise check the network path"
                )
            raise _CheckFailedError(text, fix) from exc
        return f"logged in to {ep.dbname!r} as {ep.user!r} with the token"

    def check_query(self) -> str:
        import psycopg  # noqa: PLC0415

        conn = self.connection
        try:
            with conn:
                row = conn.execute("select 1, current_setting('server_version')").fetchone()
        except psycopg.Error as exc:
            raise _CheckFailedError(
                " ".join(str(exc).split()), "the session was refused after login"
            ) from exc
        if row is None or row[0] != 1:
            raise _CheckFailedError(f"select 1 returned {row!r}", "the server is not PostgreSQL")
        return f"select 1 returned 1 (PostgreSQL {row[1]})"


class _Skipped(Exception):  # noqa: N818 -- not an error: a check that does not apply
    """A check does not apply; the message says why."""


def _is_ip(value: str) -> bool:
    import ipaddress  # noqa: PLC0415

    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _os_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # socket.timeout too
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)


def _resolve(host: str, port: int, timeout: float) -> list[str]:
    """Resolve ``host`` to its addresses within ``timeout`` seconds."""
    found: list[str] = []
    failure: list[OSError] = []

    def work() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            failure.append(exc)
            return
        for info in infos:
            address = str(info[4][0])
            if address not in found:
                found.append(address)

    # getaddrinfo has no timeout of its own: wait for it in a thread we can abandon.
    thread = threading.Thread(target=work, name="iampg-doctor-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if failure:
        raise failure[0]
    return found


def _certificate_summary(
    cert: dict[str, Any] | None, der: bytes | None, now: dt.datetime | None = None
) -> tuple[str, str, bool]:
    """Return the certificate's subject, its expiry in words and whether it is near its end.

    Read from the checked form when the chain was verified, else from the raw certificate.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    if cert:
        subject = ", ".join(
            f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn
        )
        after, before = cert.get("notAfter"), cert.get("notBefore")
        if isinstance(after, str) and isinstance(before, str):
            start, end = (
                dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(t), dt.timezone.utc)
                for t in (before, after)
            )
            return (subject or "(no subject)", *_expiry(start, end, now))
    if der:
        try:
            from cryptography import x509  # noqa: PLC0415 -- optional
        except ImportError:
            return "(not shown: install cryptography)", "unknown", False
        parsed = x509.load_der_x509_certificate(der)
        return (
            parsed.subject.rfc4514_string(),
            *_expiry(parsed.not_valid_before_utc, parsed.not_valid_after_utc, now),
        )
    return "(none)", "unknown", False


def _expiry(start: dt.datetime, end: dt.datetime, now: dt.datetime) -> tuple[str, bool]:
    """Say when a certificate valid from ``start`` to ``end`` expires; tell if it is near.

    Near means less than 30 days and less than a quarter of its validity left: a certificate
    made to live a week (the emulator's, an internal CA's) is short-lived, not ending soon.
    """
    date = end.strftime("%Y-%m-%d")
    left, total = end - now, end - start
    if left <= dt.timedelta(0):
        return f"{date} (expired)", True
    if left < _EXPIRY_WARNING and left < total * _EXPIRY_FRACTION:
        return f"{date} (in {_duration(left)}: renew it soon)", True
    if total < _EXPIRY_WARNING:
        return f"{date} (short-lived certificate, expires in {_duration(left)})", False
    return date, False


def _duration(span: dt.timedelta) -> str:
    """Return a span as days, or hours when under two days."""
    hours = span.total_seconds() / 3600
    return f"{hours / 24:.0f} days" if hours >= 48 else f"{hours:.0f} hours"  # noqa: PLR2004
