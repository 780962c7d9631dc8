"""``iampg proxy``: the proxy on the command line, one local port per endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from iampg._endpoint import Endpoint
from iampg._tokens import TokenProvider
from iampg._wire.lifecycle import EVENT_LOOPS, loop_factory
from iampg.errors import ConfigurationError

if TYPE_CHECKING:
    import argparse

    from ._proxy import ClientTls, Proxy

__all__ = ["PASSWORD_ENV", "add_arguments", "run"]

#: The environment variable that may hold the password clients must give.
PASSWORD_ENV = "IAMPG_PROXY_PASSWORD"  # noqa: S105 -- a variable name

_SINGLE_ONLY = (
    ("host", "--host"),
    ("hostaddr", "--hostaddr"),
    ("upstream_port", "--upstream-port"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the proxy's own options (the endpoint options are added by the caller)."""
    parser.add_argument(
        "--endpoint",
        action="append",
        dest="more_endpoints",
        default=[],
        metavar="SPEC",
        help="another endpoint (host name, URL or key=value string) to serve on its own port; "
        "repeat for more. The endpoint options above apply to every endpoint",
    )
    parser.add_argument(
        "--preset",
        metavar="{rds,aurora-serverless,aurora-express,dsql}",
        help="the service's behaviour (connect timeout, waiting for a paused cluster); "
        "default: dsql for DSQL hosts, else rds",
    )
    local = parser.add_argument_group("local side")
    local.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="ADDR",
        help="address to listen on (default: %(default)s); beyond loopback it needs "
        "client TLS and a password",
    )
    local.add_argument(
        "--port",
        type=int,
        default=0,
        metavar="N",
        help="local port (default 0: a free one); with several endpoints, N, N+1, ...",
    )
    local.add_argument(
        "--unix-socket",
        metavar="DIR",
        help="also listen on DIR/.s.PGSQL.PORT, for psql -h DIR -p PORT",
    )
    local.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="the session log on stderr: text lines (default) or one JSON object a line",
    )
    local.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long open sessions may run on (default: %(default)s)",
    )
    local.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="auto (default): uvloop when installed (pip install 'iampg[proxy]'), else "
        "asyncio; or asyncio, or uvloop",
    )
    local.add_argument("--tls-cert", metavar="FILE", help="PEM certificate for client TLS")
    local.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    local.add_argument(
        "--tls-generate",
        action="store_true",
        help="generate a throwaway CA and certificate for client TLS; the CA is printed",
    )
    local.add_argument(
        "--password-file",
        metavar="FILE",
        help=f"file holding the password clients must give (SCRAM-SHA-256); or set {PASSWORD_ENV}",
    )


def _client_tls(args: argparse.Namespace) -> ClientTls | None:
    if args.tls_generate:
        if args.tls_cert or args.tls_key:
            raise ConfigurationError("give --tls-generate or --tls-cert/--tls-key, not both")
        return "generate"
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        return (args.tls_cert, args.tls_key)
    return None


def _password(args: argparse.Namespace) -> str | None:
    from_env = os.environ.get(PASSWORD_ENV)
    if args.password_file:
        if from_env:
            raise ConfigurationError(f"give --password-file or {PASSWORD_ENV}, not both")
        try:
            text = Path(args.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read --password-file {args.password_file}: {exc.strerror}"
            ) from None
        password = text.rstrip("\r\n")
        if not password:
            raise ConfigurationError(f"--password-file {args.password_file} is empty")
        return password
    return from_env or None


def _endpoints(args: argparse.Namespace) -> list[Endpoint]:
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.upstream_port,
        "user": args.user,
        "dbname": args.dbname,
        "region": args.region,
        "hostaddr": args.hostaddr,
        "kind": args.kind,
        "sslmode": args.sslmode,
        "sslrootcert": args.sslrootcert,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    specs = [args.endpoint, *args.more_endpoints] if args.endpoint else list(args.more_endpoints)
    if len(specs) > 1:
        for name, flag in _SINGLE_ONLY:
            if getattr(args, name) is not None:
                raise ConfigurationError(
                    f"{flag} names one endpoint: with several, put it in each endpoint's URL"
                )
    if not specs:
        specs = [""]
    return [Endpoint.parse(spec, environ=os.environ, **overrides) for spec in specs]


