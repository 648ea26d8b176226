"""Safety rule, as a hypothesis state machine over the sans-IO Session (issue 17):

In offline mode every wallbox CALL is answered exactly once, by the backend or by the proxy,
and never later than ``upstream_call_timeout`` after it was sent while the backend stays silent,
whatever the backend does meanwhile: answer, stay silent, drop, come back. A locally answered
CALL that is stored carries its answer inside the :class:`Persist` action (the relay sends it
only after the commit), so "answered once" covers "stored before answered" as well.
"""

from __future__ import annotations

import json
from collections import Counter

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.core.offline import OfflineResponder, OfflineSettings
from proxy.core.session import PRIMARY, Action, Persist, Session, ToUpstream, ToWallbox, UpstreamUnresponsive

TIMEOUT = 15.0
CALLS = {
    "Heartbeat": {},
    "StatusNotification": {"connectorId": 1, "errorCode": "NoError", "status": "Available"},
    "MeterValues": {"connectorId": 1, "meterValue": []},
    "Authorize": {"idTag": "TAG"},
    "DataTransfer": {"vendorId": "V"},
    "GetSomething": {},  # not answerable offline: a CALLERROR, still an answer
}


class BackendFaults(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.session = Session("CP1", offline=OfflineResponder(OfflineSettings(auth="accept_all")),
                               upstream_call_timeout=TIMEOUT)
        self.now = 0.0
        self.up = True
        self.sent_at: dict[str, float] = {}  # wallbox CALLs not answered yet
        self.answers: Counter[str] = Counter()
        self.at_backend: list[str] = []  # CALLs the backend has on its current connection
        self.unresponsive = 0
        self.seq = 0

    def handle(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Persist):
                self.answered(action.msg_id)
            elif isinstance(action, ToWallbox):
                self.answered(json.loads(action.text)[1])
            elif isinstance(action, ToUpstream) and action.name == PRIMARY:
                self.at_backend.append(json.loads(action.text)[1])
            elif isinstance(action, UpstreamUnresponsive):
                self.unresponsive += 1
                self.lose()  # what the relay does: drop the connection, the session answers locally

    def answered(self, msg_id: str) -> None:
        self.answers[msg_id] += 1
        self.sent_at.pop(msg_id, None)

    def lose(self) -> None:
        self.up = False
        self.at_backend.clear()
        self.handle(self.session.upstream_down(PRIMARY, self.now))

    @rule(action=st.sampled_from(sorted(CALLS)))
    def wallbox_call(self, action: str) -> None:
        self.seq += 1
        msg_id = f"w{self.seq}"
        self.sent_at[msg_id] = self.now
        self.handle(self.session.from_wallbox(json.dumps([2, msg_id, action, CALLS[action]]), self.now))

    @precondition(lambda self: self.up and self.at_backend)
    @rule(index=st.integers(min_value=0, max_value=1000))
    def backend_answers(self, index: int) -> None:
        msg_id = self.at_backend.pop(index % len(self.at_backend))
        self.handle(self.session.from_upstream(PRIMARY, json.dumps([3, msg_id, {}]), self.now))

    @rule(seconds=st.floats(min_value=0.01, max_value=2 * TIMEOUT))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.handle(self.session.poll(self.now))

    @precondition(lambda self: self.up)
    @rule()
    def backend_drops(self) -> None:
        self.lose()

    @precondition(lambda self: not self.up)
    @rule()
    def backend_returns(self) -> None:
        self.up = True
        self.session.upstream_up(PRIMARY)

    @invariant()
    def answered_at_most_once(self) -> None:
        assert all(count == 1 for count in self.answers.values()), self.answers

    @invariant()
    def never_left_waiting_past_the_timeout(self) -> None:
        deadline = self.session.next_deadline()
        for msg_id, sent in self.sent_at.items():
            assert self.now - sent < TIMEOUT, (msg_id, sent, self.now)
            # ... and the session will wake up for it in time.
            assert deadline is not None and deadline <= sent + TIMEOUT

    @invariant()
    def offline_means_answered_at_once(self) -> None:
        if not self.up:
            assert not self.sent_at  # every CALL made while the backend is down was answered locally


TestBackendFaults = BackendFaults.TestCase
