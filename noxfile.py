"""Quality gates: `nox` runs the local ones, `nox -t ci` every gate CI runs (the README's test).

Local: lint typecheck tests build docs. `tests` is the fast suite on nox's own interpreter, on
every core; `tests-3.10` … `tests-3.13` run the whole suite (the slow tests too, not the soak)
on each supported CPython, `minimums` on the oldest with the lowest versions pyproject.toml
allows.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests", "build", "docs"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
PROJECT = PYPROJECT["project"]
ALL_EXTRAS = ".[" + ",".join(PROJECT["optional-dependencies"]) + "]"

# The supported CPython versions are the ones the classifiers name: what is tested is what is
# claimed. CI runs the whole suite on the newest with the newest dependencies and on the oldest
# with the lowest ones (`minimums`); `nox -s tests-3.10` (…) runs any of them.
PYTHONS = sorted(
    (c.rpartition(" :: ")[2] for c in PROJECT["classifiers"] if re.fullmatch(r".*:: 3\.\d+", c)),
    key=lambda version: tuple(map(int, version.split("."))),
)
OLDEST, NEWEST = PYTHONS[0], PYTHONS[-1]

# `python -c _RUN_WITH_TIMEOUT <seconds> <python arguments>`: a run that outlives its time
# limit is killed, so one hung test fails its session instead of CI's whole time budget.
_RUN_WITH_TIMEOUT = (
    "import subprocess, sys; "
    "sys.exit(subprocess.run([sys.executable, *sys.argv[2:]], timeout=float(sys.argv[1]))"
    ".returncode)"
)
SUITE_TIMEOUT = 1500.0  # seconds for one whole-suite run; it takes about 4 minutes

# pytest selections (markers in pyproject.toml). The default addopts leave out the slow tests
# and the soak; the whole suite is everything but the soak, which only `nox -s soak` runs.
WHOLE_SUITE = ["-m", "not soak"]
# The fast suite runs on every core (pytest-xdist), one test file per worker at a time: the
# tests of a file share table and application names on the backend. Logical cores, as a
# machine with two threads per core runs the suite's waits and subprocesses well in parallel;
# $PYTEST_XDIST_AUTO_NUM_WORKERS sets another count, `-- -n 0` runs it in one process.
PARALLEL = ["-n", "logical", "--dist", "loadfile"]


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _version_key(path: Path) -> tuple[int, ...]:
    return _release(path.parent.parent.name)


def _pyenv_root() -> Path | None:
    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return None
    found = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False)
    return Path(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip() else None


def _shim_root(program: str) -> Path | None:
    """Return the pyenv root when ``program`` is one of its shims (``ROOT/shims/NAME``)."""
    shims = Path(program).parent
    return shims.parent if shims.name == "shims" and (shims.parent / "versions").is_dir() else None


@functools.cache
def interpreter(version: str) -> str:
    """Return what to give nox for CPython ``version``: ``pythonX.Y`` when it runs, else a path.

    Every nox command calls this for each supported version while loading this file, so it
    runs no pyenv shim: a shim starts pyenv (half a second), and one for a version that is
    installed but not selected fails when run. For a shim, or a ``pythonX.Y`` on PATH that
    does not run, the newest pyenv-installed ``X.Y.*`` is used, under the shim's pyenv root
    or ``pyenv root``.
    """
    name = f"python{version}"
    found = shutil.which(name)
    root = _shim_root(found) if found else None
    if (
        found
        and root is None
        and subprocess.run([found, "-c", ""], capture_output=True, check=False).returncode == 0
    ):
        return version
    root = root or _pyenv_root()
    if root is not None:
        candidates = sorted(root.glob(f"versions/{version}.*/bin/{name}"), key=_version_key)
        if candidates:
            return str(candidates[-1])
    return version  # nox says it is missing


def _install(session: nox.Session, *args: str) -> None:
    """Run ``session.install(*args)`` unless this environment has them from this pyproject.toml.

    pip takes seconds to find that nothing is missing, on every run of a reused environment.
    A stamp in the environment records what was installed from which pyproject.toml, written
    only when the installation ran (``--no-install`` skips both); the project itself is
    installed editable, so a change to its code needs no new installation.
    """
    stamp = Path(session.bin).parent / ".nox-installed"
    wanted = hashlib.sha256("\0".join([*args, Path("pyproject.toml").read_text()]).encode())
    if stamp.is_file() and stamp.read_text() == wanted.hexdigest():
        session.log("already installed: %s", " ".join(args))
        return
    session.install(*args)
    write = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"
    session.run_install("python", "-c", write, str(stamp), wanted.hexdigest(), log=False)


NODE_PEERS = Path("tests/node")  # node-postgres and the AWS SDK's signers, for the tests


def _node_peers(session: nox.Session) -> None:
    """Install the JavaScript peers the tests run (``npm ci``) where npm is; else they skip.

    npm records what it installed in ``node_modules/.package-lock.json``: while that is newer
    than the lock file, nothing is installed again.
    """
    npm = shutil.which("npm")
    installed = NODE_PEERS / "node_modules" / ".package-lock.json"
    lock = NODE_PEERS / "package-lock.json"
    if npm is None:
        session.log("npm not found: the tests with JavaScript clients skip")
    elif not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        session.run(
            npm, "ci", "--prefix", str(NODE_PEERS), "--no-audit", "--no-fund", external=True
        )


def _pytest(session: nox.Session, *args: str) -> None:
    """Run pytest with ``args`` and the session's arguments (given after ``--``).

    A run that selects no test (pytest's exit code 5) fails the session like any failure:
    an empty selection is a mistake, never a pass. tests/conftest.py says what was left out.
    A run still going after ``SUITE_TIMEOUT`` is killed (pytest's faulthandler_timeout has
    dumped where it hangs by then).

    Bytecode is written even where ``PYTHONDONTWRITEBYTECODE`` is set: pytest keeps its
    assertion-rewritten test modules there (``__pycache__``, ignored by git), and without them
    each process (every worker, every pytest a test starts) rewrites them all again.
    """
    _node_peers(session)
    session.run(
        "python",
        "-c",
        _RUN_WITH_TIMEOUT,
        str(SUITE_TIMEOUT),
        "-m",
        "pytest",
        *args,
        *session.posargs,
        env={"PYTHONDONTWRITEBYTECODE": ""},
    )


@nox.session
def quickstart(session: nox.Session) -> None:
    """Run the seed scenario: on the embedded emulator, or on the endpoint given after --."""
    session.install("-e", ".[emulator,binary]")
    session.run("python", "examples/quickstart.py", *session.posargs)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["ci"])
def typecheck(session: nox.Session) -> None:
    """Type-check the library, the tests (type tests included) and the examples: mypy --strict."""
    session.install("-e", ALL_EXTRAS, *_group("typecheck"))
    session.run("mypy", "--strict")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the fast tests (not the slow ones, not the soak) on nox's own Python, in parallel."""
    _install(session, "-e", ".[emulator]", *_group("tests"))
    _pytest(session, *PARALLEL)


def _whole_suite(session: nox.Session) -> None:
    """Run the whole suite (slow tests too, not the soak) on this Python."""
    _install(session, "-e", ".[emulator]", *_group("tests"))
    _pytest(session, *WHOLE_SUITE)


for _version in PYTHONS:
    nox.session(
        name=f"tests-{_version}",
        python=interpreter(_version),
        tags=["ci"] if _version == NEWEST else [],
        default=False,
    )(_whole_suite)


@nox.session(name="tests-slow", default=False)
def tests_slow(session: nox.Session) -> None:
    """Run the whole suite, slow tests included (not the soak), on nox's own Python."""
    _whole_suite(session)


@nox.session(python=interpreter(OLDEST), tags=["ci"], default=False)
def minimums(session: nox.Session) -> None:
    """Run the whole suite on the oldest Python with the lowest dependency versions allowed.

    psycopg, psycopg-pool, botocore and each extra's requirement are pinned to the lower bound
    pyproject.toml declares (a generated constraints file), so every ``>=`` is a tested claim;
    the test tools get their lowest allowed versions as well.
    """
    lowest: dict[str, str] = {}
    for requirement in [*PROJECT["dependencies"], *PROJECT["optional-dependencies"].values()]:
        for spec in [requirement] if isinstance(requirement, str) else requirement:
            match = re.fullmatch(
                r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9][0-9A-Za-z.]*)(?:\s*;.*)?", spec
            )
            if match is None:
                session.error(f"no lower bound to pin in {spec!r}: declare it as name>=version")
            name, version = match[1].lower().replace("_", "-"), match[2]
            # Where an extra asks more than the core (or another extra), the higher bound holds.
            if name not in lowest or _release(version) > _release(lowest[name]):
                lowest[name] = version
    pins = [f"{name}=={version}" for name, version in sorted(lowest.items())]
    constraints = Path(session.create_tmp()) / "minimums.txt"
    constraints.write_text("\n".join(pins) + "\n")
    session.log("lowest versions: %s", ", ".join(pins))
    # uv resolves in seconds where pip backtracks for minutes over boto3 releases. Its lowest
    # resolution takes the test tools' lower bounds too (boto3 1.35.0 goes with any botocore
    # 1.35.x); the constraints pin the project's own requirements.
    session.install("uv")
    python = str(Path(session.bin) / "python")
    lowest_install = ["uv", "pip", "install", "--python", python, "--resolution", "lowest-direct"]
    session.run(*lowest_install, "-c", str(constraints), "-e", ALL_EXTRAS, *_group("tests"))
    session.run("uv", "pip", "freeze", "--python", python)  # what was tested, in the log
    _pytest(session, *WHOLE_SUITE)


