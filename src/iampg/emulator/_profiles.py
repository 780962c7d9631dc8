"""The emulator's service presets: how each AWS service behaves beyond checking tokens.

The names are iampg's service presets (``rds``, ``aurora-serverless`` or its other spelling
``aurora-express``, ``dsql``), the same everywhere. "Profile", the old name, is kept as a
deprecated alias (in iampg a profile is an AWS config profile).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Final, Literal, TypedDict

from iampg._defaults import canonical_preset
from iampg.errors import ConfigurationError

__all__ = [
    "DSQL_CLUSTER_ID",
    "PRESETS",
    "PROFILES",
    "Preset",
    "PresetName",
    "PresetSettings",
    "Profile",
    "ProfileName",
    "ProfileSettings",
    "Service",
    "dsql_hostname",
    "get_preset",
    "get_profile",
]

Service = Literal["rds", "dsql"]
"""The token rules: ``rds`` (``rds-db``/``connect``) or ``dsql`` (``dsql``/``DbConnect``)."""

PresetName = Literal["rds", "aurora-serverless", "aurora-express", "dsql"]
"""The preset names (any spelling :func:`iampg._defaults.canonical_preset` accepts works)."""

ProfileName = PresetName
"""Deprecated name of :data:`PresetName`."""

#: The emulator's DSQL cluster id: 26 lower-case alphanumerics, the shape of a real one.
DSQL_CLUSTER_ID: Final = "iampgemulatoriampgemulator"


def dsql_hostname(region: str) -> str:
    """Return the emulator's DSQL-shaped host name, ``<cluster id>.dsql.<region>.on.aws``."""
    return f"{DSQL_CLUSTER_ID}.dsql.{region}.on.aws"


class PresetSettings(TypedDict, total=False):
    """The settings of a :class:`Preset` that ``Emulator(...)`` takes as keywords."""

    auto_pause: float | None
    resume_delay: float
    paused_connect: Literal["wait", "refuse"]
    connect_latency: float
    idle_timeout: float | None
    idle_notice: bool
    session_cap: float | None
    transaction_limit: float
    max_connections: int | None
    connection_rate: float | None
    connection_burst: int
    require_sni: bool


