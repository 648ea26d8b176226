"""The per-address caps as invariants (issue 16), checked with a hypothesis state machine.

* no address ever has more than ``max_pending`` handshakes in flight;
* no address gets more than ``burst + rate × elapsed`` connections admitted;
* what one address is told never depends on what other addresses do: each
  decision equals that of a limiter that only ever saw this address.
"""

from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from proxy.core.admission import AddressLimits

ADDRESSES = [f"10.0.0.{n}" for n in range(4)]


class Limits(RuleBasedStateMachine):
    @initialize(pending=st.integers(0, 5), rate=st.sampled_from([0.0, 0.5, 2.0, 50.0]), burst=st.integers(0, 8))
    def setup(self, pending: int, rate: float, burst: int) -> None:
        self.limits = AddressLimits(pending, rate, burst)
        self.alone = {a: AddressLimits(pending, rate, burst) for a in ADDRESSES}
        self.now = 0.0
        self.pending = {a: 0 for a in ADDRESSES}
        self.admitted = {a: 0 for a in ADDRESSES}
        self.first: dict[str, float] = {}
        self.cap, self.rate, self.burst = pending, rate, burst

    @rule(dt=st.floats(0, 3))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule(address=st.sampled_from(ADDRESSES))
    def arrive(self, address: str) -> None:
        self.first.setdefault(address, self.now)
        verdict = self.limits.arrive(address, self.now)
        assert verdict == self.alone[address].arrive(address, self.now)  # isolation
        if verdict is None:
            self.pending[address] += 1
            self.admitted[address] += 1

    @rule(address=st.sampled_from(ADDRESSES))
    def handshake_over(self, address: str) -> None:
        if self.pending[address]:
            self.pending[address] -= 1
            self.limits.done(address)
            self.alone[address].done(address)

    @rule(count=st.integers(1030, 1060))
    def many_strangers_come_and_go(self, count: int) -> None:
        """Enough one-off addresses to make the limiter prune its table; ours must be unaffected."""
        for n in range(count):
            stranger = f"192.0.2.{n % 250}/{n}"
            if self.limits.arrive(stranger, self.now) is None:
                self.limits.done(stranger)
        assert self.limits.tracked() <= 1060 + len(ADDRESSES)  # strangers are never more than 1060 names

    @invariant()
    def pending_never_above_the_cap(self) -> None:
        if getattr(self, "cap", 0):
            assert all(p <= self.cap for p in self.pending.values())

    @invariant()
    def admissions_within_burst_plus_rate(self) -> None:
        if getattr(self, "rate", 0) and getattr(self, "burst", 0):
            for address, count in self.admitted.items():
                assert count <= self.burst + self.rate * (self.now - self.first.get(address, self.now)) + 1e-6


TestLimits = Limits.TestCase
TestLimits.settings = settings(max_examples=60, stateful_step_count=30)
