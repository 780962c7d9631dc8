"""Quality gates: nox -s lint typecheck tests build docs, and quickstart (the README's first)."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests", "build", "docs"]

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def quickstart(session: nox.Session) -> None:
    """Run the seed scenario: on the embedded emulator, or on the endpoint given after --."""
    session.install("-e", ".[emulator,binary]")
    session.run("python", "examples/quickstart.py", *session.posargs)


# Every example, run on the embedded emulator by `nox -s examples`, with a time limit each.
EXAMPLES = [
    "examples/quickstart.py",
    "examples/rest_api.py",
    "examples/lambda_handler.py",
    "examples/alembic_migration/migrate.py",
    "examples/dsql_transaction.py",
    "examples/psycopg2_users.py",
]
EXAMPLE_TIMEOUT = 180.0  # seconds; a throwaway PostgreSQL starts in a few
_RUN_WITH_TIMEOUT = (
    "import subprocess, sys; "
    "sys.exit(subprocess.run([sys.executable, *sys.argv[2:]], timeout=float(sys.argv[1]))"
    ".returncode)"
)


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example against the embedded emulator (the CI check of examples/)."""
    extras = ".[emulator,binary,sqlalchemy,asyncpg,django,psycopg2]"
    session.install("-e", extras, *_group("examples"))
    # An empty PGHOST makes each example start the emulator instead of going to AWS.
    env = {"PGHOST": ""}
    for example in EXAMPLES:
        session.run("python", "-c", _RUN_WITH_TIMEOUT, str(EXAMPLE_TIMEOUT), example, env=env)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the fast tests (not the slow ones, not the soak) through the emulator."""
    session.install("-e", ".[emulator]", *_group("tests"))
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the library, the tests and the examples with mypy --strict."""
    session.install("-e", ".[emulator]", *_group("typecheck"))
    session.run("mypy", "--strict")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark iampg against the alternatives on the emulator (not a default session)."""
    session.install("-e", ".[emulator]", *_group("bench"))
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(default=False)
def soak(session: nox.Session) -> None:
    """Run the 2-minute soak (pools, key rotation, gateway restarts); only this session does."""
    session.install("-e", ".[emulator]", *_group("tests"))
    env = {"IAMPG_SOAK_SECONDS": session.env.get("IAMPG_SOAK_SECONDS", "120")}
    # -s: the run ends by printing its figures (queries, retries, signings, service events).
    args = ["tests/reliability/test_soak.py", "-m", "soak", "-p", "no:cacheprovider", "-s"]
    args += session.posargs
    session.run("pytest", *args, env=env)


@nox.session(default=False, venv_backend="none")
def freethreaded(session: nox.Session) -> None:
    """Run tests on a free-threaded CPython 3.13t built in a Debian root (root; not default)."""
    session.run("bash", "tools/free_threaded.sh", *session.posargs, external=True)


@nox.session
def build(session: nox.Session) -> None:
    """Build the sdist and wheel and check them as PyPI would."""
    session.install("build", "twine")
    session.run("python", "-m", "build", "--outdir", "dist")
    session.run("twine", "check", "--strict", "dist/*")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation; any Sphinx warning fails the session."""
    session.install("-e", ".[emulator,binary,sqlalchemy,asyncpg,django,psycopg2]", *_group("docs"))
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
