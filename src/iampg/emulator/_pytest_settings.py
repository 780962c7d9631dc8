"""The pytest plugin's ini settings, registered by a plugin of their own.

pytest loads this module through its own entry point (``iampg_settings``), so that turning the
fixtures off with ``-p no:iampg`` keeps the ``iampg_*`` settings known: a project that sets them
(and turns warnings into errors) still runs. It imports nothing but pytest.
"""

from __future__ import annotations

import pytest

__all__ = ["SETTINGS", "register"]

#: (name, help, default) of every ``iampg_*`` setting.
SETTINGS: tuple[tuple[str, str, str], ...] = (
    (
        "iampg_preset",
        "iampg session emulator's preset: rds, aurora-serverless (aurora-express), dsql",
        "",
    ),
    ("iampg_profile", "deprecated name of iampg_preset", ""),
    ("iampg_time_scale", "emulated seconds per real second for the iampg session emulator", "1"),
    (
        "iampg_user",
        "database user of the iampg_endpoint fixture (default: the backend's; DSQL: admin)",
        "",
    ),
    (
        "iampg_credentials_lifetime",
        "emulated seconds the keys of iampg_credentials_server live",
        "3600",
    ),
)


def register(parser: pytest.Parser) -> None:
    """Register the ``iampg_*`` ini settings (registering them twice is harmless)."""
    for name, help_text, default in SETTINGS:
        parser.addini(name, help_text, default=default)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the plugin's ini settings."""
    register(parser)
