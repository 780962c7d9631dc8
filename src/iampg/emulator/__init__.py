"""Local emulator of IAM-authenticated AWS PostgreSQL services (needs ``iampg[emulator]``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._backend import Backend, BackendConfigError, BackendError
    from ._clock import EmulatorClock
    from ._credentials import FAKE_CREDENTIALS, CredentialLookup, Credentials, CredentialStore
    from ._credserver import AssumeRoleCall, CredentialsServer, CredentialsServerStats, Fault
    from ._dsql_sql import DsqlRules
    from ._gateway import DEFAULT_HOSTNAME, Emulator, Event
    from ._policy import Policy, PolicyStore, Statement
    from ._profiles import PRESETS, PROFILES, Preset, Profile

__all__ = [
    "DEFAULT_HOSTNAME",
    "FAKE_CREDENTIALS",
    "PRESETS",
    "PROFILES",
    "AssumeRoleCall",
    "Backend",
    "BackendConfigError",
    "BackendError",
    "CredentialLookup",
    "CredentialStore",
    "Credentials",
    "CredentialsServer",
    "CredentialsServerStats",
    "DsqlRules",
    "Emulator",
    "EmulatorClock",
    "Event",
    "Fault",
    "Policy",
    "PolicyStore",
    "Preset",
    "Profile",
    "Statement",
]

# Where each public name lives. Imported on first use, so that importing a submodule (the
# pytest plugin, loaded into every pytest run) does not import cryptography and the gateway.
_SOURCES = {
    "Backend": "._backend",
    "BackendConfigError": "._backend",
    "BackendError": "._backend",
    "EmulatorClock": "._clock",
    "FAKE_CREDENTIALS": "._credentials",
    "CredentialLookup": "._credentials",
    "CredentialStore": "._credentials",
    "Credentials": "._credentials",
    "AssumeRoleCall": "._credserver",
    "CredentialsServer": "._credserver",
    "CredentialsServerStats": "._credserver",
    "Fault": "._credserver",
    "DsqlRules": "._dsql_sql",
    "DEFAULT_HOSTNAME": "._gateway",
    "Emulator": "._gateway",
    "Event": "._gateway",
    "Policy": "._policy",
    "PolicyStore": "._policy",
    "Statement": "._policy",
    "PRESETS": "._profiles",
    "PROFILES": "._profiles",  # deprecated: PRESETS
    "Preset": "._profiles",
    "Profile": "._profiles",  # deprecated: Preset
}


# What the ``emulator`` extra installs; a missing one is named with the command to install it.
_EXTRA = frozenset({"cryptography"})


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(source, __name__)
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in _EXTRA:
            raise
        raise ImportError(
            f"iampg.emulator.{name} needs the emulator extra ({exc.name} is missing): "
            "pip install 'iampg[emulator]'",
            name=exc.name,
        ) from exc
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
