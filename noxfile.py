"""Quality gates: nox -s lint typecheck tests build (and quickstart, the README's first command)."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests", "build"]

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def quickstart(session: nox.Session) -> None:
    """Run the seed scenario: on the embedded emulator, or on the endpoint given after --."""
    session.install("-e", ".[emulator,binary]")
    session.run("python", "examples/quickstart.py", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against a real PostgreSQL through the emulator."""
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


@nox.session
def build(session: nox.Session) -> None:
    """Build the sdist and wheel and check them as PyPI would."""
    session.install("build", "twine")
    session.run("python", "-m", "build", "--outdir", "dist")
    session.run("twine", "check", "--strict", "dist/*")
