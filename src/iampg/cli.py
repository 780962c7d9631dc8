"""The ``iampg`` command: tokens, URLs, environments, psql, a connection doctor and the emulator.

Exit codes (each command's ``--help`` lists the ones it returns):

- ``0``: success (``doctor``: every check passed; ``emulate``: stopped with Ctrl-C).
- ``1``: the work failed: no credentials, a token could not be signed, a ``doctor`` check
  failed, the emulator could not run.
- ``2``: usage error: bad arguments or an invalid endpoint.
- ``127``: ``psql`` was not found.
- ``130``: interrupted with Ctrl-C.

``iampg psql`` replaces itself with psql, so once psql runs the exit code is psql's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from iampg._dsn import alembic_url, connect_params, conninfo, env, pgpass, sqlalchemy_url, url
from iampg._endpoint import Endpoint, _infer
from iampg._options import cli_spelling
from iampg._tokens import TokenProvider
from iampg.errors import AuthenticationError, ConfigurationError, Error

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1  # the work failed (no credentials, a doctor check failed, emulator crashed …)
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_NOT_FOUND = 127  # psql is not installed (the shell's "command not found")
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

_SIGNING = "1 no AWS credentials or signing failed"
_USAGE = "2 usage error (bad arguments or endpoint)"
_INTERRUPTED = "130 interrupted (Ctrl-C)"
# What each command can return; its --help prints this line.
_EXIT_CODES: dict[str, str] = {
    "iampg": "0 success; 1 the work failed; 2 usage error; 127 psql not found; "
    "130 interrupted (Ctrl-C)",
    "token": f"0 success; {_SIGNING}; {_USAGE}; {_INTERRUPTED}",
    "url": f"0 success; {_SIGNING}; {_USAGE}; {_INTERRUPTED}",
    "env": f"0 success; {_SIGNING}; {_USAGE}; {_INTERRUPTED}",
    "psql": "psql's own once it runs (0 success, 1 error, 2 connection failed or lost, "
    f"3 script error with ON_ERROR_STOP); before that {_SIGNING}; {_USAGE}; "
    f"127 psql not found; {_INTERRUPTED}",
    "doctor": f"0 every check passed; 1 a check failed; {_USAGE}; {_INTERRUPTED}",
    "emulate": "0 stopped (Ctrl-C or SIGTERM); 1 the emulator could not run (backend "
    "unreachable, port busy...); 2 usage error (bad options, no PostgreSQL binaries)",
}


def _exit_codes(command: str) -> str:
    import textwrap  # noqa: PLC0415

    return textwrap.fill(f"exit codes: {_EXIT_CODES[command]}.", width=92)


_ENDPOINT_TEXT = """\
The endpoint is a host name, a postgresql:// URL or a libpq "key=value" string; options
override it, and PGHOST, PGPORT, PGUSER, PGDATABASE, PGHOSTADDR and AWS_REGION fill what
neither gives. Credentials come from the AWS default chain (environment, profile, SSO, role)."""


def _endpoint_help(command: str) -> str:
    return f"{_ENDPOINT_TEXT}\n\n{_exit_codes(command)}"


_PSQL_HELP = f"""\
psql gets the token in PGPASSWORD and every other setting in PG* variables (PGHOST,
PGHOSTADDR, PGPORT, PGUSER, PGDATABASE, PGSSLMODE …), never on its command line, where other
users of the machine could read it. PGSERVICE and PGPASSFILE are removed from its
environment. psql's own options (-c, -f, -v, -X, -A, -t, …) go to psql; -d, -p, -U and -H
are iampg's (the token is signed for them). Arguments after "--" go to psql unchanged, e.g.
  iampg psql mydb.cluster-abc.us-east-1.rds.amazonaws.com -U app -c 'select 1'
  iampg psql mydb.cluster-abc.us-east-1.rds.amazonaws.com -U app -- -H -c 'select 1'
The token lets psql open new connections for 15 minutes; an open session outlives it.

