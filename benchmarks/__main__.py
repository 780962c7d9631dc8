"""Run every benchmark and write benchmarks/results/latest.{md,json,png}.

Usage: ``nox -s bench`` or ``python -m benchmarks [--quick] [--only ID ...]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks._common import (
    RESULTS,
    Result,
    emulator_process,
    isolate_aws_env,
    reference_loop_ms,
)

GROUPS = (
    "token",
    "connect",
    "tls",
    "drivers",
    "pool",
    "presets",
    "refresh",
    "stampede",
    "lost",
    "cold",
    "memory",
    "proxy",
)
PACKAGES = (
    "iampg",
    "psycopg",
    "psycopg-binary",
    "psycopg-pool",
    "botocore",
    "boto3",
    "aurora-dsql-python-connector",
    "aws-advanced-python-wrapper",
)


def _version(name: str) -> str:
    """Return an installed distribution's version, or "not installed".

    metadata.version() normalises the name as pip does: aws-advanced-python-wrapper's own
    metadata spells it aws_advanced_python_wrapper, which a plain comparison missed.
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    out |= {name: _version(name) for name in PACKAGES}
    try:
        import psycopg  # noqa: PLC0415

        out["libpq"] = str(psycopg.pq.version())
    except ImportError:
        pass
    return out


def _machine() -> dict[str, Any]:
    """Describe the machine, its load and its speed; called before the first benchmark."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "reference_loop_cpu_ms_at_start": round(reference_loop_ms(), 1),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
        ]
        info["cpu"] = models[0] if models else platform.processor()
        meminfo = Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
        info["memory"] = meminfo[0].split(":", 1)[1].strip()
    except OSError:
        pass
    return info


def _markdown(report: dict[str, Any], results: list[Result]) -> str:
    mark = {True: "pass", False: "**MISS**", None: "—"}
    lines = [
        "# iampg benchmarks",
        "",
        f"Run {report['started']} in {report['duration_s']:.0f} s with `{report['command']}`.",
        "",
        (
            "Figures are medians (p99 where said) over interleaved repeated runs on a shared "
            "2-core machine; ratios, not absolute times, are the claims. The emulator runs in "
            "its own process in front of a real PostgreSQL."
        ),
        "",
        "| what | compared with | figures | claim | bar | result |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.what} | {r.compared_with} | {r.figures} | {r.claim} | {r.bar} | {mark[r.passed]} |"
        for r in results
    ]
    lines += ["", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in report["machine"].items()]
    lines += ["", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    lines += ["", f"Backend: {report['backend']}.", ""]
    return "\n".join(lines)


def _plot(results: list[Result], path: Any) -> bool:
    try:
        import matplotlib as mpl  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

        mpl.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError:
        return False
    rows = [r for r in results if r.ratio is not None]
    labels = [r.what.replace("`", "") for r in rows]
    values = [r.ratio for r in rows if r.ratio is not None]
    colours = ["#2a7" if r.passed else ("#c33" if r.passed is False else "#888") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh(labels, values, color=colours)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("iampg ÷ baseline (log scale; green: bar met, red: missed)")
    ax.set_title("iampg ÷ baseline (medians; p99 for refresh rows)", loc="right")
    for y, v in enumerate(values):
        assert v is not None
        ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument("--only", nargs="*", choices=GROUPS, help="run only these groups")
    parser.add_argument("--output", default=str(RESULTS), help="directory for latest.*")
    args = parser.parse_args(argv)
    groups = set(args.only or GROUPS)
    isolate_aws_env()

    from benchmarks import (  # noqa: PLC0415
        cold,
        connect,
        drivers,
        lost,
        memory,
        pool,
        proxy,
        stampede,
        tls,
        token_hit,
    )
    from iampg.emulator import Backend  # noqa: PLC0415

    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    machine = _machine()  # the load average and the machine's speed before any benchmark
    t0 = time.perf_counter()
    results: list[Result] = []
    with ExitStack() as stack:
        backend = stack.enter_context(Backend.auto())
        backend.ensure_role("admin", superuser=True)
        backend.ensure_role(backend.user, iam=True)  # RDS logs a user in with a token only so
        rds = stack.enter_context(emulator_process(backend.dsn, "rds"))
        assert rds is not None, "the RDS emulator did not start"
        dsql = stack.enter_context(emulator_process(backend.dsn, "dsql"))
        steps: list[tuple[str, Callable[[], list[Result]]]] = [
            ("token", lambda: token_hit.run(quick=args.quick)),
            ("connect", lambda: connect.run(rds, dsql, quick=args.quick)),
            ("tls", lambda: tls.run(rds, quick=args.quick)),
            ("drivers", lambda: drivers.run(rds, quick=args.quick)),
            ("pool", lambda: pool.throughput(rds, quick=args.quick)),
            ("presets", lambda: pool.presets(rds, dsql, quick=args.quick)),
            ("refresh", lambda: pool.refresh_latency(rds, quick=args.quick)),
            ("stampede", lambda: stampede.run(rds, dsql, quick=args.quick)),
            ("lost", lambda: lost.run(rds, backend, quick=args.quick)),
            ("cold", lambda: cold.run(quick=args.quick)),
            ("memory", lambda: memory.run(rds, backend.dsn, quick=args.quick)),
            ("proxy", lambda: proxy.run(rds, backend.dsn, quick=args.quick)),
        ]
        for name, step in steps:
            if name not in groups:
                continue
            t = time.perf_counter()
            print(f"[bench] {name} …", file=sys.stderr, flush=True)
            rows = step()
            for row in rows:
                status = {True: "pass", False: "MISS", None: "-"}[row.passed]
                print(f"[bench]   {status:4} {row.what}: {row.claim}", file=sys.stderr)
            print(f"[bench]   ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
            results.extend(rows)
        backend_desc = repr(backend)
    report = {
        "started": started.isoformat(),
        "duration_s": time.perf_counter() - t0,
        "command": "nox -s bench"
        if os.environ.get("NOX_CURRENT_SESSION")
        else shlex.join(["python", "-m", "benchmarks", *(argv or sys.argv[1:])]),
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "versions": _versions(),
        "backend": backend_desc,
        "results": [r.to_json() for r in results],
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "latest.md").write_text(_markdown(report, results))
    plotted = _plot(results, out / "latest.png")
    print(f"[bench] wrote {out}/latest.md, latest.json" + (", latest.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
