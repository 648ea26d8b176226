"""The young-generation threshold against a model: any order of opens and closes (hypothesis stateful)."""

from __future__ import annotations

import gc

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.runtime.gcpace import YoungThreshold


class Pace(RuleBasedStateMachine):
    """Invariant: first threshold = max(base, per_connection × open) while any is open; base exactly when none."""

    def __init__(self) -> None:
        super().__init__()
        self.saved = gc.get_threshold()
        gc.set_threshold(700, 10, 10)
        self.pace = YoungThreshold(per_connection=10)
        self.open = 0

    @rule(count=st.integers(1, 200))
    def open_some(self, count: int) -> None:
        for _ in range(count):
            self.pace.opened()
        self.open += count

    @precondition(lambda self: self.open > 0)
    @rule(data=st.data())
    def close_some(self, data: st.DataObject) -> None:
        count = data.draw(st.integers(1, self.open))
        for _ in range(count):
            self.pace.closed()
        self.open -= count

    @invariant()
    def threshold_follows_connections(self) -> None:
        assert self.pace.open == self.open
        expected = (max(700, 10 * self.open), 10, 10) if self.open else (700, 10, 10)
        assert gc.get_threshold() == expected

    def teardown(self) -> None:
        gc.set_threshold(*self.saved)


TestPace = Pace.TestCase


def test_older_thresholds_set_meanwhile_are_kept() -> None:
    """Someone else's change of the older generations' thresholds survives the pace's updates."""
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        pace = YoungThreshold(per_connection=10)
        for _ in range(100):
            pace.opened()
        gc.set_threshold(1000, 20, 30)
        pace.opened()
        assert gc.get_threshold() == (1010, 20, 30)
        for _ in range(101):
            pace.closed()
        assert gc.get_threshold() == (700, 10, 10)  # the base from before the first connection
    finally:
        gc.set_threshold(*saved)