# Every example, run on the embedded emulator by `nox -s examples`, with a time limit each.
EXAMPLES = [
    "examples/quickstart.py",
    "examples/rest_api.py",
    "examples/lambda_handler.py",
    "examples/alembic_migration/migrate.py",
    "examples/dsql_transaction.py",
    "examples/psycopg2_users.py",
    "examples/django_users/app.py",
    "examples/fastapi_users.py",
]
EXAMPLE_TIMEOUT = 180.0  # seconds; a throwaway PostgreSQL starts in a few


@nox.session(tags=["ci"])
def examples(session: nox.Session) -> None:
    """Run every example against the embedded emulator (the CI check of examples/)."""
    session.install("-e", ALL_EXTRAS, *_group("examples"))
    # An empty PGHOST makes each example start the emulator instead of going to AWS.
    env = {"PGHOST": ""}
    for example in EXAMPLES:
        session.run("python", "-c", _RUN_WITH_TIMEOUT, str(EXAMPLE_TIMEOUT), example, env=env)


@nox.session(tags=["ci"])
def docs(session: nox.Session) -> None:
    """Build the documentation; any Sphinx warning fails the session."""
    session.install("-e", ALL_EXTRAS, *_group("docs"))
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session(tags=["ci"])
def build(session: nox.Session) -> None:
    """Build the sdist and wheel and check them as PyPI would."""
    session.install("build", "twine")
    shutil.rmtree("dist", ignore_errors=True)  # check only what this build made
    session.run("python", "-m", "build", "--outdir", "dist")
    session.run("twine", "check", "--strict", "dist/*")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark iampg against the alternatives on the emulator (not a default session).

    tools/bench_tools.sh first installs pgbench and PgBouncer from Debian's archive when they
    are missing and the session runs as root; otherwise the rows that need them are skipped.
    """
    session.install("-e", ".[emulator]", *_group("bench"))
    session.run("bash", "tools/bench_tools.sh", external=True)
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(default=False)
def soak(session: nox.Session) -> None:
    """Run the 2-minute soak (pools, key rotation, gateway restarts); only this session does."""
    _install(session, "-e", ".[emulator]", *_group("tests"))
    env = {"IAMPG_SOAK_SECONDS": session.env.get("IAMPG_SOAK_SECONDS", "120")}
    # -s: the run ends by printing its figures (queries, retries, signings, service events).
    args = ["tests/reliability/test_soak.py", "-m", "soak", "-p", "no:cacheprovider", "-s"]
    session.run("pytest", *args, *session.posargs, env=env)


@nox.session(default=False, venv_backend="none")
def freethreaded(session: nox.Session) -> None:
    """Run tests on a free-threaded CPython 3.13t built in a Debian root (root; not default)."""
    session.run("bash", "tools/free_threaded.sh", *session.posargs, external=True)
