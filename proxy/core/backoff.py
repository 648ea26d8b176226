"""Reconnect delays: exponential with jitter, capped (sans-IO).

Jitter matters on a gateway: when the backend comes back, hundreds of
wallbox sessions must not reconnect in the same millisecond.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 1.0
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def next_delay(self) -> float:
        """Uniform in [d/2, d] with d = initial · 2^attempt, at most ``cap``."""
        ceiling = min(self.cap, self.initial * 2 ** self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0