def _proxies(args: argparse.Namespace) -> list[Proxy]:
    if not 0 <= args.port <= 65535:  # noqa: PLR2004
        raise ConfigurationError(f"--port must be between 0 and 65535, not {args.port}")
    endpoints = _endpoints(args)
    if args.port and args.port + len(endpoints) - 1 > 65535:  # noqa: PLR2004
        raise ConfigurationError(f"--port {args.port} leaves no port for every endpoint")
    tls = _client_tls(args)
    password = _password(args)
    from ._proxy import Proxy  # noqa: PLC0415 -- the wire machinery loads when it runs

    proxies = []
    for n, endpoint in enumerate(endpoints):
        provider = TokenProvider(endpoint, profile=args.profile)
        proxies.append(
            Proxy(
                endpoint,
                provider=provider,
                preset=args.preset,
                host=args.listen,
                port=args.port + n if args.port else 0,
                unix_socket_dir=args.unix_socket,
                client_tls=tls,
                password=password,
                allow_insecure=args.allow_insecure,
                grace=args.grace,
                event_loop=args.event_loop,
            )
        )
    return proxies


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, event and the event's fields; no secrets.

    Every record has an ``event`` (``session opened``, ``proxy listening`` …; ``log`` with a
    ``message`` for the others).
    """

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a JSON line."""
        fields: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(),
            "level": record.levelname.lower(),
        }
        structured = getattr(record, "iampg_proxy", None)
        if isinstance(structured, dict):
            fields.update(structured)
        else:  # warnings and the like: the same key for their kind as every other record
            fields["event"] = "log"
            fields["message"] = record.getMessage()
        return json.dumps(fields)


def _log_handler(log_format: str, stream: TextIO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    return handler


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``iampg proxy`` until SIGINT or SIGTERM; return the exit code."""
    if args.grace < 0:
        raise ConfigurationError(f"--grace must be 0 seconds or more, not {args.grace}")
    logger = logging.getLogger("iampg.proxy")
    handler = _log_handler(args.log_format, sys.stderr)
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        new_loop = loop_factory(args.event_loop)  # its warning in the chosen log format
        proxies = _proxies(args)
        loop = new_loop()
        try:
            return loop.run_until_complete(_serve(proxies, out))
        finally:
            loop.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def _log_generated_ca(proxy: Proxy, ca_file: Path) -> None:
    """Log the CA of a generated certificate: its file and PEM text (one record)."""
    pem = ca_file.read_text()
    sslmode = "verify-full" if "sslmode=verify-full" in proxy.conninfo else "verify-ca"
    logging.getLogger("iampg.proxy").info(
        "iampg proxy: clients on port %d verify its generated certificate with "
        "sslrootcert=%s (sslmode=%s):\n%s",
        proxy.port,
        ca_file,
        sslmode,
        pem.rstrip("\n"),
        extra={
            "iampg_proxy": {
                "event": "generated certificate",
                "port": proxy.port,
                "ca_file": str(ca_file),
                "sslmode": sslmode,
                "ca_pem": pem,
            }
        },
    )


async def _serve(proxies: list[Proxy], out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    started: list[Proxy] = []
    try:
        for proxy in proxies:
            await proxy.astart()
            started.append(proxy)
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():  # the second one: no more grace
                for proxy in started:
                    proxy.close_sessions_now()
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        for proxy in proxies:
            out.write(proxy.conninfo + "\n")
        out.flush()
        for proxy in proxies:
            if proxy.ca_file is not None:
                _log_generated_ca(proxy, proxy.ca_file)
        await stop.wait()
        await asyncio.gather(*(proxy.astop() for proxy in started))
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
        await asyncio.gather(*(proxy.astop() for proxy in started))
    return 0
