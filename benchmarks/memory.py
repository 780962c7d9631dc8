"""Memory: RSS of 1 000 providers, and of an idle 20-connection pool (fresh processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks._common import EmulatorInfo, Result, child_env

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


def run(rds: EmulatorInfo, *, quick: bool = False) -> list[Result]:
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
    return [
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
        )
    ]
