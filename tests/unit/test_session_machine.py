"""The session's arbitration rules as invariants (docs/design.md, "Invariants"), under any interleaving.

A hypothesis state machine drives one :class:`Session` with a wallbox, the
primary, a secondary ("ems", forwarded by its policy) and the proxy's own
CALLs, answers in any order, timeouts, and listeners tapping and untapping.
After every step:

* the wallbox never holds CALLs of two origins at once, and at most one of the
  proxy's or a secondary's (the primary's own pipelining is left as it is);
* the proxy's and secondaries' CALLs reach the wallbox in the order they were
  submitted;
* every CALL reaches the wallbox as the text its origin sent, but for its id
  (and the registered rewrite of its action); each answer goes back to its
  origin under the origin's id, the proxy's answers are consumed;
* only the primary's answers reach the wallbox, and every wallbox CALL reaches
  both upstreams byte for byte;
* ``Observed`` is reported exactly for the actions some tap observes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.core.policy import CommandPolicy
from proxy.core.session import (
    PRIMARY,
    PROXY,
    Action,
    Observed,
    ProxyAnswer,
    ProxyCallFailed,
    Session,
    Tap,
    ToUpstream,
    ToWallbox,
)
from proxy.messages.ocppj import Frame, MessageType, build_call, build_result, classify, replace_id

SECONDARY = "ems"
TIMEOUT = 30.0
ACTIONS = ("GetConfiguration", "TriggerMessage", "SetChargingProfile", "DataTransfer")
WALLBOX_ACTIONS = ("Heartbeat", "MeterValues", "StatusNotification", "DataTransfer")


def clamp(source: str, destination: str, frame: Frame) -> str:
    """The registered rewrite: a backend's 32 A become 16 A on the way to the wallbox."""
    return frame.text.replace('"limit":32', '"limit":16') if destination == "wallbox" else frame.text


