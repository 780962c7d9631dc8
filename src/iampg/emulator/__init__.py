"""Local emulator of IAM-authenticated AWS PostgreSQL services (needs ``iampg[emulator]``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._backend import Backend, BackendConfigError, BackendError
    from ._clock import EmulatorClock
    from ._credentials import FAKE_CREDENTIALS, CredentialLookup, Credentials, CredentialStore
    from ._credserver import AssumeRoleCall, CredentialsServer, CredentialsServerStats, Fault
    from ._gateway import DEFAULT_HOSTNAME, Emulator, Event
    from ._profiles import PROFILES, Profile

__all__ = [
    "DEFAULT_HOSTNAME",
    "FAKE_CREDENTIALS",
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
    "Emulator",
    "EmulatorClock",
    "Event",
    "Fault",
    "Profile",
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
    "DEFAULT_HOSTNAME": "._gateway",
    "Emulator": "._gateway",
    "Event": "._gateway",
    "PROFILES": "._profiles",
    "Profile": "._profiles",
}


def __getattr__(name: str) -> object:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
