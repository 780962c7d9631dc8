"""Pool throughput (8 threads; 64 tasks) and checkout latency across token refreshes."""

from __future__ import annotations

import asyncio
import os
import resource
import threading
import time
from typing import Any, NamedTuple

import psycopg_pool
from psycopg.conninfo import make_conninfo

import iampg
from benchmarks._common import (
    EmulatorInfo,
    Result,
    Stats,
    median_interval,
    ms,
    reference_loop_ms,
)
from iampg import Endpoint, SignedToken, Signer, TokenProvider
from iampg._aws import AwsSigner

POOL_SIZE = 8


def _static_conninfo(emu: EmulatorInfo, token: str) -> str:
    return make_conninfo(**emu.conninfo("postgres"), password=token)


def _threads_throughput(pool: psycopg_pool.ConnectionPool[Any], seconds: float) -> float:
    """Return checkouts + SELECT 1 per second with 8 threads."""
    stop = time.perf_counter() + seconds
    counts = [0] * 8

    def work(i: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            with pool.connection() as conn:
                conn.execute("SELECT 1").fetchone()
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


async def _tasks_throughput(pool: psycopg_pool.AsyncConnectionPool[Any], seconds: float) -> float:
    """Return checkouts + SELECT 1 per second with 64 tasks."""
    stop = time.perf_counter() + seconds
    counts = [0] * 64

    async def work(i: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            async with pool.connection() as conn:
                await (await conn.execute("SELECT 1")).fetchone()
            n += 1
        counts[i] = n

    start = time.perf_counter()
    await asyncio.gather(*(work(i) for i in range(64)))
    return sum(counts) / (time.perf_counter() - start)


def _throughput_row(name: str, what: str, ours: list[float], theirs: list[float]) -> Result:
    a, b = Stats.of(ours), Stats.of(theirs)
    ratios = [x / y for x, y in zip(ours, theirs, strict=True)]
    r = Stats.of(ratios)
    return Result(
        id=name,
        what=what,
        compared_with="plain psycopg_pool with a static password, same emulator",
        figures=(
            f"iampg {a.median:.0f}/s (IQR {a.p25:.0f}-{a.p75:.0f}); "
            f"psycopg_pool {b.median:.0f}/s (IQR {b.p25:.0f}-{b.p75:.0f})"
        ),
        claim=f"ratio {r.median:.3f} (paired runs: {r.minimum:.3f}-{r.maximum:.3f})",
        bar="ratio ≥ 0.97",
        passed=r.median >= 0.97,
        ratio=r.median,
        details={"unit": "checkouts/s", "iampg": ours, "psycopg_pool": theirs, "ratios": ratios},
    )


def throughput(emu: EmulatorInfo, *, quick: bool = False) -> list[Result]:
    runs, seconds = (4, 1.0) if quick else (21, 1.5)
    ep = emu.endpoint("postgres")
    provider = TokenProvider(ep)
    static = _static_conninfo(emu, provider.token())
    sizes: dict[str, Any] = {
        "min_size": POOL_SIZE,
        "max_size": POOL_SIZE,
        "open": True,
        "timeout": 30,
    }
    load_before, speed = os.getloadavg(), reference_loop_ms()
    with (
        iampg.ConnectionPool(ep, provider=provider, **sizes) as mine,
        psycopg_pool.ConnectionPool(static, **sizes) as plain,
    ):
        got = _paired({"iampg": mine, "plain": plain}, runs, seconds)
    rows = [
        _paired_row(
            "pool_threads",
            "pool throughput, 8 threads",
            "plain psycopg_pool with a static password, same emulator and sizes",
            got,
            load_before=load_before,
            speed=speed,
        )
    ]

    async def async_runs() -> tuple[list[float], list[float]]:
        a_ours: list[float] = []
        a_theirs: list[float] = []
        async with (
            iampg.AsyncConnectionPool(ep, provider=provider, **sizes) as mine,
            psycopg_pool.AsyncConnectionPool(static, **sizes) as plain,
        ):
            await mine.wait(30)
            await plain.wait(30)
            await _tasks_throughput(mine, 0.3)
            await _tasks_throughput(plain, 0.3)
            for i in range(runs):
                order = [(mine, a_ours), (plain, a_theirs)]
                for pool, sink in order if i % 2 == 0 else order[::-1]:
                    sink.append(await _tasks_throughput(pool, seconds))
        return a_ours, a_theirs

    a_ours, a_theirs = asyncio.run(async_runs())
    rows.append(_throughput_row("pool_async", "async pool throughput, 64 tasks", a_ours, a_theirs))
    return rows


class ShortLivedCredentials:
    """Wrap a signer as if its credentials had ``ttl`` seconds left at every signing.

    A provider then refreshes every ``ttl / 2`` seconds of real time: how a token engine
    behaves when the credentials are about to expire, compressed.
    """

    def __init__(self, inner: Signer, ttl: float) -> None:
        self._inner = inner
        self._ttl = ttl
        self.signings = 0

    def sign(self, endpoint: Endpoint, lifetime: float) -> SignedToken:
        self.signings += 1
        signed = self._inner.sign(endpoint, lifetime)
        return SignedToken(signed.token, signed.lifetime, self._ttl)


def _checkout_latencies(provider: TokenProvider, seconds: float) -> tuple[list[float], int]:
    """Return checkout latencies with 8 threads on a pool that recycles connections."""
    before = provider.stats().refreshes
    latencies: list[list[float]] = [[] for _ in range(8)]
    stop = time.perf_counter() + seconds
    # max_lifetime recycles connections continuously, so new ones need tokens all along.
    with iampg.ConnectionPool(
        provider=provider, min_size=POOL_SIZE, max_size=POOL_SIZE, max_lifetime=0.25, timeout=30
    ) as pool:
        pool.wait(30)

        def work(i: int) -> None:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                with pool.connection() as conn:
                    latencies[i].append(time.perf_counter() - start)
                    conn.execute("SELECT 1").fetchone()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [x for lat in latencies for x in lat], provider.stats().refreshes - before


def refresh_latency(emu: EmulatorInfo, *, quick: bool = False) -> list[Result]:
    seconds, runs = (2.0, 3) if quick else (3.0, 9)
    ep = emu.endpoint("postgres")
    rows = []
    for strategy in ("lazy", "ahead"):
        steady: list[float] = []
        refreshing: list[float] = []
        paired: list[float] = []
        refreshes = 0
        for _ in range(runs):  # interleave the two conditions
            with TokenProvider(ep, refresh=strategy) as quiet:
                quiet.token()
                lat_steady, _ = _checkout_latencies(quiet, seconds)
            # A new token every 0.2 s (botocore signing), while connections are recycled.
            signer = ShortLivedCredentials(AwsSigner.shared(), ttl=0.4)
            with TokenProvider(ep, refresh=strategy, signer=signer) as busy:
                busy.token()
                lat_busy, n = _checkout_latencies(busy, seconds)
            steady += lat_steady
            refreshing += lat_busy
            refreshes += n
            paired.append(Stats.of(lat_busy).p99 / Stats.of(lat_steady).p99)
        a, b = Stats.of(refreshing), Stats.of(steady)
        # The judged figure: the median of per-run p99 ratios. A p99 of checkouts on a pool
        # that recycles its connections every 0.25 s swings by +-20 % from run to run.
        ratio = Stats.of(paired).median
        rows.append(
            Result(
                id=f"refresh_{strategy}",
                what=f"checkout latency across token refreshes ({strategy})",
                compared_with="the same pool between refreshes",
                figures=(
                    f"p99 {ms(a.p99)} (median {ms(a.median)}) with {refreshes} refreshes; "
                    f"p99 {ms(b.p99)} (median {ms(b.median)}) without"
                ),
                claim=(
                    f"p99 ratio {ratio:.3f} (median of {runs} paired runs, "
                    f"{min(paired):.2f}-{max(paired):.2f}; pooled {a.p99 / b.p99:.3f})"
                ),
                bar="p99 within 10 %",
                passed=ratio <= 1.10,
                ratio=ratio,
                details={
                    "unit": "seconds per checkout",
                    "refreshing": a.__dict__,
                    "steady": b.__dict__,
                    "refreshes": refreshes,
                    "paired_p99_ratios": paired,
                },
            )
        )
    return rows


def _threads_run(
    pool: psycopg_pool.ConnectionPool[Any], seconds: float
) -> tuple[float, float, float]:
    """Return checkouts per second, client CPU seconds and context switches per checkout.

    The CPU time is the benchmark process's own (all its threads: the pool, its workers, the
    check): what the pool costs the client, much less sensitive to other load on the machine
    than the throughput, which shares 2 cores with the emulator and the server. It still
    follows the machine's speed, and the throughput: a round whose checkouts were slowed by
    other work shows more CPU time per checkout too (threads woken for less work each). The
    context switches (voluntary and not, all threads) show GIL hand-offs: a thread that
    releases the GIL while others wait for it lets one of them run.
    """
    stats_before = pool.get_stats().get("requests_num", 0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = time.process_time()
    rate = _threads_throughput(pool, seconds)
    cpu = time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    done = max(pool.get_stats().get("requests_num", 0) - stats_before, 1)
    switches = after.ru_nvcsw + after.ru_nivcsw - usage.ru_nvcsw - usage.ru_nivcsw
    return rate, cpu / done, switches / done


class Paired(NamedTuple):
    """Each pool's figures over interleaved rounds, by pool name."""

    rates: dict[str, list[float]]
    cpus: dict[str, list[float]]
    switches: dict[str, list[float]]


def _paired(
    pools: dict[str, psycopg_pool.ConnectionPool[Any]], runs: int, seconds: float
) -> Paired:
    """Return each pool's throughput, CPU and context switches per checkout over ``runs`` rounds.

    Every round runs each pool once, the order rotating from round to round, so each pool
    meets each position (and the machine's load of the moment) as often as the others.
    """
    names = list(pools)
    for pool in pools.values():
        pool.wait(30)
        _threads_throughput(pool, 0.3)  # warm up
    got = Paired({n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names})
    for i in range(runs):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            rate, cpu, switches = _threads_run(pools[name], seconds)
            got.rates[name].append(rate)
            got.cpus[name].append(cpu)
            got.switches[name].append(switches)
    return got


def _paired_row(
    row_id: str,
    what: str,
    compared_with: str,
    got: Paired,
    *,
    load_before: tuple[float, float, float],
    speed: float,
    extra: str = "",
) -> Result:
    """The row of pool "iampg" against pool "plain": median of paired ratios, 95 % interval."""
    ours, plain = got.rates["iampg"], got.rates["plain"]
    ratios = [x / y for x, y in zip(ours, plain, strict=True)]
    r, a, b = Stats.of(ratios), Stats.of(ours), Stats.of(plain)
    cpu = got.cpus["iampg"], got.cpus["plain"]
    cpu_ratios = [x / y for x, y in zip(*cpu, strict=True)]
    c = Stats.of(cpu_ratios)
    ci_low, ci_high = median_interval(ratios)
    cpu_low, cpu_high = median_interval(cpu_ratios)
    sw = Stats.of(got.switches["iampg"]).median, Stats.of(got.switches["plain"]).median
    load_after = os.getloadavg()
    return Result(
        id=row_id,
        what=what,
        compared_with=compared_with,
        figures=(
            f"iampg {a.median:.0f}/s (IQR {a.p25:.0f}-{a.p75:.0f}); "
            f"plain {b.median:.0f}/s (IQR {b.p25:.0f}-{b.p75:.0f}); client CPU per checkout "
            f"{Stats.of(cpu[0]).median * 1e6:.0f} vs {Stats.of(cpu[1]).median * 1e6:.0f} µs "
            f"(paired ratio {c.median:.3f}, 95 % interval {cpu_low:.3f}-{cpu_high:.3f}); "
            f"context switches per checkout {sw[0]:.2f} vs {sw[1]:.2f}{extra}; "
            f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}; reference loop "
            f"{speed:.0f} ms CPU; {r.n} rounds"
        ),
        claim=(
            f"ratio {r.median:.3f} (median of {r.n} paired rounds, 95 % interval "
            f"{ci_low:.3f}-{ci_high:.3f}, IQR {r.p25:.3f}-{r.p75:.3f}, "
            f"range {r.minimum:.3f}-{r.maximum:.3f})"
        ),
        bar="ratio ≥ 0.97",
        passed=r.median >= 0.97,
        ratio=r.median,
        details={
            "unit": "checkouts/s",
            "iampg": ours,
            "plain": plain,
            "ratios": ratios,
            "ratio_median_95ci": (ci_low, ci_high),
            "cpu_per_checkout_iampg": cpu[0],
            "cpu_per_checkout_plain": cpu[1],
            "cpu_ratios": cpu_ratios,
            "cpu_ratio_median_95ci": (cpu_low, cpu_high),
            "context_switches_per_checkout_iampg": got.switches["iampg"],
            "context_switches_per_checkout_plain": got.switches["plain"],
            "load_average_before": load_before,
            "load_average_after": load_after,
            "reference_loop_cpu_ms": speed,
        },
    )


_PRESET_BASELINE = "psycopg_pool without a check, static password, same emulator and sizes"


def presets(rds: EmulatorInfo, dsql: EmulatorInfo | None, *, quick: bool = False) -> list[Result]:
    """Pool throughput of each service preset's defaults against a plain psycopg_pool."""
    runs = int(os.environ.get("IAMPG_BENCH_PRESET_ROUNDS", "0")) or (4 if quick else 21)
    seconds = 1.0 if quick else 1.5
    rows: list[Result] = []
    sizes: dict[str, Any] = {"min_size": POOL_SIZE, "max_size": POOL_SIZE, "timeout": 30}
    if dsql is not None:
        load_before, speed = os.getloadavg(), reference_loop_ms()
        ep = dsql.endpoint("admin")
        provider = TokenProvider(ep)
        static = make_conninfo(**dsql.conninfo("admin"), password=provider.token())
        with (
            iampg.ConnectionPool(ep, provider=provider, open=True, **sizes) as mine,
            psycopg_pool.ConnectionPool(static, open=True, **sizes) as plain,
            psycopg_pool.ConnectionPool(
                static, open=True, check=psycopg_pool.ConnectionPool.check_connection, **sizes
            ) as checked,
        ):
            got = _paired({"iampg": mine, "plain": plain, "checked": checked}, runs, seconds)
        rates = got.rates
        old = Stats.of([x / y for x, y in zip(rates["checked"], rates["plain"], strict=True)])
        rows.append(
            _paired_row(
                "preset_dsql",
                "DSQL preset pool throughput (checkout check included), 8 threads",
                _PRESET_BASELINE,
                got,
                load_before=load_before,
                speed=speed,
                extra=f"; a round trip per checkout (check_connection): ratio {old.median:.3f}",
            )
        )
    load_before, speed = os.getloadavg(), reference_loop_ms()
    ep = rds.endpoint("postgres")
    provider = TokenProvider(ep)
    static = make_conninfo(**rds.conninfo("postgres"), password=provider.token())
    serverless: dict[str, Any] = {
        "max_size": POOL_SIZE,
        "timeout": 30,
    }  # the preset's min_size=0, max_idle=240
    with (
        iampg.ConnectionPool(
            ep, provider=provider, profile="aurora-serverless", open=True, **serverless
        ) as mine,
        psycopg_pool.ConnectionPool(
            static, open=True, min_size=0, max_idle=240.0, **serverless
        ) as plain,
    ):
        got = _paired({"iampg": mine, "plain": plain}, runs, seconds)
    rows.append(
        _paired_row(
            "preset_aurora_serverless",
            "Aurora Serverless preset pool throughput (min_size 0, max_idle 240 s), 8 threads",
            _PRESET_BASELINE,
            got,
            load_before=load_before,
            speed=speed,
        )
    )
    return rows