@dataclass
class Sent:
    """A CALL the wallbox received: who sent it, under which ids, and when."""

    origin: str
    origin_id: str
    wire_id: str
    marker: int
    at: float


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.session = Session("CP1", upstreams=(PRIMARY, SECONDARY), call_timeout=TIMEOUT,
                               policy=CommandPolicy(PRIMARY, {SECONDARY: {"*": "forward"}}))
        self.now = 0.0
        self.marker = 0
        #: marker → (origin, origin's id, the text it sent)
        self.submitted: dict[int, tuple[str, str, str]] = {}
        #: CALLs at the wallbox that it has not answered and the session has not timed out.
        self.outstanding: list[Sent] = []
        #: CALLs at the wallbox that it has not answered (timed out or not).
        self.unanswered: list[Sent] = []
        self.non_primary_order: list[int] = []
        self.observing: frozenset[str] = frozenset()
        self.wallbox_count = 0

    # -- feeding the session -------------------------------------------------------------------

    def _take(self, actions: list[Action], source: str, frame: Frame | None = None) -> None:
        """Check one step's actions against the rules and record what reached the wallbox."""
        observed = {(a.source, a.frame.msg_id) for a in actions if isinstance(a, Observed)}
        for action in actions:
            if isinstance(action, ToWallbox):
                sent = self._to_wallbox(action.text, source)
                if sent is not None and sent.origin != PROXY:  # an upstream's CALL is reported as it goes out
                    action_name = classify(action.text).action or ""
                    assert ((sent.origin, sent.origin_id) in observed) == (action_name in self.observing)
            elif isinstance(action, Observed):
                assert action.action in self.observing, f"{action.action} observed but not tapped"
        if frame is not None:  # the wallbox's own CALL
            assert (("wallbox", frame.msg_id) in observed) == ((frame.action or "") in self.observing)

    def _to_wallbox(self, text: str, source: str) -> Sent | None:
        frame = classify(text)
        if frame.kind is not MessageType.CALL:
            assert source == PRIMARY, f"an answer from {source} reached the wallbox"
            return None
        marker = int(json.loads(text)[3]["n"])
        origin, origin_id, original = self.submitted[marker]
        wire_id = frame.msg_id or ""
        expected = replace_id(classify(original), wire_id, original) if wire_id != origin_id else original
        assert text in (expected, clamp(PRIMARY, "wallbox", classify(expected))), (text, original)
        live = {sent.origin for sent in self.outstanding}
        if origin == PRIMARY:
            assert live <= {PRIMARY}, f"primary CALL while {live} outstanding"
        else:
            assert not live, f"{origin} CALL while {live} outstanding"
            self.non_primary_order.append(marker)
        sent = Sent(origin, origin_id, wire_id, marker, self.now)
        self.outstanding.append(sent)
        self.unanswered.append(sent)
        return sent

    def _submit_text(self, origin: str, origin_id: str, action: str) -> str:
        self.marker += 1
        payload = {"n": self.marker, "limit": 32}
        text = build_call(origin_id, action, payload)
        self.submitted[self.marker] = (origin, origin_id, text)
        return text

    # -- rules ------------------------------------------------------------------------------------

    @rule(action=st.sampled_from(ACTIONS), reuse=st.booleans())
    def primary_calls(self, action: str, reuse: bool) -> None:
        """The primary may use an id in the proxy's namespace, or one still outstanding (it must be renamed)."""
        origin_id = f"ocpp-proxy:{self.marker}" if reuse else f"b{self.marker}"
        text = self._submit_text(PRIMARY, origin_id, action)
        self._take(self.session.from_upstream(PRIMARY, text, self.now), PRIMARY)

    @rule(action=st.sampled_from(ACTIONS))
    def secondary_calls(self, action: str) -> None:
        text = self._submit_text(SECONDARY, f"e{self.marker}", action)
        self._take(self.session.from_upstream(SECONDARY, text, self.now), SECONDARY)

    @rule(action=st.sampled_from(ACTIONS))
    def proxy_calls(self, action: str) -> None:
        self.marker += 1
        msg_id, actions = self.session.proxy_call(action, {"n": self.marker, "limit": 32}, self.now)
        self.submitted[self.marker] = (PROXY, msg_id, build_call(msg_id, action, {"n": self.marker, "limit": 32}))
        self._take(actions, PROXY)

    @rule(action=st.sampled_from(WALLBOX_ACTIONS))
    def wallbox_calls(self, action: str) -> None:
        self.wallbox_count += 1
        text = build_call(f"w{self.wallbox_count}", action, {"connectorId": 1})
        actions = self.session.from_wallbox(text, self.now)
        self._take(actions, "wallbox", classify(text))
        assert sorted(a.name for a in actions if isinstance(a, ToUpstream) and a.text == text) == \
            sorted([PRIMARY, SECONDARY])
        for name in (PRIMARY, SECONDARY):  # each upstream answers; only the primary's reaches the wallbox
            answer = build_result(f"w{self.wallbox_count}", {"from": name})
            answered = self.session.from_upstream(name, answer, self.now)
            to_wallbox = [a.text for a in answered if isinstance(a, ToWallbox)]
            assert to_wallbox == ([answer] if name == PRIMARY else []), (name, to_wallbox)

    @precondition(lambda self: bool(self.unanswered))
    @rule(pick=st.integers(min_value=0, max_value=7))
    def wallbox_answers(self, pick: int) -> None:
        """The wallbox answers one of its open CALLs (in any order, late ones included)."""
        sent = self.unanswered.pop(pick % len(self.unanswered))
        self.outstanding = [s for s in self.outstanding if s is not sent]
        answer = build_result(sent.wire_id, {"n": sent.marker})
        actions = self.session.from_wallbox(answer, self.now)
        back = [a for a in actions if isinstance(a, ToUpstream)]
        consumed = [a for a in actions if isinstance(a, ProxyAnswer)]
        if sent.origin == PROXY:
            assert not back and [a.msg_id for a in consumed] == [sent.wire_id]
        else:
            assert not consumed and [(a.name, classify(a.text).msg_id) for a in back] == [(sent.origin, sent.origin_id)]
            assert back[0].text == (answer if sent.wire_id == sent.origin_id else replace_id(classify(answer),
                                                                                              sent.origin_id))
        self._take([a for a in actions if not isinstance(a, ProxyAnswer)], "wallbox")

    @rule(seconds=st.sampled_from([0.5, 10.0, TIMEOUT]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        actions = self.session.poll(self.now)
        expired = [s for s in self.outstanding if self.now - s.at >= TIMEOUT]
        self.outstanding = [s for s in self.outstanding if self.now - s.at < TIMEOUT]
        failed = sorted(a.msg_id for a in actions if isinstance(a, ProxyCallFailed))
        assert failed == sorted(s.wire_id for s in expired if s.origin == PROXY)
        self._take(actions, "timer")

    @rule(observe=st.frozensets(st.sampled_from(ACTIONS + WALLBOX_ACTIONS), max_size=3), rewrite=st.booleans())
    def listener_taps(self, observe: frozenset[str], rewrite: bool) -> None:
        rewriters = {"SetChargingProfile": clamp} if rewrite else {}
        self.session.tap("listener", Tap(observe, rewriters))
        self.observing = observe

    @rule()
    def listener_leaves(self) -> None:
        self.session.tap("listener", None)
        self.observing = frozenset()

    # -- invariants ---------------------------------------------------------------------------------

    @invariant()
    def one_origin_at_the_wallbox(self) -> None:
        origins = {s.origin for s in self.outstanding}
        assert len(origins) <= 1
        if origins and origins != {PRIMARY}:
            assert len(self.outstanding) == 1

    @invariant()
    def proxy_and_secondary_calls_in_submission_order(self) -> None:
        assert self.non_primary_order == sorted(self.non_primary_order)

    @invariant()
    def the_session_counts_what_the_wallbox_holds(self) -> None:
        assert self.session.wallbox_outstanding == len(self.outstanding)


TestSessionMachine = SessionMachine.TestCase
