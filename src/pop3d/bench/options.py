"""What one ``pop3d bench`` run is asked to do (:class:`Options`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Options:
    """Everything a run needs; picklable, so children get a copy."""

    host: str
    port: int
    users: tuple[str, ...]
    password: str
    scenario: str
    concurrency: int = 10
    duration: float = 10.0
    count: int | None = None
    procs: int = 1
    manifest: Path | None = None
    #: Time a NOOP on an extra session throughout the run (idle and storm always do).
    probe: bool = False
    probe_user: str | None = None
    probe_interval: float = 0.01
    #: idle: connections to hold.
    idle_conns: int = 100
    ramp_timeout: float = 120.0
    #: Upper bound of a ``count`` run.
    timeout: float = 300.0
    auth: str = "user"
    #: Upper bound of one session (a hung server must not stall a ``count`` run).
    session_timeout: float = 60.0
    loop: str = "auto"
    repeat: int = 1
    progress: bool = False
    ready_file: Path | None = None
    #: POP3S: implicit TLS on ``port``; ``tls_resume`` offers the last session each time.
    tls: bool = False
    tls_resume: bool = False

    def pool(self) -> tuple[str, ...]:
        """The users the workers and idle connections use (all but the probe's)."""
        probe_user = self.probe_user_name()
        return tuple(u for u in self.users if u != probe_user)

    def probe_user_name(self) -> str | None:
        """The probe session's user: given, or the last user of the list."""
        if not (self.probe or self.scenario in ("idle", "storm")):
            return None
        return self.probe_user or self.users[-1]
