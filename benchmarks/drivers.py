"""A new connection through each driver's integration vs the same driver with a static password."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from benchmarks._common import EmulatorInfo, Result, Stats, ms
from benchmarks.connect import _measure
from iampg import TokenProvider

Variants = dict[str, Callable[[], Any]]


class _Closing:
    """Close an async connection or engine on the loop that opened it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, close: Callable[[], Any]) -> None:
        self.loop = loop
        self._close = close

    def close(self) -> None:
        self.loop.run_until_complete(self._close())


def _psycopg2(emu: EmulatorInfo, provider: TokenProvider, token: str) -> Variants:
    import psycopg2  # noqa: PLC0415

    from iampg.integrations import psycopg2 as iampg_psycopg2  # noqa: PLC0415

    info = emu.conninfo("postgres")
    return {
        "static password": lambda: psycopg2.connect(**info, password=token),
        "iampg": lambda: iampg_psycopg2.connect(provider),
    }


def _asyncpg(emu: EmulatorInfo, provider: TokenProvider, token: str) -> Variants:  # noqa: ARG001
    import asyncpg  # noqa: PLC0415

    from iampg.integrations import asyncpg as iampg_asyncpg  # noqa: PLC0415

    loop = asyncio.new_event_loop()
    kwargs = {**iampg_asyncpg.connect_kwargs(provider), "password": token}

    def opened(connect: Callable[[], Any]) -> Callable[[], _Closing]:
        def open_one() -> _Closing:
            conn = loop.run_until_complete(connect())
            return _Closing(loop, conn.close)

        return open_one

    return {
        "static password": opened(lambda: asyncpg.connect(**kwargs)),
        "iampg": opened(lambda: iampg_asyncpg.connect(provider)),
    }


def _sqlalchemy(driver: str) -> Callable[[EmulatorInfo, TokenProvider, str], Variants]:
    """A new connection of a pool-less engine: iampg's listener vs a password in connect_args."""

    def variants(emu: EmulatorInfo, provider: TokenProvider, token: str) -> Variants:  # noqa: ARG001
        import sqlalchemy  # noqa: PLC0415
        from sqlalchemy.pool import NullPool  # noqa: PLC0415

        from iampg._connecting import prepare  # noqa: PLC0415
        from iampg.integrations import sqlalchemy as iampg_sa  # noqa: PLC0415

        # The same arguments iampg gives the driver, with the token fixed: only the listener
        # (token from the cache, the final parameters checked) differs.
        arguments = iampg_sa._ARGUMENTS[driver](prepare(provider, None, None, allow_insecure=False))  # noqa: SLF001
        static = sqlalchemy.create_engine(
            f"postgresql+{driver}://",
            connect_args={**arguments({}), "password": token},
            poolclass=NullPool,
        )
        ours = iampg_sa.create_engine(provider, driver=driver, poolclass=NullPool)
        return {"static password": static.connect, "iampg": ours.connect}

    return variants


DRIVERS: dict[str, Callable[[EmulatorInfo, TokenProvider, str], Variants]] = {
    "psycopg2": _psycopg2,
    "asyncpg": _asyncpg,
    "sqlalchemy+psycopg2": _sqlalchemy("psycopg2"),
    "sqlalchemy+pg8000": _sqlalchemy("pg8000"),
}


def _row(name: str, stats: dict[str, Stats], paired: float) -> Result:
    static, ours = stats["static password"], stats["iampg"]
    return Result(
        id=f"driver_{name.replace('+', '_')}",
        what=f"new {name} connection through the emulator (RDS mode)",
        compared_with=f"{name} with the token as a static password",
        figures=(
            f"iampg {ms(ours.median)} (p99 {ms(ours.p99)}); "
            f"static password {ms(static.median)} (p99 {ms(static.p99)})"
        ),
        claim=f"iampg {(paired - 1) * 100:+.1f} % vs static password (median of per-round ratios)",
        bar="≤ 3 % over static password",
        passed=paired <= 1.03,
        ratio=paired,
        details={"unit": "seconds per connect+close", **{k: v.__dict__ for k, v in stats.items()}},
    )


def run(rds: EmulatorInfo, *, quick: bool = False) -> list[Result]:
    """Measure every driver: one row each; a driver not installed is reported as such."""
    rounds = 30 if quick else 200
    provider = TokenProvider(rds.endpoint("postgres"))
    token = provider.token()
    results = []
    for name, make in DRIVERS.items():
        try:
            variants = make(rds, provider, token)
        except ImportError as exc:
            results.append(
                Result(
                    id=f"driver_{name.replace('+', '_')}",
                    what=f"new {name} connection through the emulator (RDS mode)",
                    compared_with=f"{name} with the token as a static password",
                    figures=f"not measured: {exc.name} is not installed",
                    claim="pending",
                    bar="≤ 3 % over static password",
                    passed=None,
                )
            )
            continue
        stats, paired = _measure(variants, rounds)
        results.append(_row(name, stats, paired))
    return results
