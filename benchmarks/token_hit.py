"""token() on a cache hit vs a dict lookup and a clock read vs signing (botocore, stdlib)."""

from __future__ import annotations

import os
import time
import timeit
from typing import Any

from benchmarks._common import Result, Stats, us
from iampg import Endpoint, TokenProvider
from iampg._aws import AwsSigner
from iampg._sigv4 import EnvSigner

ENDPOINT = Endpoint("db.cluster-abc.us-east-1.rds.amazonaws.com", user="app")


def _per_call(stmt: Any, number: int, repeat: int) -> Stats:
    timer = timeit.Timer(stmt)
    stmt()  # warm
    return Stats.of([t / number for t in timer.repeat(repeat=repeat, number=number)])


def run(*, quick: bool = False) -> list[Result]:
    repeat = 9 if quick else 25
    provider = TokenProvider(ENDPOINT)
    provider.token()  # fill the cache
    cache = {"k": ("token", time.monotonic() + 600)}
    clock = time.monotonic

    def baseline() -> object:
        entry = cache.get("k")
        return entry if entry is not None and clock() < entry[1] else None

    client_signer = AwsSigner.shared()
    env_signer = EnvSigner.from_environ(os.environ)
    assert env_signer is not None
    client_signer.sign(ENDPOINT)  # make the client once: steady-state signing only

    hit = _per_call(provider.token, 200_000 // (4 if quick else 1), repeat)
    base = _per_call(baseline, 200_000 // (4 if quick else 1), repeat)
    boto = _per_call(lambda: client_signer.sign(ENDPOINT), 300 if quick else 1000, repeat)
    std = _per_call(lambda: env_signer.sign(ENDPOINT, 900.0), 2000 if quick else 10_000, repeat)
    return [
        Result(
            id="token_hit",
            what="`token()` on a cache hit",
            compared_with="dict lookup + clock read; botocore signing; stdlib signing",
            figures=(
                f"iampg {us(hit.median)} (p99 {us(hit.p99)}); baseline {us(base.median)}; "
                f"botocore sign {us(boto.median)}; stdlib sign {us(std.median)}"
            ),
            claim=(
                f"hit = {hit.median / base.median:.1f}x a dict lookup, "
                f"{boto.median / hit.median:.0f}x faster than signing with botocore; "
                f"stdlib signer {boto.median / std.median:.1f}x faster than botocore"
            ),
            bar="median ≤ 1 µs",
            passed=hit.median <= 1e-6,
            ratio=hit.median / base.median,
            details={
                "unit": "seconds per call (median/p99 over repeats of timeit loops)",
                "iampg_hit": hit.__dict__,
                "dict_clock": base.__dict__,
                "botocore_sign": boto.__dict__,
                "stdlib_sign": std.__dict__,
            },
        )
    ]