{_endpoint_help("psql")}"""

_DOCTOR_HELP = f"""\
Checks, in order: endpoint (host, kind, region), credentials (their source; no secret is
printed), token (signing), dns, tcp, tls (certificate subject and expiry; verified with
sslmode=verify-ca/verify-full), authentication (a real connection with the token) and query
(select 1). Each prints one PASS/FAIL/SKIP line, and the fix for what failed; a check whose
prerequisite failed is skipped.

{_endpoint_help("doctor")}"""

# Variables that would make libpq use another password or another server than ours.
_PSQL_DROPPED_ENV = ("PGSERVICE", "PGSERVICEFILE", "PGPASSFILE")


def _add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", nargs="?", help="host name, URL or key=value string")
    group = parser.add_argument_group("endpoint")
    group.add_argument("--host", "-H", help="database host name (the name that is signed)")
    group.add_argument("--port", "-p", help="port (default 5432)")
    group.add_argument("--user", "-U", help="database user to sign for")
    group.add_argument("--dbname", "-d", help="database name")
    group.add_argument("--region", "-r", help="AWS region (inferred from AWS host names)")
    group.add_argument("--hostaddr", help="IP address to dial instead of resolving the host")
    group.add_argument("--kind", choices=("rds", "dsql"), help="service (inferred from the host)")
    group.add_argument("--sslmode", help="libpq sslmode (default: require; DSQL verify-full)")
    group.add_argument("--sslrootcert", help="CA file for sslmode=verify-full")
    group.add_argument("--profile", help="AWS profile to sign with")


def _add_insecure_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow an sslmode that may send the token unencrypted (disable, allow, prefer) "
        "to a host other than loopback",
    )


def _endpoint(args: argparse.Namespace) -> Endpoint:
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "user": args.user,
        "dbname": args.dbname,
        "region": args.region,
        "hostaddr": args.hostaddr,
        "kind": args.kind,
        "sslmode": args.sslmode,
        "sslrootcert": args.sslrootcert,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return Endpoint.parse(args.endpoint or "", environ=os.environ, **overrides)


def _provider(args: argparse.Namespace) -> TokenProvider:
    return TokenProvider(_endpoint(args), profile=args.profile)


# -- token, url, env ----------------------------------------------------------------------


def _cmd_token(args: argparse.Namespace, out: TextIO) -> int:
    out.write(_provider(args).token() + "\n")
    return EXIT_OK


def _cmd_url(args: argparse.Namespace, out: TextIO) -> int:
    provider = _provider(args)
    insecure: bool = args.allow_insecure
    formats: dict[str, Callable[[], str]] = {
        "url": lambda: url(provider=provider, allow_insecure=insecure),
        "alembic": lambda: alembic_url(
            provider=provider, driver=args.driver, allow_insecure=insecure
        ),
        "conninfo": lambda: conninfo(provider=provider, allow_insecure=insecure),
        "sqlalchemy": lambda: sqlalchemy_url(
            provider=provider, driver=args.driver, allow_insecure=insecure
        ),
        "pgpass": lambda: pgpass(provider=provider, allow_insecure=insecure),
    }
    out.write(formats[args.format]() + "\n")
    return EXIT_OK


_DOTENV_PLAIN = re.compile(r"[A-Za-z0-9_./:%&=?+@,~^-]*")


def _dotenv_value(value: str) -> str:
    """Quote a value for a ``.env`` file as python-dotenv and docker compose read it."""
    if _DOTENV_PLAIN.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _cmd_env(args: argparse.Namespace, out: TextIO) -> int:
    variables = env(provider=_provider(args), allow_insecure=args.allow_insecure)
    if args.format == "json":
        out.write(json.dumps(variables, indent=2) + "\n")
    elif args.format == "dotenv":
        out.writelines(f"{name}={_dotenv_value(value)}\n" for name, value in variables.items())
    else:
        out.writelines(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())
    return EXIT_OK


# -- psql ---------------------------------------------------------------------------------


def _cmd_psql(args: argparse.Namespace, out: TextIO) -> int:  # noqa: ARG001
    program = args.psql or shutil.which("psql")
    if program is None or not os.access(program, os.X_OK):
        where = repr(args.psql) if args.psql else "on PATH"
        print(  # noqa: T201
            f"iampg psql: psql not found {where}: install the PostgreSQL client "
            "(apt install postgresql-client, brew install libpq, …) or pass --psql PATH",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    variables = env(provider=_provider(args), allow_insecure=args.allow_insecure)
    child_env = {k: v for k, v in os.environ.items() if k not in _PSQL_DROPPED_ENV}
    child_env.update(variables)
    argv = [program, *args.passthrough]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(program, argv, child_env)  # noqa: S606 -- psql replaces us; no shell
    # Elsewhere exec does not keep the console: run psql and let it handle Ctrl-C.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.run(argv, env=child_env, check=False).returncode  # noqa: S603
    finally:
        signal.signal(signal.SIGINT, previous)


# -- doctor -------------------------------------------------------------------------------

Status = Literal["pass", "fail", "skip"]


@dataclass
class _Check:
    """One line of the doctor's report."""

    name: str
    status: Status
    detail: str
    fix: str = ""


