"""What /healthz and /readyz answer (sans-IO).

*Healthy* means the process is alive and its event loop runs: the monitor's
heartbeat task records when it woke and how late. A loop that was blocked
shows either as a stale last beat (the request got in first) or as a late
beat (the heartbeat got in first); a stall stays reported for ``max_silence``
afterwards, so the answer does not depend on which task the scheduler runs
first. Docker's HEALTHCHECK marks a proxy unhealthy after repeated failures.

*Ready* means the wallbox port is listening, the configuration is loaded and
the proxy is not shutting down. A backend that cannot be reached does not
make the proxy unready: restarting or re-routing the gateway would not help,
and offline mode serves wallboxes without it. The body says how the backend
and the meter are doing, for people and scripts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Seconds between heartbeats of the monitor task.
BEAT_INTERVAL = 1.0
#: A loop that did not run the heartbeat for this long is reported unhealthy.
MAX_SILENCE = 10.0


@dataclass
class Heartbeat:
    interval: float = BEAT_INTERVAL
    max_silence: float = MAX_SILENCE
    last: float | None = None
    lag: float = 0.0
    #: The latest beat that came more than ``max_silence`` late, and how late.
    stalled_at: float | None = None
    stall: float = 0.0

    def beat(self, now: float, scheduled: float) -> float:
        """The heartbeat task woke at ``now``, due at ``scheduled``; returns the lag."""
        self.lag = max(0.0, now - scheduled)
        self.last = now
        if self.lag > self.max_silence:
            self.stalled_at, self.stall = now, self.lag
        return self.lag

    def check(self, now: float) -> tuple[bool, str]:
        """Unhealthy while the loop is silent, and for ``max_silence`` after a stall."""
        if self.last is None:
            return False, "event loop heartbeat not started"
        silence = now - self.last
        if silence > self.max_silence:
            return False, f"event loop silent for {silence:.1f} s"
        if self.stalled_at is not None and now - self.stalled_at <= self.max_silence:
            return False, f"event loop stalled for {self.stall:.1f} s, {now - self.stalled_at:.1f} s ago"
        return True, f"ok (loop lag {self.lag * 1000:.1f} ms)"


@dataclass
class Readiness:
    """Facts the monitor gathers for /readyz."""

    config_source: str
    chargers: int
    ports: list[int] = field(default_factory=list)
    listening: bool = False
    stopping: bool = False
    status: dict[str, Any] = field(default_factory=dict)

    def check(self) -> tuple[bool, str]:
        if self.stopping:
            reason = "shutting down"
        elif not self.listening:
            reason = "wallbox port not listening yet"
        else:
            reason = ""
        body = {"ready": not reason, **({"reason": reason} if reason else {}),
                "config": {"source": self.config_source, "chargers": self.chargers},
                "listening": self.ports if self.listening else [], **self.status}
        return not reason, json.dumps(body, ensure_ascii=False, sort_keys=False) + "\n"


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


def text(status: int, message: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", (message + "\n").encode())