@dataclass(frozen=True)
class Preset:
    """What a service does besides checking tokens; durations in emulated seconds.

    Emulated seconds run ``time_scale`` times faster than real ones and jump with
    :meth:`EmulatorClock.advance`, so a test sees a 16 s resume in a fraction of a second.

    Attributes:
        name: The preset's name, shown by ``iampg emulate``.
        service: ``rds`` (RDS, Aurora, RDS Proxy tokens) or ``dsql``.
        auto_pause: Pause after this many seconds with zero connections; ``None`` never.
        resume_delay: Seconds a paused cluster takes to resume. Concurrent connection
            attempts share one resume. The connection that waited for it pays no
            :attr:`connect_latency` on top (the seed's 16 s are the whole cold connect).
        paused_connect: What a connection to a paused cluster gets: ``"wait"`` blocks until
            resumed (Aurora Serverless), ``"refuse"`` starts the resume and is refused with
            ``waking up cluster, please retry later`` (DSQL).
        connect_latency: Seconds added to every accepted connection before it reaches the
            backend (the seed measured 3-4 s for Aurora express reconnects).
        idle_timeout: Close sessions that sent and received nothing for this many seconds;
            ``None`` never.
        idle_notice: Send ``FATAL 57P05 terminating connection due to idle-session timeout``
            before the idle cut; otherwise the connection is just dropped.
        session_cap: Close sessions this many seconds after they started (DSQL: 3600); an
            idle one at once, one inside a transaction when the transaction ends or
            :attr:`transaction_limit` seconds after it began. ``None`` never.
        transaction_limit: The longest a transaction may run past the session cap, counted
            from its start, in seconds (DSQL: 300).
        max_connections: Refuse new connections while this many are open; ``None`` no limit.
        connection_rate: New connections allowed per second (a token bucket); ``None`` no
            limit.
        connection_burst: The token bucket's size: connections allowed at once.
        require_sni: Refuse TLS connections that sent no server name (an IP-literal host).
    """

    name: str
    service: Service = "rds"
    auto_pause: float | None = None
    resume_delay: float = 0.0
    paused_connect: Literal["wait", "refuse"] = "wait"
    connect_latency: float = 0.0
    idle_timeout: float | None = None
    idle_notice: bool = False
    session_cap: float | None = None
    transaction_limit: float = 300.0
    max_connections: int | None = None
    connection_rate: float | None = None
    connection_burst: int = 1
    require_sni: bool = False

    def __post_init__(self) -> None:
        if self.service not in ("rds", "dsql"):
            raise ConfigurationError(f"service must be 'rds' or 'dsql', not {self.service!r}")
        if self.paused_connect not in ("wait", "refuse"):
            raise ConfigurationError(
                f"paused_connect must be 'wait' or 'refuse', not {self.paused_connect!r}"
            )
        for name in ("auto_pause", "idle_timeout", "session_cap", "connection_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"{name} must be a positive number or None, not {value!r}")
        for name in ("resume_delay", "connect_latency", "transaction_limit"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"{name} must be a number >= 0, not {value!r}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigurationError(
                f"max_connections must be at least 1 or None, not {self.max_connections!r}"
            )
        if self.connection_burst < 1:
            raise ConfigurationError(
                f"connection_burst must be at least 1, not {self.connection_burst!r}"
            )

    @property
    def timed(self) -> bool:
        """Whether anything happens on a timer (auto-pause, idle cut, session cap)."""
        return (
            self.auto_pause is not None
            or self.idle_timeout is not None
            or self.session_cap is not None
        )

    def replace(self, **changes: object) -> Preset:
        """Return a copy with some settings changed (validated again).

        Raises:
            iampg.ConfigurationError: A name is not a setting or a value is invalid.
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigurationError(f"unknown preset setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def describe(self) -> list[str]:
        """Return one line per behaviour that is on, for ``iampg emulate``'s banner."""
        lines = [f"service {self.service}"]
        if self.auto_pause is not None:
            lines.append(f"auto-pause after {self.auto_pause:g} s with no connections")
        if self.resume_delay:
            how = "connections wait" if self.paused_connect == "wait" else "connections refused"
            lines.append(f"resume takes {self.resume_delay:g} s ({how} meanwhile)")
        if self.connect_latency:
            lines.append(f"connect latency {self.connect_latency:g} s")
        if self.idle_timeout is not None:
            how = "57P05 notice, then close" if self.idle_notice else "abrupt close"
            lines.append(f"idle sessions cut after {self.idle_timeout:g} s ({how})")
        if self.session_cap is not None:
            lines.append(
                f"sessions closed after {self.session_cap:g} s "
                f"(open transactions may finish within {self.transaction_limit:g} s)"
            )
        if self.max_connections is not None:
            lines.append(f"at most {self.max_connections} open connections")
        if self.connection_rate is not None:
            lines.append(
                f"at most {self.connection_rate:g} new connections/s "
                f"(burst {self.connection_burst})"
            )
        if self.require_sni:
            lines.append("TLS SNI required (connect by host name, not an IP literal)")
        return lines


PRESETS: Final[dict[str, Preset]] = {
    # Plain RDS / Aurora provisioned / RDS Proxy: tokens only, nothing on a timer.
    "rds": Preset(name="rds"),
    # Aurora PostgreSQL Serverless, express configuration. The seed measured about 16 s
    # from a paused cluster to a connection, 3-4 s for later reconnects, and a server-side
    # idle cut after about 5 minutes; auto-pause defaults to 300 s with zero connections.
    # Unconfirmed (FACTS.md): whether the idle cut sends anything first; we drop abruptly.
    "aurora-serverless": Preset(
        name="aurora-serverless",
        auto_pause=300.0,
        resume_delay=16.0,
        paused_connect="wait",
        connect_latency=3.5,
        idle_timeout=300.0,
    ),
    # Aurora DSQL: 1-hour session cap with a 5-minute transaction limit, 10 000 connections,
    # 100 new connections/s with a burst of 1 000, SNI required. Unconfirmed: when an idle
    # cluster becomes inactive (not on a timer here: use Emulator.pause()) and how long
    # waking it takes (our guess: 10 s).
    "dsql": Preset(
        name="dsql",
        service="dsql",
        resume_delay=10.0,
        paused_connect="refuse",
        session_cap=3600.0,
        transaction_limit=300.0,
        max_connections=10_000,
        connection_rate=100.0,
        connection_burst=1_000,
        require_sni=True,
    ),
}
"""The presets by canonical name: ``rds``, ``aurora-serverless`` and ``dsql``."""

PROFILES: Final[dict[str, Preset]] = {**PRESETS, "aurora-express": PRESETS["aurora-serverless"]}
"""Deprecated: :data:`PRESETS`, with the ``aurora-express`` spelling as a key of its own."""

Profile = Preset
"""Deprecated name of :class:`Preset`."""

ProfileSettings = PresetSettings
"""Deprecated name of :class:`PresetSettings`."""


def get_preset(preset: str | Preset) -> Preset:
    """Return a preset by name, or ``preset`` itself.

    Every spelling :func:`iampg._defaults.canonical_preset` accepts works: ``rds``,
    ``aurora-serverless``, ``aurora-express``, ``dsql``, in any case, ``_`` for ``-``.

    Raises:
        iampg.ConfigurationError: No preset has that name; the message lists the names.
    """
    if isinstance(preset, Preset):
        return preset
    return PRESETS[canonical_preset(preset)]


get_profile = get_preset
"""Deprecated name of :func:`get_preset`."""