class _CheckFailedError(Exception):
    """A doctor check failed: ``detail`` says what happened, ``fix`` what to do."""

    def __init__(self, detail: str, fix: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


_CREDENTIAL_SOURCES = {
    "env": "environment variables (AWS_ACCESS_KEY_ID)",
    "shared-credentials-file": "shared credentials file",
    "config-file": "AWS config file",
    "sso": "IAM Identity Center (SSO)",
    "container-role": "container credentials (ECS/EKS)",
    "iam-role": "EC2 instance role",
    "assume-role": "assumed role",
    "assume-role-with-web-identity": "web identity (EKS IRSA)",
    "custom-process": "credential_process",
    "explicit": "explicit keys",
}

_ROOT_CERT = Path("~/.postgresql/root.crt")
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_VERIFYING_MODES = frozenset({"verify-ca", "verify-full"})
_EXPIRY_WARNING = 30  # days: a certificate expiring sooner is worth a note


class _Doctor:
    """Run the checks in order; each later check uses what the earlier ones found."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.timeout: float = args.timeout
        self.endpoint: Endpoint | None = None
        self.params: dict[str, str] = {}
        self.provider: TokenProvider | None = None
        self.addresses: list[str] = []
        self.checks: list[_Check] = []
        self.connection: Any = None  # the psycopg connection the authentication check opened

    def run(self) -> list[_Check]:
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
                check = _Check(name, "skip", f"needs {', '.join(blocked)}")
            else:
                try:
                    check = _Check(name, "pass", step())
                except _CheckFailedError as exc:
                    check = _Check(name, "fail", exc.detail, exc.fix)
                except _Skipped as exc:
                    check = _Check(name, "skip", str(exc))
            status[name] = check.status
            self.checks.append(check)
            self.emit(check)
        return self.checks

    def emit(self, check: _Check) -> None:
        """Print a check as soon as it is done (human output only)."""
        if self.args.json:
            return
        out: TextIO = sys.stdout
        label = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}[check.status]
        lines = check.detail.splitlines() or [""]
        out.write(f"{label}  {check.name:<15} {lines[0]}\n")
        out.writelines(f"{'':22}{line}\n" for line in lines[1:])
        if check.fix:
            out.write(f"{'':6}fix: {check.fix}\n")
        out.flush()

    # -- the checks -----------------------------------------------------------------------

    def check_endpoint(self) -> str:
        try:
            ep = _endpoint(self.args)
            params = connect_params(ep, allow_insecure=self.args.allow_insecure)
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
        import botocore.session  # noqa: PLC0415 -- keep `import iampg.cli` cheap

        from iampg._aws import describe_signing_error  # noqa: PLC0415

        fix = (
            "set AWS_PROFILE (then `aws sso login` if it uses SSO), or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or run where a role is attached; check with "
            "`aws sts get-caller-identity`"
        )
        try:
            session = botocore.session.Session(profile=self.args.profile)
            credentials = session.get_credentials()
            frozen = credentials.get_frozen_credentials() if credentials is not None else None
        except Exception as exc:  # botocore's own errors, SSO and STS client errors …
            raise _CheckFailedError(describe_signing_error(exc), fix) from exc
        if credentials is None or frozen is None:
            raise _CheckFailedError("no AWS credentials found in the default chain", fix)
        method = str(getattr(credentials, "method", "unknown"))
        source = _CREDENTIAL_SOURCES.get(method, method)
        profile = f", profile {self.args.profile!r}" if self.args.profile else ""
        kind = "temporary" if frozen.token else "long-term"
        expiry = getattr(credentials, "_expiry_time", None)
        expires = ""
        if isinstance(expiry, dt.datetime):
            if expiry.tzinfo is None:
                expiry = expiry.replace(tzinfo=dt.timezone.utc)
            left = (expiry - dt.datetime.now(dt.timezone.utc)).total_seconds()
            expires = f", expire in {left / 60:.0f} min"
        key = str(frozen.access_key or "")
        shown = f"key …{key[-4:]}" if len(key) > 8 else "key (short)"  # noqa: PLR2004
        return f"{source} [{method}]{profile}: {kind}, {shown}{expires}"

    def check_token(self) -> str:
        assert self.endpoint is not None
        self.provider = TokenProvider(self.endpoint, profile=self.args.profile)
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
                "resolves only inside its VPC: connect through a tunnel and pass --hostaddr",
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
        context, verified = self._ssl_context(sslmode)
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
            raise _CheckFailedError(
                f"the server certificate did not verify: {exc.verify_message}",
                "pass the service's CA bundle with --sslrootcert (RDS: global-bundle.pem from "
                "AWS; DSQL: sslrootcert=system), and connect with the cluster's own host name "
                "(for tunnels keep --host and add --hostaddr)",
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise _CheckFailedError(
                f"TLS handshake failed: {_os_error(exc)}",
                "check that the port is PostgreSQL's and that nothing intercepts TLS",
            ) from exc
        subject, expires = _certificate_summary(cert, der)
        how = (
            f"verified ({verified})"
            if verified
            else (
                "not verified (sslmode=require): use --sslmode verify-full with --sslrootcert "
                "to check the server's identity"
            )
        )
        return f"{version}; certificate {subject}, expires {expires}; {how}"

    def _ssl_context(self, sslmode: str) -> tuple[ssl.SSLContext, str]:
        """Build a context like libpq's for ``sslmode``; return it and how it verifies."""
        rootcert = self.params.get("sslrootcert")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if rootcert is None and sslmode in _VERIFYING_MODES:
            default = _ROOT_CERT.expanduser()
            if not default.exists():
                raise _CheckFailedError(
                    f"sslmode={sslmode} needs a root certificate and {default} does not exist",
                    "pass --sslrootcert FILE (the RDS CA bundle) or --sslrootcert system",
                )
            rootcert = str(default)
        # libpq: with a root certificate, sslmode=require checks the chain like verify-ca.
        if rootcert is None or sslmode not in {"require", *_VERIFYING_MODES}:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context, ""
        try:
            if rootcert == "system":
                context.load_default_certs()
            else:
                context.load_verify_locations(cafile=rootcert)
        except (OSError, ssl.SSLError) as exc:
            raise _CheckFailedError(
                f"cannot load sslrootcert {rootcert}: {_os_error(exc)}",
                "pass a readable PEM file of CA certificates",
            ) from exc
        context.check_hostname = sslmode == "verify-full"
        what = "host name and chain" if sslmode == "verify-full" else "chain only"
        return context, f"{what}, sslmode={sslmode}, sslrootcert={rootcert}"

    def check_auth(self) -> str:
        import psycopg  # noqa: PLC0415

        from iampg._pool import connect  # noqa: PLC0415

        assert self.provider is not None
        ep = self.provider.endpoint
        try:
            self.connection = connect(
                provider=self.provider,
                connect_timeout=str(max(1, round(self.timeout))),
                autocommit=True,
                allow_insecure=self.args.allow_insecure,
                **_preset_keyword(self.args.preset),
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
                    "--timeout 60; otherwise check the network path"
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


def _certificate_summary(cert: dict[str, Any] | None, der: bytes | None) -> tuple[str, str]:
    """Return the certificate's subject and expiry date, from the checked or the raw form."""
    if cert:
        subject = ", ".join(
            f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn
        )
        after = cert.get("notAfter")
        if isinstance(after, str):
            expiry = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(after), dt.timezone.utc)
            return subject or "(no subject)", _expiry_text(expiry)
    if der:
        try:
            from cryptography import x509  # noqa: PLC0415 -- optional
        except ImportError:
            return "(not shown: install cryptography)", "unknown"
        parsed = x509.load_der_x509_certificate(der)
        return parsed.subject.rfc4514_string(), _expiry_text(parsed.not_valid_after_utc)
    return "(none)", "unknown"


def _expiry_text(expiry: dt.datetime) -> str:
    days = (expiry - dt.datetime.now(dt.timezone.utc)).days
    note = f" (in {days} days: renew it soon)" if days < _EXPIRY_WARNING else ""
    return expiry.strftime("%Y-%m-%d") + note


def _cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    if not args.timeout > 0:
        raise ConfigurationError(f"--timeout must be more than 0 seconds, not {args.timeout}")
    doctor = _Doctor(args)
    try:
        checks = doctor.run()
    finally:
        if doctor.connection is not None:
            doctor.connection.close()
    ok = all(check.status != "fail" for check in checks)
    if args.json:
        report = {"ok": ok, "checks": [asdict(check) for check in checks]}
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        failed = [check.name for check in checks if check.status == "fail"]
        out.write(
            "all checks passed\n" if ok else f"failed: {', '.join(failed)}\n",
        )
    return EXIT_OK if ok else EXIT_FAILURE


# -- emulate ------------------------------------------------------------------------------


def _cmd_emulate(args: argparse.Namespace, out: TextIO) -> int:  # noqa: ARG001
    from iampg.emulator import _cli  # noqa: PLC0415 -- needs the emulator extra

    return _cli.run(args)


def _missing_emulator(args: argparse.Namespace, out: TextIO) -> int:  # noqa: ARG001
    raise ConfigurationError("the emulator needs extra packages: pip install 'iampg[emulator]'")


# -- the parser ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iampg",
        description="IAM-authenticated PostgreSQL on AWS: tokens, URLs, psql, a connection "
        "doctor, and a local emulator.",
        epilog=_exit_codes("iampg"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"iampg {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str, epilog: str) -> Any:
        return sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,  # psql's options must not pass for abbreviations of ours
        )

    token = command(
        "token",
        "print an IAM authentication token",
        "Print a token for the endpoint; it is valid for 15 minutes.",
        _endpoint_help("token"),
    )
    _add_endpoint_arguments(token)
    token.set_defaults(func=_cmd_token)

    url_parser = command(
        "url",
        "print a connection URL with a token, percent-encoded",
        "Print a postgresql:// URL (or another connection string) carrying a token, for "
        "tools that take one. The output is a credential valid for 15 minutes.",
        _endpoint_help("url"),
    )
    _add_endpoint_arguments(url_parser)
    _add_insecure_argument(url_parser)
    url_parser.add_argument(
        "--format",
        choices=("url", "alembic", "conninfo", "sqlalchemy", "pgpass"),
        default="url",
        help="url (default): postgresql://, token percent-encoded; alembic: the sqlalchemy "
        "url with %% doubled for alembic.ini/ConfigParser; conninfo: libpq key=value; "
        "sqlalchemy: postgresql+DRIVER://; pgpass: a host:port:dbname:user:token line",
    )
    url_parser.add_argument(
        "--driver",
        default="psycopg",
        help="SQLAlchemy driver for --format sqlalchemy (default: %(default)s)",
    )
    url_parser.set_defaults(func=_cmd_url)

    env_parser = command(
        "env",
        "print shell export lines for PG* variables with a token",
        'Print `export PGHOST=… PGPASSWORD=<token> …` lines: eval "$(iampg env ...)" and '
        "run any libpq tool. The output is a credential valid for 15 minutes.",
        _endpoint_help("env"),
    )
    _add_endpoint_arguments(env_parser)
    _add_insecure_argument(env_parser)
    env_parser.add_argument(
        "--format",
        choices=("shell", "dotenv", "json"),
        default="shell",
        help="shell (default): POSIX export lines; dotenv: NAME=value lines for .env files; "
        "json: an object",
    )
    env_parser.set_defaults(func=_cmd_env)

    psql = command(
        "psql",
        "run psql with a token in its environment",
        "Run psql against the endpoint with a fresh token in PGPASSWORD.",
        _PSQL_HELP,
    )
    _add_endpoint_arguments(psql)
    _add_insecure_argument(psql)
    psql.add_argument("--psql", metavar="PATH", help="the psql program (default: psql on PATH)")
    psql.set_defaults(func=_cmd_psql)

    doctor = command(
        "doctor",
        "check credentials, network, TLS and login step by step",
        "Diagnose a connection: print one line per check and the fix for what failed.",
        _DOCTOR_HELP,
    )
    _add_endpoint_arguments(doctor)
    _add_insecure_argument(doctor)
    doctor.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time limit of each network check (default: %(default)s)",
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON report instead")
    doctor.add_argument(
        "--preset",
        type=_preset,
        metavar="{rds,aurora-serverless,aurora-express,dsql}",
        help="the service's connection defaults (connect timeout, waiting for a paused "
        "cluster); default: dsql for DSQL hosts, else rds",
    )
    doctor.set_defaults(func=_cmd_doctor)

    emulate = command(
        "emulate",
        "run the local IAM emulator in front of a real PostgreSQL",
        "Run a PostgreSQL gateway that checks IAM tokens like RDS/Aurora does, in front of a "
        "real PostgreSQL (a DSN, or a throwaway cluster). Stop it with Ctrl-C.",
        _exit_codes("emulate"),
    )
    try:
        from iampg.emulator import _cli  # noqa: PLC0415
    except ImportError:
        emulate.set_defaults(func=_missing_emulator)
    else:
        _cli.add_arguments(emulate)
        emulate.set_defaults(func=_cmd_emulate)
    return parser


def _version() -> str:
    from iampg import __version__  # noqa: PLC0415

    return __version__


def _preset(value: str) -> str:
    """Return the canonical preset name for argparse, or refuse it as argparse does."""
    from iampg._defaults import canonical_preset  # noqa: PLC0415

    try:
        return canonical_preset(value)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _preset_keyword(preset: str | None) -> dict[str, Any]:
    """Return the keyword that gives ``iampg.connect`` a preset (empty for the default)."""
    if preset is None:
        return {}
    import inspect  # noqa: PLC0415

    from iampg._pool import connect  # noqa: PLC0415

    name = "preset" if "preset" in inspect.signature(connect).parameters else "profile"
    return {name: preset}


# psql's own options (psql 12 to 17), so that `iampg psql HOST -c 'select 1'` reaches psql.
# Its connection options -h, -p, -U, -d are iampg's: the token is signed for them.
_PSQL_SHORT_VALUE = frozenset("cfvLoFPRT")
_PSQL_SHORT_FLAG = frozenset("lVX1abeEnqsSAtxz0wW")
_PSQL_LONG_VALUE = frozenset(
    {
        "--command",
        "--file",
        "--set",
        "--variable",
        "--log-file",
        "--output",
        "--field-separator",
        "--pset",
        "--record-separator",
        "--table-attr",
    }
)
_PSQL_LONG_FLAG = frozenset(
    {
        "--list",
        "--version",
        "--no-psqlrc",
        "--single-transaction",
        "--echo-all",
        "--echo-errors",
        "--echo-queries",
        "--echo-hidden",
        "--no-readline",
        "--quiet",
        "--single-step",
        "--single-line",
        "--no-align",
        "--csv",
        "--html",
        "--tuples-only",
        "--expanded",
        "--field-separator-zero",
        "--record-separator-zero",
        "--no-password",
        "--password",
    }
)


class _UsageError(Exception):
    """A command line that cannot be split unambiguously; the message says what to do."""


def _split_psql(arguments: list[str], ours: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Split ``iampg psql`` arguments into iampg's and psql's own options, keeping order.

    Raises:
        _UsageError: An option neither iampg nor psql knows, or a cluster mixing both.
    """
    takes_value = {
        flag: action.nargs != 0
        for action in ours._actions  # noqa: SLF001 -- argparse has no public list
        for flag in action.option_strings
    }
    mine: list[str] = []
    psql: list[str] = []
    rest = iter(arguments)
    for arg in rest:
        name = arg.partition("=")[0] if arg.startswith("--") else arg[:2]
        if not arg.startswith("-") or arg == "-":
            mine.append(arg)
        elif name in takes_value:
            attached = "=" in arg if arg.startswith("--") else len(arg) > 2  # noqa: PLR2004
            mine.append(arg)
            if takes_value[name] and not attached:
                mine.extend(_next(rest))
        elif arg.startswith("--"):
            if name not in _PSQL_LONG_VALUE | _PSQL_LONG_FLAG:
                raise _UsageError(f"unknown option {name}: put psql's options after --")
            psql.append(arg)
            if name in _PSQL_LONG_VALUE and "=" not in arg:
                psql.extend(_next(rest))
        else:
            psql.extend(_psql_short(arg, rest))
    return mine, psql


def _psql_short(arg: str, rest: Iterator[str]) -> list[str]:
    """Return psql's short options ``arg`` (``-tAc``) and the value its last one takes."""
    for i, char in enumerate(arg[1:], start=1):
        if char in _PSQL_SHORT_VALUE:  # the rest of the cluster, or the next argument
            return [arg, *_next(rest)] if i == len(arg) - 1 else [arg]
        if char not in _PSQL_SHORT_FLAG:
            raise _UsageError(
                f"unknown option -{char} in {arg}: give iampg's options separately, "
                "and put other psql options after --"
            )
    return [arg]


def _next(rest: Iterator[str]) -> list[str]:
    """Return the next argument as a list, or none at the end (argparse or psql complains)."""
    return [arg for arg in [next(rest, None)] if arg is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``iampg`` command and return its exit code (see the module docstring)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in arguments:
        cut = arguments.index("--")
        arguments, passthrough = arguments[:cut], arguments[cut + 1 :]
    try:
        parser = _parser()
        command = next((arg for arg in arguments if not arg.startswith("-")), None)
        if command == "psql":
            at = arguments.index("psql") + 1
            try:
                mine, psql_options = _split_psql(arguments[at:], _subparser(parser, "psql"))
            except _UsageError as exc:
                print(f"iampg psql: {exc}", file=sys.stderr)  # noqa: T201
                return EXIT_USAGE
            arguments = [*arguments[:at], *mine]
            passthrough = [*psql_options, *passthrough]
        try:
            args = parser.parse_args(arguments)
        except SystemExit as exc:  # --help, --version, or a usage error already printed
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if passthrough and args.command != "psql":
            print(  # noqa: T201
                f"iampg {args.command}: only psql takes arguments after --", file=sys.stderr
            )
            return EXIT_USAGE
        args.passthrough = passthrough
        func: Callable[[argparse.Namespace, TextIO], int] = args.func
        with cli_spelling():  # messages name --options and variables, not Python keywords
            return _run(func, args)
    except KeyboardInterrupt:
        print("iampg: interrupted", file=sys.stderr)  # noqa: T201
        return EXIT_INTERRUPTED


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # noqa: SLF001 -- argparse has no public lookup
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise LookupError(name)


def _run(func: Callable[[argparse.Namespace, TextIO], int], args: argparse.Namespace) -> int:
    """Run a command; report iampg's and the system's errors in one line, without traceback."""
    import psycopg  # noqa: PLC0415

    try:
        return func(args, sys.stdout)
    except ConfigurationError as exc:
        print(f"iampg {args.command}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    except Error as exc:
        print(f"iampg {args.command}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`iampg env | head -1`): not worth a message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILURE
    except (OSError, psycopg.Error) as exc:
        print(f"iampg {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
