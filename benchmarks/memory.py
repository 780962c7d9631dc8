"""Memory: RSS of 1 000 providers, of an idle 20-connection pool, and of the gateway.

The gateway figure: RSS of an emulator process before, while and after 2 000 TLS connections
are open at once, then after 500 full logins. Run alone with
``python -m benchmarks.memory [--connections N] [--logins N] [--backend DSN]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import ssl
import struct
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks._common import EmulatorInfo, Result, child_env, isolate_aws_env

_RSS = (
    "def rss():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmRSS:'):\n"
    "            return int(line.split()[1]) * 1024\n"
)

PROVIDERS = _RSS + (
    "import gc, json, os, iampg\n"
    "from iampg._sigv4 import EnvSigner\n"
    "signer = EnvSigner.from_environ(os.environ)\n"
    "ep = iampg.Endpoint('db.cluster-abc.us-east-1.rds.amazonaws.com', user='u0')\n"
    "iampg.TokenProvider(ep, signer=signer).token()\n"
    "gc.collect(); before = rss()\n"
    "ps = [iampg.TokenProvider(ep.replace(user=f'user{i}'), signer=signer) for i in range(1000)]\n"
    "for p in ps: p.token()\n"
    "gc.collect(); after = rss()\n"
    "print(json.dumps({'before': before, 'after': after}))\n"
)

POOL = _RSS + (
    "import gc, json, sys, time, iampg, psycopg_pool\n"
    "from psycopg.conninfo import make_conninfo\n"
    "info = json.loads(sys.argv[1])\n"
    "ep = iampg.Endpoint(info.pop('host'), kind=info.pop('kind'), **info)\n"
    "p = iampg.TokenProvider(ep); p.token()\n"
    "static = make_conninfo(**dict(ep), password=p.token())\n"
    "gc.collect(); before = rss()\n"
    "kind = sys.argv[2]\n"
    "if kind == 'iampg':\n"
    "    pool = iampg.ConnectionPool(provider=p, min_size=20, max_size=20)\n"
    "else:\n"
    "    pool = psycopg_pool.ConnectionPool(static, min_size=20, max_size=20)\n"
    "pool.wait(60); time.sleep(0.5); gc.collect(); after = rss()\n"
    "pool.close()\n"
    "print(json.dumps({'before': before, 'after': after}))\n"
)


# The gateway under test, in its own process: answers each line on stdin with its RSS.
GATEWAY = _RSS + (
    "import json, resource, sys\n"
    "from iampg.emulator import Emulator\n"
    "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
    "import inspect\n"
    "known = inspect.signature(Emulator).parameters\n"  # older emulators have no cap
    "uncapped = sys.argv[2] == 'uncapped' and 'max_unauthenticated' in known\n"
    "kwargs = {'max_unauthenticated': 100_000} if uncapped else {}\n"
    "with Emulator(sys.argv[1], **kwargs) as emu:\n"
    "    info = {'host': emu.host, 'port': emu.port, 'listen_host': emu.listen_host,\n"
    "            'region': emu.region, 'ca_file': str(emu.ca_file), 'service': 'rds'}\n"
    "    print(json.dumps(info), flush=True)\n"
    "    for line in sys.stdin:\n"
    "        print(json.dumps({'rss': rss(), 'open': emu.connection_count}), flush=True)\n"
)
_SSL_REQUEST = struct.pack("!II", 8, 80877103)
_SETTLE = 5.0  # seconds to wait for the gateway to close what the client closed


class _Gateway:
    """An emulator in a child process whose RSS can be asked for."""

    def __init__(self, backend_dsn: str, *, capped: bool) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", GATEWAY, backend_dsn, "capped" if capped else "uncapped"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=Path(__file__).parent.parent,
        )
        assert self.proc.stdout is not None
        self.info = EmulatorInfo(**json.loads(self.proc.stdout.readline()))

    def state(self) -> dict[str, int]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        data: dict[str, int] = json.loads(self.proc.stdout.readline())
        return data

    def settled(self) -> int:
        """Return the RSS once every connection is closed and it stops falling (bounded)."""
        deadline = time.monotonic() + _SETTLE
        last = self.state()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.state()
            if now["open"] == 0 and last["open"] == 0 and now["rss"] >= last["rss"]:
                return now["rss"]
            last = now
        return last["rss"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def gateway(backend_dsn: str, *, connections: int = 2000, logins: int = 500) -> dict[str, Any]:
    """Measure the gateway's RSS around ``connections`` TLS connections open at once.

    The connections do the TLS handshake and stay open (so the cap on unauthenticated
    connections is lifted for this run), then all close; then ``logins`` full logins with a
    token, one after the other. Returns RSS figures in bytes.
    """
    import iampg  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    connections = min(connections, hard - 64)
    gw = _Gateway(backend_dsn, capped=False)
    try:
        info = gw.info
        context = ssl.create_default_context(cafile=info.ca_file)
        before = gw.state()["rss"]
        with ExitStack() as stack:
            for _ in range(connections):
                raw = stack.enter_context(
                    socket.create_connection((info.listen_host, info.port), timeout=30)
                )
                raw.sendall(_SSL_REQUEST)
                if raw.recv(1) != b"S":
                    raise RuntimeError("the gateway refused TLS")
                stack.enter_context(context.wrap_socket(raw, server_hostname=info.host))
            peak = gw.state()["rss"]
        after = gw.settled()
        endpoint = info.endpoint("postgres")
        for _ in range(logins):
            iampg.connect(endpoint).close()
        after_logins = gw.settled()
    finally:
        gw.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {
        "connections": connections,
        "logins": logins,
        "before": before,
        "peak": peak,
        "after": after,
        "after_logins": after_logins,
    }


def _run(code: str, *args: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=Path(__file__).parent.parent,
        timeout=180,
        check=True,
    )
    data: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return data


def run(rds: EmulatorInfo, backend_dsn: str | None = None, *, quick: bool = False) -> list[Result]:
    runs = 2 if quick else 3
    providers = [_run(PROVIDERS) for _ in range(runs)]
    per = sorted((d["after"] - d["before"]) / 1000 for d in providers)[len(providers) // 2]
    ep = rds.endpoint("postgres")
    info = json.dumps(
        {
            "host": ep.host,
            "kind": ep.kind,
            "user": ep.user,
            "port": ep.port,
            "region": ep.region,
            "hostaddr": ep.hostaddr,
            **ep.params,
        }
    )
    pools = {k: [_run(POOL, info, k) for _ in range(runs)] for k in ("iampg", "static")}

    def med(rows: list[dict[str, int]]) -> float:
        return sorted(d["after"] - d["before"] for d in rows)[len(rows) // 2] / 2**20

    ours, theirs = med(pools["iampg"]), med(pools["static"])
    results = [_gateway_result(backend_dsn, quick=quick)] if backend_dsn else []
    return [
        *results,
        Result(
            id="memory",
            what="memory (RSS)",
            compared_with="plain psycopg_pool for the pool",
            figures=(
                f"1 000 providers with a cached token: {per * 1000 / 2**20:.2f} MiB "
                f"({per / 1024:.2f} KiB each); idle 20-connection pool: iampg {ours:.2f} MiB, "
                f"psycopg_pool {theirs:.2f} MiB"
            ),
            claim="reported",
            bar="reported",
            passed=None,
            details={"providers": providers, "pools": pools},
        ),
    ]


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


def _describe(figures: dict[str, Any]) -> str:
    return (
        f"gateway RSS {_mib(figures['before'])} before, {_mib(figures['peak'])} with "
        f"{figures['connections']} TLS connections open, {_mib(figures['after'])} after they "
        f"closed, {_mib(figures['after_logins'])} after {figures['logins']} logins"
    )


def _gateway_result(backend_dsn: str, *, quick: bool) -> Result:
    figures = gateway(backend_dsn, connections=500 if quick else 2000, logins=100 if quick else 500)
    return Result(
        id="memory-gateway",
        what="emulator memory (RSS)",
        compared_with="its own RSS before the connections",
        figures=_describe(figures),
        claim="reported",
        bar="after closing, within 32 MiB of before",
        passed=figures["after"] - figures["before"] < 32 * 2**20,
        details=figures,
    )


def main(argv: list[str] | None = None) -> int:
    """Print the gateway's RSS before, during and after many TLS connections."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--logins", type=int, default=500)
    parser.add_argument("--backend", default=None, help="PostgreSQL DSN (default: Backend.auto)")
    args = parser.parse_args(argv)
    isolate_aws_env()
    from iampg.emulator import Backend  # noqa: PLC0415

    with ExitStack() as stack:
        backend = (
            Backend.from_dsn(args.backend) if args.backend else stack.enter_context(Backend.auto())
        )
        backend.ensure_role(backend.user, iam=True)  # RDS logs a user in with a token only so
        dsn = backend.dsn
        figures = gateway(dsn, connections=args.connections, logins=args.logins)
    print(_describe(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
