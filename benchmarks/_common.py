"""Shared pieces: statistics, the fake AWS environment, emulator processes, results."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iampg import Endpoint
from iampg.emulator import FAKE_CREDENTIALS

RESULTS = Path(__file__).parent / "results"

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": FAKE_CREDENTIALS.access_key_id,
    "AWS_SECRET_ACCESS_KEY": FAKE_CREDENTIALS.secret_access_key,
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/iampg-bench-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/iampg-bench-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def isolate_aws_env() -> None:
    """Drop every AWS_*/PG* variable and set the documented fake keys, in this process."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "PG")):
            del os.environ[name]
    os.environ.update(FAKE_ENV)


def child_env(**extra: str) -> dict[str, str]:
    """Return an environment for a child process: isolated AWS settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PG"))}
    env.update(FAKE_ENV)
    env.update(extra)
    return env


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q`` quantile (0..1) with linear interpolation."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


@dataclass
class Stats:
    """Summary of a sample (same unit as the sample)."""

    n: int
    median: float
    p99: float
    p25: float
    p75: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        return cls(
            n=len(values),
            median=statistics.median(values),
            p99=percentile(values, 0.99),
            p25=percentile(values, 0.25),
            p75=percentile(values, 0.75),
            minimum=min(values),
            maximum=max(values),
        )

    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75 - self.p25) / self.median if self.median else float("nan")


def reference_loop_ms(repeats: int = 5) -> float:
    """Return the median CPU milliseconds of a fixed pure-Python loop: the machine's speed now.

    This shared 2-core machine's speed varies by several times over a day (other guests on its
    host): a token-cache hit and a botocore signing took 3-4x longer one afternoon than in
    that morning's run, and a pooled checkout's client CPU time with them, while the machine
    itself was mostly idle. Rows that report CPU time report this too, so that two runs'
    figures can be compared.
    """
    times = []
    for _ in range(repeats):
        start = time.process_time()
        sum(range(1_000_000))
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def median_interval(values: list[float], *, resamples: int = 2000) -> tuple[float, float]:
    """Return a 95 % bootstrap interval of the median of ``values`` (seeded, repeatable)."""
    rng = random.Random(7)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    return medians[int(resamples * 0.025)], medians[int(resamples * 0.975) - 1]


# -- results ------------------------------------------------------------------------------


@dataclass
class Result:
    """One row of the results table."""

    id: str
    what: str
    compared_with: str
    figures: str
    claim: str
    bar: str
    passed: bool | None
    ratio: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


# -- emulators in child processes ---------------------------------------------------------


@dataclass(frozen=True)
class EmulatorInfo:
    """Where a running emulator listens and what it signs for."""

    host: str
    port: int
    listen_host: str
    region: str
    ca_file: str
    service: str
    pid: int | None = None  # the emulator's process, when it runs in one of its own

    def endpoint(self, user: str, **params: Any) -> Endpoint:
        fields: dict[str, Any] = {
            "user": user,
            "port": self.port,
            "hostaddr": self.listen_host,
            "region": self.region,
            "sslmode": "verify-full",
            "sslrootcert": self.ca_file,
            "connect_timeout": "10",
        }
        if self.service == "dsql":
            fields["kind"] = "dsql"
        fields.update(params)
        return Endpoint(self.host, **fields)

    def conninfo(self, user: str, dbname: str = "postgres") -> dict[str, Any]:
        return {
            "host": self.host,
            "hostaddr": self.listen_host,
            "port": self.port,
            "user": user,
            "dbname": dbname,
            "sslmode": "verify-full",
            "sslrootcert": self.ca_file,
            "connect_timeout": 10,
        }


@contextmanager
def emulator_process(backend_dsn: str, service: str = "rds") -> Iterator[EmulatorInfo | None]:
    """Run an emulator in a child process; yield where it listens (None: not available)."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- the child's stderr, closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks._server",
            "--backend",
            backend_dsn,
            "--service",
            service,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=child_env(),
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        data = json.loads(line) if line else {"error": "the emulator process exited"}
        if "error" in data:
            log.seek(0)
            tail = log.read()[-2000:].decode(errors="replace")
            print(
                f"[bench] {service} emulator unavailable: {data['error']}\n{tail}", file=sys.stderr
            )
        yield None if "error" in data else EmulatorInfo(**data, pid=proc.pid)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        log.close()


class Timer:
    """perf_counter deltas."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
