"""Cold processes: import cost and time to the first token, in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import Result, Stats, child_env, ms

HOST = "db.cluster-abc.us-east-1.rds.amazonaws.com"

# Each snippet times itself from before its first import; the interpreter's own start-up
# is the same for all and is reported separately as whole-process wall time.
# CPU time (process_time) is the primary figure: on a shared machine, wall time mostly
# measures how long the process waited for a core.
_PRELUDE = "import time as _t\n_s = _t.perf_counter(); _c = _t.process_time()\n"
_EPILOGUE = (
    "_e = _t.perf_counter() - _s; _ce = _t.process_time() - _c\nimport sys as _sys, json as _j\n"
    "print(_j.dumps({'s': _e, 'cpu': _ce, 'botocore': 'botocore' in _sys.modules}))\n"
)
SNIPPETS = {
    "import psycopg_pool": "import psycopg_pool\n",
    "import iampg": "import iampg\n",
    "first token: boto3 + psycopg_pool": (
        "import boto3, psycopg_pool\n"
        "boto3.client('rds', region_name='us-east-1')"
        f".generate_db_auth_token('{HOST}', 5432, 'app')\n"
    ),
    "first token: iampg (botocore)": (
        "import os, iampg\n"
        f"ep = iampg.Endpoint('{HOST}', user='app')\n"
        "iampg.TokenProvider(ep, aws_access_key_id=os.environ['AWS_ACCESS_KEY_ID'],"
        " aws_secret_access_key=os.environ['AWS_SECRET_ACCESS_KEY']).token()\n"
    ),
    "first token: iampg (environment keys, stdlib signer)": (
        "import os, iampg\n"
        "from iampg._sigv4 import EnvSigner\n"
        f"ep = iampg.Endpoint('{HOST}', user='app')\n"
        "iampg.TokenProvider(ep, signer=EnvSigner.from_environ(os.environ, endpoint=ep)).token()\n"
    ),
}


def _once(code: str) -> tuple[float, float, float, bool]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _PRELUDE + code + _EPILOGUE],
        capture_output=True,
        text=True,
        env=child_env(PYTHONDONTWRITEBYTECODE="0"),
        cwd=Path(__file__).parent.parent,
        timeout=120,
        check=True,
    )
    wall = time.perf_counter() - start
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return float(data["cpu"]), float(data["s"]), wall, bool(data["botocore"])


def measure(runs: int) -> dict[str, dict[str, object]]:
    samples: dict[str, list[float]] = {k: [] for k in SNIPPETS}
    elapsed: dict[str, list[float]] = {k: [] for k in SNIPPETS}
    walls: dict[str, list[float]] = {k: [] for k in SNIPPETS}
    botocore: dict[str, bool] = {}
    for code in SNIPPETS.values():  # warm the OS page cache and .pyc files
        _once(code)
    for _ in range(runs):  # interleaved, so background load hits all alike
        for name, code in SNIPPETS.items():
            cpu, s, wall, imported = _once(code)
            samples[name].append(cpu)
            elapsed[name].append(s)
            walls[name].append(wall)
            botocore[name] = botocore.get(name, False) or imported
    return {
        name: {
            "in_process": Stats.of(samples[name]),
            "elapsed": Stats.of(elapsed[name]),
            "wall": Stats.of(walls[name]),
            "botocore_imported": botocore[name],
        }
        for name in SNIPPETS
    }


def run(*, quick: bool = False) -> list[Result]:
    data = measure(7 if quick else 25)

    def med(name: str) -> float:
        stats = data[name]["in_process"]
        assert isinstance(stats, Stats)
        return stats.median

    pool = med("import psycopg_pool")
    ours = med("import iampg")
    boto_first = med("first token: boto3 + psycopg_pool")
    our_first = med("first token: iampg (botocore)")
    env_first = med("first token: iampg (environment keys, stdlib signer)")
    env_botocore = bool(
        data["first token: iampg (environment keys, stdlib signer)"]["botocore_imported"]
    )
    details: dict[str, Any] = {
        name: {
            "in_process": vars(v["in_process"]),
            "elapsed": vars(v["elapsed"]),
            "wall": vars(v["wall"]),
            "botocore_imported": v["botocore_imported"],
        }
        for name, v in data.items()
    }
    details["unit"] = (
        "seconds from before the first import: CPU time (in_process, the figure used) and "
        "elapsed; whole process wall time (wall)"
    )
    return [
        Result(
            id="import",
            what="`import iampg`",
            compared_with="`import psycopg_pool`",
            figures=f"iampg {ms(ours)}; psycopg_pool {ms(pool)}",
            claim=f"iampg costs {ms(ours - pool)} more than psycopg_pool",
            bar="≤ psycopg_pool + 15 ms",
            passed=ours <= pool + 0.015,
            ratio=ours / pool,
            details=details,
        ),
        Result(
            id="first_token",
            what="cold process to first token (botocore path)",
            compared_with="boto3 + psycopg_pool",
            figures=f"iampg {ms(our_first)}; boto3 + psycopg_pool {ms(boto_first)}",
            claim=f"{boto_first / our_first:.2f}x faster than boto3 + psycopg_pool",
            bar="≤ 200 ms",
            passed=our_first <= 0.200,
            ratio=our_first / boto_first,
        ),
        Result(
            id="first_token_env",
            what="cold process to first token, environment credentials (stdlib signer)",
            compared_with="`import psycopg_pool`; the same with botocore",
            figures=(
                f"iampg {ms(env_first)}; import psycopg_pool {ms(pool)}; "
                f"botocore path {ms(our_first)}; botocore imported: {env_botocore}"
            ),
            claim=(
                f"{ms(env_first - pool)} over `import psycopg_pool`; "
                f"{our_first / env_first:.1f}x faster than the botocore path; "
                f"botocore {'WAS' if env_botocore else 'was not'} imported"
            ),
            bar="≤ import psycopg_pool + 10 ms, without importing botocore",
            passed=env_first <= pool + 0.010 and not env_botocore,
            ratio=env_first / pool,
        ),
    ]
