"""Recovery after every pooled connection was cut at once (a restart, a failover)."""

from __future__ import annotations

import math
import time
from typing import Any

import psycopg_pool
from psycopg.conninfo import make_conninfo

import iampg
from benchmarks._common import EmulatorInfo, Result, Stats
from iampg import TokenProvider
from iampg.emulator import Backend

APP = "iampg-bench-lost"


def _recovery(pool: psycopg_pool.ConnectionPool[Any], backend: Backend, app: str) -> float:
    """Seconds from all sessions cut to the first query answered; inf after PoolTimeout."""
    pool.wait(timeout=30)
    backend.terminate_sessions(app)
    start = time.perf_counter()
    try:
        with pool.connection() as conn:
            conn.execute("SELECT 1").fetchone()
    except psycopg_pool.PoolTimeout:
        return math.inf
    return time.perf_counter() - start


def _seconds(value: float) -> str:
    return "PoolTimeout" if math.isinf(value) else f"{value:.2f} s"


def run(rds: EmulatorInfo, backend: Backend, *, quick: bool = False) -> list[Result]:
    rounds = 1 if quick else 2
    results: list[Result] = []
    ep = rds.endpoint("postgres")
    provider = TokenProvider(ep)
    # Six dead connections take psycopg_pool 0+1+2+4+8+16 s of pauses: past its 30 s timeout.
    for size in (4, 6):
        stock_app, ours_app = f"{APP}-stock-{size}", f"{APP}-iampg-{size}"
        conninfo = make_conninfo(**rds.conninfo("postgres"), application_name=stock_app)
        stock_times: list[float] = []
        ours_times: list[float] = []
        for _ in range(rounds):
            # psycopg_pool alone, with its own checkout check and a token baked in (valid
            # for the few seconds this takes).
            with psycopg_pool.ConnectionPool(
                conninfo,
                kwargs={"password": provider.token()},
                min_size=size,
                check=psycopg_pool.ConnectionPool.check_connection,
                open=True,
            ) as stock:
                stock_times.append(_recovery(stock, backend, stock_app))
            with iampg.ConnectionPool(
                provider=provider,
                min_size=size,
                check=psycopg_pool.ConnectionPool.check_connection,
                kwargs={"application_name": ours_app},
                open=True,
            ) as ours:
                ours_times.append(_recovery(ours, backend, ours_app))
        theirs, mine = Stats.of(stock_times), Stats.of(ours_times)
        results.append(
            Result(
                id=f"lost-{size}",
                what=f"first query after all {size} pooled connections were cut",
                compared_with="psycopg_pool with check_connection",
                figures=(
                    f"iampg median {mine.median * 1e3:.0f} ms (max {mine.maximum * 1e3:.0f} ms); "
                    f"psycopg_pool median {_seconds(theirs.median)} "
                    f"(max {_seconds(theirs.maximum)}); both with the 30 s checkout timeout"
                ),
                claim=f"iampg {mine.median * 1e3:.0f} ms vs {_seconds(theirs.median)}",
                bar="under 1 s (psycopg_pool alone backs off 0, 1, 2, 4 … s per dead connection)",
                passed=mine.maximum < 1.0,
                ratio=None if math.isinf(theirs.median) else mine.median / theirs.median,
                details={"unit": "seconds", "iampg": ours_times, "psycopg_pool": stock_times},
            )
        )
    return results
