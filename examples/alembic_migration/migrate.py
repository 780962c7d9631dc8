"""The seed's ``migrate.sh`` problem in Python: run alembic migrations with an IAM token URL.

A migration tool takes a URL, and the token has to go in it as the password: percent-encoded
with nothing left safe (it contains ``% & / : = ?``), and, because ``alembic.ini`` and
``config.set_main_option`` go through ConfigParser, with every ``%`` doubled. The token is
good for 15 minutes, so the URL is made right before migrating::

    python examples/alembic_migration/migrate.py          # embedded emulator
    python examples/alembic_migration/migrate.py \
        --host my-cluster.cluster-abc.us-east-1.rds.amazonaws.com \
        --user postgres                                    # AWS: creates the users table

The shell route (what ``migrate.sh`` does) is shown too: ``iampg url --format sqlalchemy``
into ``DATABASE_URL``, read by ``env.py``. Needs ``pip install alembic``.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config

import iampg

HERE = Path(__file__).resolve().parent


def migrate_in_python(provider: iampg.TokenProvider) -> None:
    """Feed alembic the token URL through ``set_main_option``, ``%`` doubled."""
    config = Config(str(HERE / "alembic.ini"))
    url = iampg.sqlalchemy_url(provider=provider)  # postgresql+psycopg://, token encoded
    try:
        config.set_main_option("sqlalchemy.url", url)
    except (ValueError, configparser.Error) as exc:
        # The seed's trap: the encoded token is full of %2F, %3D ... which ConfigParser reads
        # as interpolation. (Its message quotes the URL, a credential: do not print it.)
        print(f"without doubling %: {type(exc).__name__} from ConfigParser's interpolation")
    config.set_main_option("sqlalchemy.url", iampg.alembic_url(provider=provider))
    command.upgrade(config, "head")
    print("python route: alembic upgrade head done")


def migrate_from_shell(args: list[str], env: dict[str, str]) -> None:
    """Do what migrate.sh does: ``iampg url`` into DATABASE_URL, then the alembic command."""
    iampg_cli = [sys.executable, "-c", "import sys; from iampg.cli import main; sys.exit(main())"]
    url = subprocess.run(
        [*iampg_cli, "url", *args, "--format", "sqlalchemy"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    ).stdout.strip()
    alembic = [sys.executable, "-m", "alembic", "-c", str(HERE / "alembic.ini")]
    run_env = {**env, "DATABASE_URL": url}  # in the environment, never on a command line
    for step in (["downgrade", "base"], ["upgrade", "head"]):
        subprocess.run([*alembic, *step], check=True, env=run_env, timeout=120)
    print("shell route: iampg url | alembic downgrade base && upgrade head done")


def check(provider: iampg.TokenProvider) -> None:
    """Show that the table exists and which revision the database is at."""
    with iampg.connect(provider=provider) as conn:
        version = conn.execute("select version_num from alembic_version").fetchone()
        columns = conn.execute(
            "select column_name from information_schema.columns "
            "where table_name = 'users' order by ordinal_position"
        ).fetchall()
    print(f"revision {version[0] if version else None}: users({', '.join(c[0] for c in columns)})")


@contextlib.contextmanager
def emulated() -> Iterator[tuple[iampg.TokenProvider, list[str]]]:
    """Start a throwaway PostgreSQL and the emulator; yield a provider and CLI arguments."""
    from iampg.emulator import Backend, Emulator

    print("no endpoint given: starting the local emulator")
    with Backend.auto() as backend, Emulator(backend.dsn) as emu:
        backend.ensure_role("postgres", iam=True)  # as on RDS: IAM logins need rds_iam
        os.environ.update(emu.aws_env())  # the emulator knows only the documented example keys
        ep = iampg.Endpoint(
            emu.host,
            user="postgres",
            port=emu.port,
            hostaddr=emu.listen_host,
            sslmode="verify-full",
            sslrootcert=str(emu.ca_file),
        )
        cli_args = [
            emu.host,
            "--user=postgres",
            f"--port={emu.port}",
            f"--hostaddr={emu.listen_host}",
            f"--region={emu.region}",
            "--sslmode=verify-full",
            f"--sslrootcert={emu.ca_file}",
        ]
        provider = iampg.TokenProvider(ep, clock=emu.clock.monotonic)
        try:
            yield provider, cli_args
        finally:
            with iampg.connect(provider=provider, autocommit=True) as conn:
                conn.execute("drop table if exists users, alembic_version")


def main(argv: list[str] | None = None) -> int:
    """Run the migrations both ways; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="cluster endpoint (default: $PGHOST, else the emulator)")
    parser.add_argument("--user", help="database user (default: $PGUSER)")
    parser.add_argument("--dbname", help="database (default: $PGDATABASE or the user)")
    parser.add_argument("--region", help="AWS region (default: inferred from the host)")
    args = parser.parse_args(argv)
    try:
        if args.host or os.environ.get("PGHOST"):
            ep = iampg.Endpoint.parse(
                args.host or "",
                environ=os.environ,
                user=args.user,
                dbname=args.dbname,
                region=args.region,
            )
            provider = iampg.TokenProvider(ep)
            migrate_in_python(provider)
            check(provider)
        else:
            with emulated() as (provider, cli_args):
                migrate_in_python(provider)
                check(provider)
                migrate_from_shell(cli_args, dict(os.environ))
                check(provider)
    except iampg.Error as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, iampg.ConfigurationError) else 1
    except (psycopg.Error, subprocess.CalledProcessError) as exc:
        print(f"migrate: {type(exc).__name__}", file=sys.stderr)
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
