"""``iampg proxy`` under pgbench: against a direct client, against PgBouncer, latency per query.

Every variant talks to the same emulator (its own process, in front of the same PostgreSQL):

- **direct**: pgbench to the emulator over verified TLS, with a token signed just before the
  runs in ``PGPASSWORD``: a client that signs its own token (once: the cheapest a signing
  client can be; signing per connection would add botocore's signing time, about 0.2 ms,
  see the ``token`` group, to every connect);
- **proxy**: pgbench to the proxy (plain TCP on loopback, no password), which opens one
  upstream session per client session over verified TLS with a token from its provider. It
  runs as ``iampg proxy`` does by default: on uvloop where it is installed (the ``proxy``
  extra; the bench group installs it), and then a second proxy runs on asyncio's own loop as
  ``--event-loop asyncio`` does, as without uvloop (**proxy-asyncio**);
- **pgbouncer**: pgbench to Debian's PgBouncer in session mode (plain TCP on loopback, trust),
  started here with a generated configuration that logs in upstream with the same static
  token over verified TLS: the same path with a C pooler in the middle.

pgbench runs the built-in select-only script (``-S``: one indexed ``SELECT`` per transaction)
on a scale-1 database. Rows: 8 clients with persistent connections (proxy ÷ direct, proxy ÷
PgBouncer), a new connection per transaction (``-C``: proxy ÷ direct) with 8 clients and with
one, and the latency one client sees per query (p50 and p99 added over direct). The variants
alternate within each round, the order rotating per round; each claim is the median of the
per-round ratios with their range and the load average.

``python -m benchmarks.proxy --profile FILE [--reconnect] [--perf] [--event-loop KIND]`` runs
the proxy under cProfile (or, with ``--perf``, Linux's ``perf record`` on its process, which
sees uvloop, OpenSSL and the kernel too) while pgbench drives it and prints where the relay's
(or, with ``--reconnect``, session setup's) time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from benchmarks._common import EmulatorInfo, Result, Stats, child_env
from iampg import TokenProvider

DATABASE = "iampg_pgbench"
USER = "postgres"
CLIENTS = 8
BUDGET = 90.0  # seconds for the measured rounds of the whole group; setup comes on top
WHAT_LATENCY = "latency added per query, 1 client, persistent (`pgbench -S -c 1`)"
INSTALL_HINT = "bash tools/bench_tools.sh installs it as root with apt-get"


def find_program(name: str) -> str | None:
    """Return the path of ``name`` (PATH, /usr/sbin, PostgreSQL's bin directories) or None."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    candidates = [Path(f"/usr/sbin/{name}"), *versions]
    existing = [str(c) for c in candidates if os.access(c, os.X_OK)]
    return existing[-1] if existing else None


# -- pgbench -------------------------------------------------------------------------------


@dataclass
class Target:
    """One way to reach the database: a libpq connection string and its password, if any."""

    name: str
    conninfo: str
    password: str | None = None
    event_loop: str | None = None  # the proxy's
    pid: int | None = None  # the relay's process (the proxy's, PgBouncer's), if any


@dataclass
class Run:
    """What one pgbench run reported."""

    tps: float
    latencies_us: list[float] = field(default_factory=list)
    #: CPU microseconds per transaction by process: pgbench, the relay, the emulator.
    cpu_us: dict[str, float] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float | None:
    """Return the CPU time (user + system) process ``pid`` has used, or None (not Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.MULTILINE)


def pgbench(
    program: str,
    target: Target,
    *,
    clients: int,
    seconds: int | None = None,
    transactions: int | None = None,
    reconnect: bool = False,
    latencies: bool = False,
    emulator_pid: int | None = None,
) -> Run:
    """Run pgbench's select-only script against ``target``; return its TPS (and latencies).

    The password goes in ``PGPASSWORD``, never on the command line. ``latencies`` keeps each
    transaction's latency (pgbench's per-transaction log, microseconds).
    """
    with tempfile.TemporaryDirectory(prefix="iampg-pgbench-") as logs:
        args = [program, "-n", "-S", "-c", str(clients), "-j", str(min(clients, 2))]
        args += ["-T", str(seconds)] if seconds is not None else ["-t", str(transactions)]
        if reconnect:
            args.append("-C")
        if latencies:
            args += ["-l", f"--log-prefix={logs}/tx"]
        args.append(target.conninfo)
        extra = {"PGPASSWORD": target.password} if target.password else {}
        limit = (seconds or 10) + 60
        pids = {"relay": target.pid, "emulator": emulator_pid}
        before = {name: cpu_seconds(pid) for name, pid in pids.items() if pid is not None}
        children = _children_cpu()
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=limit,
            env=child_env(**extra),
            check=False,
        )
        spent = {name: cpu_seconds(pid) for name, pid in pids.items() if pid is not None}
        spent["pgbench"] = _children_cpu() - children
        found = _TPS.search(done.stdout)
        count = _PROCESSED.search(done.stdout)
        if done.returncode != 0 or found is None:
            tail = (done.stderr or done.stdout)[-600:].strip()
            msg = f"pgbench via {target.name} failed (exit {done.returncode}): {tail}"
            raise RuntimeError(msg)
        values = _latencies(Path(logs)) if latencies else []
        transactions = int(count[1]) if count is not None else 0
        return Run(float(found[1]), values, _per_transaction(before, spent, transactions))


def _latencies(logs: Path) -> list[float]:
    """Return each transaction's latency (µs) from pgbench's per-transaction logs."""
    values: list[float] = []
    for path in logs.glob("tx*"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:  # client transaction latency_us script epoch us
                values.append(float(parts[2]))
    return values


def _per_transaction(
    before: dict[str, float | None], after: dict[str, float | None], transactions: int
) -> dict[str, float]:
    """Return each process's CPU µs per transaction (pgbench's ``after`` is already a delta)."""
    cpu: dict[str, float] = {}
    if transactions <= 0:
        return cpu
    for name, total in after.items():
        start = before.get(name) if name != "pgbench" else 0.0
        if total is not None and start is not None:
            cpu[name] = (total - start) / transactions * 1e6
    return cpu


def prepare_database(program: str, backend_dsn: str) -> None:
    """Create and fill pgbench's scale-1 database on the backend, unless it is there."""
    with psycopg.connect(backend_dsn, autocommit=True) as conn:
        if not conn.execute("select 1 from pg_database where datname = %s", (DATABASE,)).fetchone():
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(DATABASE)))
    dsn = make_conninfo(backend_dsn, dbname=DATABASE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("select to_regclass('pgbench_accounts')").fetchone() != (None,):
            return
    init = [program, "-i", "-q", "-s", "1", dsn]
    subprocess.run(init, capture_output=True, timeout=120, check=True, env=child_env())


# -- the proxy and PgBouncer in their own processes -----------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _endpoint_fields(emu: EmulatorInfo) -> dict[str, Any]:
    return {
        "host": emu.host,
        "user": USER,
        "dbname": DATABASE,
        "port": emu.port,
        "hostaddr": emu.listen_host,
        "region": emu.region,
        "sslmode": "verify-full",
        "sslrootcert": emu.ca_file,
        "connect_timeout": "10",
    }


@contextlib.contextmanager
def proxy_process(
    emu: EmulatorInfo,
    profile: str | None = None,
    *,
    event_loop: str = "auto",
    name: str = "proxy",
) -> Iterator[Target | str]:
    """Run the proxy in a child process; yield its target, or why it is not available.

    ``event_loop`` as ``iampg proxy --event-loop`` takes it (its default: ``auto``).
    """
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- the child's stderr, closed below
    args = [sys.executable, "-m", "benchmarks._proxy", "--event-loop", event_loop, "--endpoint"]
    args.append(json.dumps(_endpoint_fields(emu)))
    if profile:
        args += ["--profile", profile]
    proc = subprocess.Popen(
        args,
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
        data = json.loads(line) if line else {"error": "the proxy process exited"}
        if "error" in data:
            log.seek(0)
            tail = log.read()[-1500:].decode(errors="replace")
            print(f"[bench] proxy unavailable: {data['error']}\n{tail}", file=sys.stderr)
            yield str(data["error"])
        else:
            # The proxy's own connection string (no password), with the database pgbench uses.
            target = Target(name, make_conninfo(data["conninfo"], dbname=DATABASE))
            target.event_loop = str(data.get("event_loop", "?"))
            target.pid = proc.pid
            yield target
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        log.close()


def _quote(value: str) -> str:
    """Quote a value for a PgBouncer connection string (libpq's rules)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@contextlib.contextmanager
def pgbouncer_process(program: str, emu: EmulatorInfo, token: str) -> Iterator[Target]:
    """Run PgBouncer in session mode in front of the emulator; yield its target.

    It logs in upstream as the direct client does: the static token, TLS verified against the
    emulator's CA (``verify-full`` on the address, which the emulator's certificate names).
    As root it runs as ``postgres`` (else ``nobody``): PgBouncer refuses to run as root.
    """
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="iampg-pgbouncer-"))
    run_as: int | None = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                run_as = pwd.getpwnam(name).pw_uid
                break
    ca = directory / "ca.pem"
    shutil.copyfile(emu.ca_file, ca)
    upstream = (
        f"host={emu.listen_host} port={emu.port} dbname={DATABASE} user={USER} "
        f"password={_quote(token)}"
    )
    (directory / "userlist.txt").write_text(f'"{USER}" ""\n')
    config = directory / "pgbouncer.ini"
    config.write_text(
        "\n".join(
            [
                "[databases]",
                f"{DATABASE} = {upstream}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {directory / 'userlist.txt'}",
                "pool_mode = session",
                "max_client_conn = 200",
                "default_pool_size = 64",
                "server_tls_sslmode = verify-full",
                f"server_tls_ca_file = {ca}",
                f"logfile = {directory / 'pgbouncer.log'}",
                "log_connections = 0",
                "log_disconnections = 0",
                "",
            ]
        )
    )
    for path in (directory, *directory.iterdir()):
        path.chmod(0o700 if path.is_dir() else 0o600)
        if run_as is not None:
            os.chown(path, run_as, -1)
    proc = subprocess.Popen(
        [program, str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        user=run_as,
        env=child_env(),
    )
    try:
        target = Target(
            "pgbouncer", f"host=127.0.0.1 port={port} user={USER} dbname={DATABASE}", pid=proc.pid
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(target.conninfo, connect_timeout=5) as conn:
                    conn.execute("select 1")
                break
            except psycopg.OperationalError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = directory / "pgbouncer.log"
                    tail = log.read_text()[-800:] if log.exists() else ""
                    msg = f"PgBouncer did not start: {exc}\n{tail}"
                    raise RuntimeError(msg) from None
                time.sleep(0.2)
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- measuring -----------------------------------------------------------------------------


def _rounds(
    program: str,
    targets: list[Target],
    runs: int,
    deadline: float,
    **kwargs: Any,
) -> dict[str, list[Run]]:
    """Run pgbench on every target per round, the order rotating; stop early at ``deadline``.

    At least two rounds run whatever the deadline, so every row has a pair to compare.
    """
    out: dict[str, list[Run]] = {t.name: [] for t in targets}
    for i in range(runs):
        if i >= 2 and time.monotonic() > deadline:
            break
        order = targets[i % len(targets) :] + targets[: i % len(targets)]
        for target in order:
            out[target.name].append(pgbench(program, target, **kwargs))
    return out


def _load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def _skipped(row_id: str, what: str, compared_with: str, bar: str, reason: str) -> Result:
    return Result(row_id, what, compared_with, f"not measured: {reason}", "—", bar, None)


def _ratio_row(
    row_id: str,
    what: str,
    *,
    compared_with: str,
    ours: list[float],
    theirs: list[float],
    names: tuple[str, str],
    bar: str,
    goal: float | None,
) -> Result:
    ratios = [x / y for x, y in zip(ours, theirs, strict=True)]
    r, a, b = Stats.of(ratios), Stats.of(ours), Stats.of(theirs)
    return Result(
        id=row_id,
        what=what,
        compared_with=compared_with,
        figures=(
            f"{names[0]} {a.median:.0f} tps (IQR {a.p25:.0f}-{a.p75:.0f}); "
            f"{names[1]} {b.median:.0f} tps (IQR {b.p25:.0f}-{b.p75:.0f})"
        ),
        claim=(
            f"ratio {r.median:.3f} ({len(ratios)} paired runs: {r.minimum:.3f}-{r.maximum:.3f}, "
            f"spread {r.spread():.3f}; {_load()})"
        ),
        bar=bar,
        passed=None if goal is None else r.median >= goal,
        ratio=r.median,
        details={
            "unit": "transactions/s",
            names[0]: ours,
            names[1]: theirs,
            "ratios": ratios,
            "load_average_after": os.getloadavg(),
        },
    )


def _latency_row(got: dict[str, list[Run]], seconds: int) -> Result:
    """Per-query latency of one client: p50 and p99 added by the proxy (and PgBouncer)."""
    added: dict[str, dict[str, list[float]]] = {}
    for name, runs in got.items():
        if name == "direct":
            continue
        added[name] = {"p50": [], "p99": []}
        for ours, base in zip(runs, got["direct"], strict=True):
            a, b = Stats.of(ours.latencies_us), Stats.of(base.latencies_us)
            added[name]["p50"].append(a.median - b.median)
            added[name]["p99"].append(a.p99 - b.p99)
    pooled = {
        name: Stats.of([x for r in runs for x in r.latencies_us]) for name, runs in got.items()
    }
    figures = "; ".join(
        f"{name} p50 {s.median:.0f} µs, p99 {s.p99:.0f} µs" for name, s in pooled.items()
    )
    proxy = added["proxy"]
    p50, p99 = Stats.of(proxy["p50"]), Stats.of(proxy["p99"])
    claim = (
        f"proxy adds p50 {p50.median:.0f} µs ({p50.minimum:.0f} to {p50.maximum:.0f}), "
        f"p99 {p99.median:.0f} µs ({p99.minimum:.0f} to {p99.maximum:.0f})"
    )
    if "pgbouncer" in added:
        b50, b99 = Stats.of(added["pgbouncer"]["p50"]), Stats.of(added["pgbouncer"]["p99"])
        claim += f"; PgBouncer adds p50 {b50.median:.0f} µs, p99 {b99.median:.0f} µs"
    ratio = pooled["proxy"].median / pooled["direct"].median
    return Result(
        id="proxy_latency",
        what=WHAT_LATENCY,
        compared_with="direct with a token" + ("; PgBouncer" if "pgbouncer" in added else ""),
        figures=figures,
        claim=f"{claim} (median of {len(proxy['p50'])} paired {seconds} s runs; {_load()})",
        bar="reported",
        passed=None,
        ratio=ratio,
        details={
            "unit": "µs per query",
            "added": added,
            "pooled": {name: s.__dict__ for name, s in pooled.items()},
            "load_average_after": os.getloadavg(),
        },
    )


DIRECT_WITH = "pgbench directly to the emulator, static token, verified TLS"
BOUNCER_WITH = "PgBouncer (session mode) in front of the same emulator, static token"
# Every row of the group: what, compared with, bar. A row that cannot be measured says why.
ROWS = {
    "proxy_select": (
        f"pgbench -S, {CLIENTS} clients, persistent connections",
        DIRECT_WITH,
        "ratio ≥ 0.85",
    ),
    "proxy_select_asyncio": (
        f"pgbench -S, {CLIENTS} clients, persistent, the proxy on asyncio's loop (without uvloop)",
        DIRECT_WITH + "; PgBouncer",
        "reported",
    ),
    "proxy_pgbouncer": (
        f"pgbench -S, {CLIENTS} clients, persistent: proxy vs PgBouncer",
        BOUNCER_WITH,
        "ratio ≥ 1 (proxy ≥ PgBouncer)",
    ),
    "proxy_cpu": (
        f"CPU per transaction by process, pgbench -S, {CLIENTS} clients, persistent",
        "each path of the rows above (relay: the proxy or PgBouncer)",
        "reported",
    ),
    "proxy_connect": (
        f"pgbench -S -C, {CLIENTS} clients, a new connection per transaction",
        "pgbench directly, a token signed once (PGPASSWORD)",
        "reported",
    ),
    "proxy_connect_1": (
        "pgbench -S -C, 1 client: one new connection at a time",
        "pgbench directly, a token signed once (PGPASSWORD)",
        "reported",
    ),
    "proxy_latency": (WHAT_LATENCY, DIRECT_WITH + "; PgBouncer", "reported"),
}


def _ratio(
    row_id: str,
    got: dict[str, list[Run]],
    ours: str,
    theirs: str,
    goal: float | None,
    *,
    label: str | None = None,
) -> Result:
    what, compared_with, bar = ROWS[row_id]
    return _ratio_row(
        row_id,
        what,
        compared_with=compared_with,
        ours=[r.tps for r in got[ours]],
        theirs=[r.tps for r in got[theirs]],
        names=(label or ours, "PgBouncer" if theirs == "pgbouncer" else theirs),
        bar=bar,
        goal=goal,
    )


def _persistent_rows(got: dict[str, list[Run]], label: str, rows: list[Result]) -> None:
    """Append the rows of the persistent 8-client rounds: vs direct, vs PgBouncer, on asyncio."""
    rows.append(_ratio("proxy_select", got, "proxy", "direct", 0.85, label=label))
    if "pgbouncer" in got:
        rows.append(_ratio("proxy_pgbouncer", got, "proxy", "pgbouncer", 1.0, label=label))
    if "proxy-asyncio" in got:
        row = _ratio(
            "proxy_select_asyncio", got, "proxy-asyncio", "direct", None, label="proxy on asyncio"
        )
        if "pgbouncer" in got:
            pgb = Stats.of(
                [x.tps / y.tps for x, y in zip(got["proxy-asyncio"], got["pgbouncer"], strict=True)]
            )
            row.claim += f"; ÷ PgBouncer {pgb.median:.3f} ({pgb.minimum:.3f}-{pgb.maximum:.3f})"
            row.details["ratio_to_pgbouncer"] = pgb.median
        rows.append(row)
    else:
        rows.append(
            _skipped(
                "proxy_select_asyncio",
                *ROWS["proxy_select_asyncio"],
                "uvloop is not installed: the row above is the proxy on asyncio's loop",
            )
        )
    rows.append(_cpu_row(got, label))


def _cpu_row(got: dict[str, list[Run]], label: str) -> Result:
    """CPU per transaction of each process on each path (medians over the rounds)."""
    names = {"direct": "direct", "proxy": label, "proxy-asyncio": "proxy on asyncio"}
    names["pgbouncer"] = "PgBouncer"
    parts: list[str] = []
    medians: dict[str, dict[str, float]] = {}
    for variant, runs in got.items():
        by_process: dict[str, list[float]] = {}
        for run in runs:
            for process, value in run.cpu_us.items():
                by_process.setdefault(process, []).append(value)
        medians[variant] = {p: Stats.of(v).median for p, v in by_process.items()}
        if medians[variant]:
            shown = ", ".join(f"{p} {v:.0f}" for p, v in sorted(medians[variant].items()))
            total = sum(medians[variant].values())
            parts.append(f"{names.get(variant, variant)}: {shown} (sum {total:.0f})")
    what, compared_with, bar = ROWS["proxy_cpu"]
    measured = all(medians.values()) and medians
    return Result(
        id="proxy_cpu",
        what=what,
        compared_with=compared_with,
        figures="; ".join(parts) if measured else "not measured: no CPU times (not Linux?)",
        claim=f"µs of CPU per transaction, medians of the rounds above; {_load()}",
        bar=bar,
        passed=None,
        details={"unit": "CPU µs per transaction", "medians": medians},
    )


def _measure(emu: EmulatorInfo, backend_dsn: str, *, quick: bool, rows: list[Result]) -> str:
    """Append the rows measured to ``rows``; return why the others were not measured."""
    seconds, runs = (1, 2) if quick else (2, 5)
    program = find_program("pgbench")
    if program is None:
        return f"pgbench not found; {INSTALL_HINT}"
    prepare_database(program, backend_dsn)
    token = TokenProvider(emu.endpoint(USER, dbname=DATABASE)).token()
    direct = Target("direct", make_conninfo(**emu.conninfo(USER, DATABASE)), token)
    bouncer_program = find_program("pgbouncer")
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(proxy_process(emu))  # as `iampg proxy` runs by default
        if isinstance(proxy, str):
            return proxy
        label = f"proxy on {proxy.event_loop}"
        targets = [direct, proxy]
        if proxy.event_loop == "uvloop":  # and as it runs without uvloop
            on_asyncio = stack.enter_context(
                proxy_process(emu, event_loop="asyncio", name="proxy-asyncio")
            )
            if isinstance(on_asyncio, str):
                return on_asyncio
            targets.append(on_asyncio)
        bouncer_reason = f"pgbouncer not found; {INSTALL_HINT}"
        if bouncer_program is not None:
            try:
                targets.append(stack.enter_context(pgbouncer_process(bouncer_program, emu, token)))
            except RuntimeError as exc:
                bouncer_reason = str(exc).splitlines()[0]
                print(f"[bench] {exc}", file=sys.stderr)
        if all(target.name != "pgbouncer" for target in targets):
            rows.append(_skipped("proxy_pgbouncer", *ROWS["proxy_pgbouncer"], bouncer_reason))
        start = time.monotonic()
        for target in targets:  # warm up: connections, caches, the proxy's token
            pgbench(program, target, clients=CLIENTS, transactions=50)
        # Shares of the budget: persistent 8 clients (4 variants), -C twice (2), latency (3).
        got = _rounds(
            program,
            targets,
            runs,
            start + BUDGET * 0.4,
            clients=CLIENTS,
            seconds=seconds,
            emulator_pid=emu.pid,
        )
        _persistent_rows(got, label, rows)
        # A new connection per transaction: 8 at once (a burst), then one at a time (what a
        # connect through the proxy costs); 1 s runs, many of them: connects are slow.
        for row_id, clients, share in (
            ("proxy_connect", CLIENTS, 0.15),
            ("proxy_connect_1", 1, 0.15),
        ):
            deadline = time.monotonic() + BUDGET * share
            got = _rounds(
                program,
                [direct, proxy],
                runs + 2,
                deadline,
                clients=clients,
                seconds=1,
                reconnect=True,
            )
            rows.append(_ratio(row_id, got, "proxy", "direct", None))
        deadline = time.monotonic() + BUDGET * 0.3
        got = _rounds(program, targets, runs, deadline, clients=1, seconds=seconds, latencies=True)
        rows.append(_latency_row(got, seconds))
    return "not measured"


def run(emu: EmulatorInfo, backend_dsn: str, *, quick: bool = False) -> list[Result]:
    """Measure the proxy against a direct client and PgBouncer with pgbench.

    A missing program, a proxy that does not start or a pgbench run that fails ends the
    group, not the benchmark run: the rows not measured say why.
    """
    rows: list[Result] = []
    try:
        reason = _measure(emu, backend_dsn, quick=quick, rows=rows)
    except (RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
        reason = f"failed: {str(exc).strip().splitlines()[0][:300]}"
        print(f"[bench] proxy group failed: {exc}", file=sys.stderr)
    done = {row.id: row for row in rows}
    return [done.get(row_id) or _skipped(row_id, *ROWS[row_id], reason) for row_id in ROWS]


# -- profiling -----------------------------------------------------------------------------


def profile(
    output: str,
    seconds: int,
    top: int,
    *,
    reconnect: bool = False,
    perf: bool = False,
    event_loop: str = "auto",
) -> None:
    """Drive the proxy with pgbench under a profiler and print where its time goes.

    cProfile by default (Python functions; uvloop's compiled parts are invisible to it), or
    with ``perf`` Linux's ``perf record`` on the proxy's process (every library and the
    kernel; ``output`` is then perf's data file). ``reconnect``: a new connection per
    transaction (``pgbench -C``), so session setup (accept, upstream TLS, the token, the
    login) is profiled instead of the relay.
    """
    from benchmarks._common import emulator_process, isolate_aws_env  # noqa: PLC0415
    from iampg.emulator import Backend  # noqa: PLC0415

    isolate_aws_env()
    program = find_program("pgbench")
    if program is None:
        sys.exit(f"pgbench not found; {INSTALL_HINT}")
    perf_program = shutil.which("perf") if perf else None
    if perf and perf_program is None:
        sys.exit("perf not found (Debian: apt-get install linux-perf)")
    with Backend.auto() as backend:
        backend.ensure_role(backend.user, iam=True)  # RDS logs a user in with a token only so
        with emulator_process(backend.dsn, "rds") as emu:
            assert emu is not None, "the emulator did not start"
            prepare_database(program, backend.dsn)
            cprofile = None if perf else output
            with proxy_process(emu, profile=cprofile, event_loop=event_loop) as proxy:
                if isinstance(proxy, str):
                    sys.exit(proxy)
                pgbench(program, proxy, clients=CLIENTS, transactions=50)
                recorder = None
                if perf_program is not None:
                    command = [perf_program, "record", "-F", "999", "-g", "-o", output]
                    recorder = subprocess.Popen(
                        [*command, "-p", str(proxy.pid)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(0.5)
                got = pgbench(program, proxy, clients=CLIENTS, seconds=seconds, reconnect=reconnect)
                if recorder is not None:
                    recorder.send_signal(signal.SIGINT)
                    recorder.wait(timeout=60)
                print(
                    f"{got.tps:.0f} tps through the profiled proxy on {proxy.event_loop} "
                    f"({_load()})"
                )
    if perf_program is not None:
        for sort in ("dso", "dso,sym"):
            report = [perf_program, "report", "-i", output, "--stdio", "--no-children"]
            subprocess.run([*report, "--sort", sort, "-g", "none"], check=False)
        return
    stats = pstats.Stats(output)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy")
    parser.add_argument("--profile", required=True, help="where to write the profile")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--reconnect", action="store_true", help="pgbench -C: profile setup")
    parser.add_argument("--perf", action="store_true", help="perf record instead of cProfile")
    parser.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args()
    profile(
        args.profile,
        args.seconds,
        args.top,
        reconnect=args.reconnect,
        perf=args.perf,
        event_loop=args.event_loop,
    )


if __name__ == "__main__":
    main()
