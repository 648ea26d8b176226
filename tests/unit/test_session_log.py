"""The session log: events read off wallbox frames (sans-IO) and their record in the SQLite store.

Invariant (hypothesis stateful): however a wallbox's transaction frames are
interleaved, retransmitted with the same message id, and the store reopened
(a proxy restart), the log holds one record per transaction, its energy is
meter stop - meter start, the first stop's reason and time win, and each signed
value is kept once, byte for byte.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.core.sessionlog import SessionEvent, events, signed_texts, utc
from proxy.messages.ocppj import classify
from proxy.messages.versions import OcppVersion
from proxy.storage.interface import Journal
from proxy.storage.offline_queue import DB_NAME, SqliteStorage

# A 1.6 MeterValues as a wallbox might write it: odd spacing, an escaped quote and a \u escape in the
# signed value. The log must keep these bytes, not what json.dumps would make of them.
SIGNED_16 = '{ "value" : "OCMF|{\\"FV\\":\\"1.0\\",\\"RD\\":[{\\"RV\\":0.3}]}|{\\"SD\\":\\"30\\u0041\\"}" ,"format":"SignedData"}'
METER_16 = ('[2, "m1", "MeterValues", {"connectorId": 1, "transactionId": -4, "meterValue": [{"timestamp": '
            '"2026-11-27T06:00:00+01:00", "sampledValue": [{"value": "2.5", "unit": "kWh"}, ' + SIGNED_16 + ']}]}]')


def test_signed_value_is_cut_from_the_frame_byte_for_byte() -> None:
    [event] = events("CP", OcppVersion.V16, classify(METER_16), classify('[3, "m1", {}]'))
    assert (event.kind, event.transaction, event.meter_wh, event.at) == ("meter", "-4", 2500.0, "2026-11-27T05:00:00Z")
    assert event.signed_frame == METER_16  # kept whole; cut when read
    assert signed_texts(METER_16) == [SIGNED_16]


def test_start_needs_the_answer_and_its_transaction_id() -> None:
    start = classify('[2, "s1", "StartTransaction", {"connectorId": 2, "idTag": "T", "meterStart": 10, '
                     '"timestamp": "2026-11-27T06:00:00Z"}]')
    assert events("CP", OcppVersion.V16, start, classify('[4, "s1", "InternalError", "", {}]')) == []
    [event] = events("CP", OcppVersion.V16, start, classify('[3, "s1", {"transactionId": -7, '
                                                            '"idTagInfo": {"status": "Accepted"}}]'))
    assert (event.transaction, event.connector, event.id_tag, event.meter_wh, event.local_tx) == ("-7", 2, "T", 10.0, -7)
    [backend] = events("CP", OcppVersion.V16, start, classify('[3, "s1", {"transactionId": 7, "idTagInfo": {}}]'))
    assert backend.local_tx is None  # a backend's id is not the proxy's counter


def test_v2_energy_units_and_signed_meter_value() -> None:
    sample = ('{"value": 1.5, "measurand": "Energy.Active.Import.Register", "unitOfMeasure": {"unit": "kWh", '
              '"multiplier": 1}, "signedMeterValue": {"signedMeterData": "abc", "signingMethod": "", '
              '"encodingMethod": "OCMF", "publicKey": ""}}')
    text = ('[2, "e1", "TransactionEvent", {"eventType": "Ended", "timestamp": "2026-11-27T06:00:00Z", '
            '"triggerReason": "EVDeparted", "seqNo": 3, "transactionInfo": {"transactionId": "tx-9", '
            '"stoppedReason": "EVDisconnected"}, "evse": {"id": 2}, "meterValue": [{"timestamp": '
            '"2026-11-27T06:00:00Z", "sampledValue": [' + sample + ']}]}]')
    [event] = events("CS", OcppVersion.V201, classify(text), classify('[3, "e1", {}]'))
    assert (event.kind, event.transaction, event.connector, event.reason) == ("stop", "tx-9", 2, "EVDisconnected")
    assert event.meter_wh == 15000.0  # 1.5 kWh x 10^1
    assert event.signed_frame == text and signed_texts(text) == [sample]


def test_times_normalize_to_utc_text() -> None:
    assert utc("2026-11-27T07:00:00.123+01:00") == "2026-11-27T06:00:00Z"
    assert utc("2026-11-27T07:00:00.123Z") == utc("2026-11-27T07:00:00+00:00") == "2026-11-27T07:00:00Z"
    assert utc("2026-02-30T07:00:00Z") is None and utc("2026-11-27T24:00:00Z") is None
    assert utc("2026-11-27") == "2026-11-27T00:00:00Z"
    assert utc("yesterday") is None


# --- the invariant, over the store -------------------------------------------------------

TXS = ("-1", "-2", "7")


class SessionLogMachine(RuleBasedStateMachine):
    """Random start/meter/stop frames (with retransmissions) and restarts against a model.

    Frames are committed in batches of random size (as the write-behind of
    relayed chargers commits them), so several readings of one transaction,
    between its start and stop, meet in one write.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / DB_NAME
        self.storage = SqliteStorage(self.path, mirrors=False)
        #: What the log must say per transaction: start, stop, reason, signed texts.
        self.model: dict[str, dict[str, object]] = {}
        self.sent: list[SessionEvent] = []
        self.seq = 0
        #: Written but not yet committed (the next ``commit`` writes them in one batch).
        self.pending: list[SessionEvent] = []

    def _write(self, event: SessionEvent) -> None:
        self.pending.append(event)
        self.sent.append(event)
        if event.meter_wh is not None and event.kind != "start":  # a start's reading is meter_start only
            self._record(event.transaction)["last"] = event.meter_wh

    def _record(self, tx: str) -> dict[str, object]:
        return self.model.setdefault(tx, {"start": None, "stop": None, "reason": None, "signed": [], "msg": None,
                                          "last": None})

    @rule()
    def commit(self) -> None:
        self.storage.write([Journal(event) for event in self.pending])
        self.pending.clear()

    @rule(tx=st.sampled_from(TXS), meter=st.integers(0, 10_000))
    def start(self, tx: str, meter: int) -> None:
        record = self._record(tx)
        if record["msg"] is not None:
            return  # one StartTransaction per transaction id in this model (a new id gets a new record)
        record["msg"], record["start"] = f"s{tx}", float(meter)
        self._write(SessionEvent("CP", tx, "start", f"s{tx}", at="2026-11-27T06:00:00Z", connector=1,
                                 id_tag="T", meter_wh=float(meter)))

    @rule(tx=st.sampled_from(TXS), signed=st.booleans(), reading=st.none() | st.integers(0, 30_000))
    def meter(self, tx: str, signed: bool, reading: int | None) -> None:
        self.seq += 1
        text = f'{{"value": "sig-{self.seq}", "format":  "SignedData"}}'
        record = self._record(tx)
        if signed:
            record["signed"].append(text)  # type: ignore[attr-defined]
        self._write(SessionEvent("CP", tx, "meter", f"m{self.seq}", signed=(text,) if signed else (),
                                 meter_wh=None if reading is None else float(reading)))

    @rule(tx=st.sampled_from(TXS), meter=st.integers(10_000, 20_000), reason=st.sampled_from(["Local", "EVDisconnected"]))
    def stop(self, tx: str, meter: int, reason: str) -> None:
        self.seq += 1
        record = self._record(tx)
        if record["stop"] is None:
            record["stop"], record["reason"] = float(meter), reason
        self._write(SessionEvent("CP", tx, "stop", f"p{self.seq}", at="2026-11-27T07:00:00Z",
                                 meter_wh=float(meter), reason=reason, signed=(f'{{"stop": {self.seq}}}',)))
        record["signed"].append(f'{{"stop": {self.seq}}}')  # type: ignore[attr-defined]

    @precondition(lambda self: bool(self.sent))
    @rule(back=st.integers(1, 5))
    def retransmit(self, back: int) -> None:
        """A frame sent again with its message id (its answer was lost): nothing changes but its reading."""
        self._write(self.sent[-min(back, len(self.sent))])

    @rule()
    def restart(self) -> None:
        self.commit()  # what close() does with entries still waiting
        self.storage.close()
        self.storage = SqliteStorage(self.path, mirrors=False)

    @invariant()
    def log_matches_model(self) -> None:
        if self.pending:
            return  # checked once they are committed
        records = {r.transaction: r for r in self.storage.sessions(None, None)}
        assert len(records) == len(self.storage.sessions(None, None))  # one record per transaction
        assert set(records) == set(self.model)
        for tx, want in self.model.items():
            got = records[tx]
            assert got.meter_stop_wh == want["stop"] and got.reason == want["reason"]
            if want["start"] is not None and want["stop"] is not None:
                assert got.energy_wh == want["stop"] - want["start"]  # type: ignore[operator]
            assert list(got.signed) == want["signed"]
            assert got.meter_last_wh == want["last"] or (got.meter_last_wh is None and want["last"] is None)

    def teardown(self) -> None:
        self.storage.close()
        self.dir.cleanup()


TestSessionLog = SessionLogMachine.TestCase
TestSessionLog.settings = settings(max_examples=200, stateful_step_count=25)


def test_export_renders_csv_and_json(tmp_path: Path) -> None:
    from proxy.ops.sessions import render

    storage = SqliteStorage(tmp_path / DB_NAME, mirrors=False)
    storage.write([Journal(SessionEvent("CP", "-1", "start", "s", at="2026-11-27T06:00:00Z", meter_wh=5.0)),
                   Journal(SessionEvent("CP", "-1", "stop", "p", meter_wh=12.0, reason="Local", signed=('{"a" :1}',)))])
    records = storage.sessions("2026-11-27T00:00:00Z", "2026-11-28T00:00:00Z")
    storage.close()
    [row] = json.loads(render(records, "json"))
    assert (row["energy_wh"], row["signed"]) == (7.0, ['{"a" :1}'])
    lines = render(records, "csv").splitlines()
    assert lines[0].startswith("charger,transaction,") and '"[""{\\""a\\"" :1}""]"' in lines[1]


async def test_meter_values_written_behind_keep_their_order(tmp_path: Path) -> None:
    """A charger with a backend: meter entries do not wait for a commit, yet land in order and durably."""
    import trio

    from proxy.storage.offline_queue import AsyncQueue
    from tests.opskit import wait_until

    storage = SqliteStorage(tmp_path / DB_NAME, mirrors=False)
    queue = AsyncQueue(storage)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.commit_behind)
        await queue.journal([SessionEvent("CP", "9", "start", "s", meter_wh=0.0)])
        queue.journal_behind([SessionEvent("CP", "9", "meter", "m1", signed=('{"m": 1}',))])
        await wait_until(lambda: list(storage.sessions(None, None)[0].signed) == ['{"m": 1}'])
        queue.journal_behind([SessionEvent("CP", "9", "meter", "m2", signed=('{"m": 2}',))])
        await queue.journal([SessionEvent("CP", "9", "stop", "p", meter_wh=5.0, signed=('{"stop": 1}',))])
        [record] = storage.sessions(None, None)
        assert list(record.signed) == ['{"m": 1}', '{"m": 2}', '{"stop": 1}'] and record.energy_wh == 5.0
        queue.journal_behind([SessionEvent("CP", "9", "meter", "m3", signed=('{"m": 3}',))])
        nursery.cancel_scope.cancel()
    queue.close()  # commits what is still behind
    reopened = SqliteStorage(tmp_path / DB_NAME, mirrors=False)
    assert list(reopened.sessions(None, None)[0].signed)[-1] == '{"m": 3}'
    reopened.close()


def _relayed(msg_id: str, kwh: float, signed: str) -> str:
    return ('[2, "%s", "MeterValues", {"connectorId": 1, "transactionId": 9, "meterValue": [{"sampledValue": '
            '[{"value": "%s", "unit": "kWh"}, {"value": "%s", "format": "SignedData"}]}]}]' % (msg_id, kwh, signed))


async def test_relayed_frames_are_read_behind_in_order_and_at_close(tmp_path: Path) -> None:
    """A charger with a backend: its frames are only referenced on the relay's path, read into the log in
    the next batch, before an awaited entry of the same charger, and at close."""
    import trio

    from proxy.storage.offline_queue import AsyncQueue
    from tests.opskit import wait_until

    storage = SqliteStorage(tmp_path / DB_NAME, mirrors=False)
    queue = AsyncQueue(storage)
    ack = classify('[3, "x", {}]')
    start = classify('[2, "s", "StartTransaction", {"connectorId": 1, "idTag": "T", "meterStart": 1000, '
                     '"timestamp": "2026-11-27T06:00:00Z"}]')
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.commit_behind, 0.05)
        queue.log_later("CP", OcppVersion.V16, start, classify('[3, "s", {"transactionId": 9, "idTagInfo": {}}]'))
        queue.log_later("CP", OcppVersion.V16, classify(_relayed("m1", 2.0, "S1")), ack)
        assert queue.later == 2 and storage.sessions(None, None) == []  # nothing read or written yet
        await wait_until(lambda: [r.meter_last_wh for r in storage.sessions(None, None)] == [2000.0])
        queue.log_later("CP", OcppVersion.V16, classify(_relayed("m2", 3.0, "S2")), ack)
        # The backend went away: a StopTransaction answered locally waits for its commit, after the reading.
        await queue.journal([SessionEvent("CP", "9", "stop", "p", meter_wh=4000.0, reason="Local")])
        [record] = storage.sessions(None, None)
        assert [json.loads(t)["value"] for t in record.signed] == ["S1", "S2"] and record.energy_wh == 3000.0
        queue.log_later("CP", OcppVersion.V16, classify(_relayed("m3", 3.5, "S3")), ack)
        nursery.cancel_scope.cancel()
    queue.close()  # reads and commits what is still waiting
    reopened = SqliteStorage(tmp_path / DB_NAME, mirrors=False)
    [record] = reopened.sessions(None, None)
    assert [json.loads(t)["value"] for t in record.signed] == ["S1", "S2", "S3"]
    assert (record.meter_start_wh, record.meter_stop_wh, record.id_tag) == (1000.0, 4000.0, "T")
    reopened.close()


def test_relayed_frames_waiting_are_bounded(tmp_path: Path, monkeypatch: Any) -> None:
    """A store that cannot keep up does not grow memory without end: the oldest are dropped and counted."""
    from proxy.storage import offline_queue

    monkeypatch.setattr(offline_queue, "LATER_LIMIT", 3)
    queue = offline_queue.AsyncQueue(SqliteStorage(tmp_path / DB_NAME, mirrors=False))
    for n in range(5):
        queue.log_later("CP", OcppVersion.V16, classify(_relayed(f"m{n}", float(n), f"S{n}")), classify('[3, "x", {}]'))
    assert (queue.later, queue.later_dropped) == (3, 2)
    queue.close()
    reopened = SqliteStorage(tmp_path / DB_NAME, mirrors=False)
    assert [json.loads(t)["value"] for t in reopened.sessions(None, None)[0].signed] == ["S2", "S3", "S4"]
    reopened.close()


# --- a batch of relayed frames read with few parses leaves the log as reading each frame would --------------

relayed_frame = st.tuples(st.sampled_from(["CP1", "CP2"]),  # charger
                          st.sampled_from(["meter", "meter", "meter", "start", "stop"]),
                          st.integers(1, 3),  # transaction
                          st.none() | st.integers(0, 50_000),  # energy reading (Wh)
                          st.booleans(),  # signed
                          st.sampled_from([1, 2]),  # connector
                          st.booleans())  # the key order ocpp-library peers use (meterValue before transactionId)


def _frame_text(n: int, kind: str, tx: int, reading: int | None, signed: bool, connector: int,
                sorted_keys: bool) -> tuple[str, str]:
    """(the wallbox's CALL, the backend's answer) for one generated frame."""
    samples = [{"value": "16.0", "measurand": "Current.Import", "phase": "L1", "unit": "A"}]
    if reading is not None:
        samples.append({"value": str(reading), "measurand": "Energy.Active.Import.Register", "unit": "Wh"})
    if signed:
        samples.append({"value": f"OCMF|{{\"n\":{n}}}", "format": "SignedData"})
    values = [{"timestamp": f"2026-11-27T06:{n // 60 % 60:02d}:{n % 60:02d}Z", "sampledValue": samples}]
    if kind == "start":
        payload: dict[str, Any] = {"connectorId": connector, "idTag": "T", "meterStart": reading or 0,
                                   "timestamp": "2026-11-27T05:00:00Z"}
        return (json.dumps([2, f"s{n}", "StartTransaction", payload]),
                json.dumps([3, f"s{n}", {"transactionId": tx, "idTagInfo": {"status": "Accepted"}}]))
    if kind == "stop":
        payload = {"transactionId": tx, "meterStop": reading or 0, "timestamp": "2026-11-27T07:00:00Z",
                   "transactionData": values}
        return json.dumps([2, f"p{n}", "StopTransaction", payload]), json.dumps([3, f"p{n}", {}])
    payload = ({"connectorId": connector, "meterValue": values, "transactionId": tx} if sorted_keys
               else {"connectorId": connector, "transactionId": tx, "meterValue": values})
    return json.dumps([2, f"m{n}", "MeterValues", payload]), json.dumps([3, f"m{n}", {}])


@settings(max_examples=150, deadline=None)
@given(st.lists(relayed_frame, max_size=40), st.lists(st.integers(0, 40), max_size=4))
def test_a_relayed_batch_read_with_few_parses_equals_reading_each_frame(frames: list[Any], cuts: list[int]) -> None:
    """Frames handed to the store as they wait (LogRelayed, read in its thread with few parses), in one
    batch or cut in several (a charger's awaited entry takes its frames out early), leave the log as each
    frame's entries written one by one do."""
    from proxy.storage import offline_queue
    from proxy.storage.interface import LogRelayed

    batch = []
    for n, (charger, kind, tx, reading, signed, connector, sorted_keys) in enumerate(frames):
        call, answer = _frame_text(n, kind, tx, reading, signed, connector, sorted_keys)
        batch.append((charger, OcppVersion.V16, classify(call), classify(answer)))
    bounds = [0, *sorted(set(cut for cut in cuts if cut < len(batch))), len(batch)]

    def records(storage: SqliteStorage) -> list[tuple[Any, ...]]:
        return sorted(((r.charger, r.transaction, r.connector, r.id_tag, r.started, r.stopped, r.meter_start_wh,
                        r.meter_stop_wh, r.meter_last_wh, r.reason, tuple(r.signed))
                       for r in storage.sessions(None, None)), key=repr)

    with tempfile.TemporaryDirectory() as folder:
        each = SqliteStorage(Path(folder) / "each.sqlite3", mirrors=False)
        each.write([Journal(event) for entry in batch for event in events(*entry) if event.worth_writing])
        planned = SqliteStorage(Path(folder) / "planned.sqlite3", mirrors=False)
        planned.write([LogRelayed(batch)])
        apart = SqliteStorage(Path(folder) / "apart.sqlite3", mirrors=False)
        commits = SqliteStorage(Path(folder) / "commits.sqlite3", mirrors=False)
        saved = offline_queue._LOG_HOLD, offline_queue._LOG_APPLY
        try:
            offline_queue._LOG_HOLD = 0.0  # the store pauses (and applies what it read) after every item
            apart.write([LogRelayed(batch[start:end]) for start, end in zip(bounds, bounds[1:]) if end > start])
            offline_queue._LOG_HOLD, offline_queue._LOG_APPLY = saved[0], 2  # or every two entries
            for start, end in zip(bounds, bounds[1:]):  # each part its own commit, as commit_behind may make them
                commits.write([LogRelayed(batch[start:end])])
        finally:
            offline_queue._LOG_HOLD, offline_queue._LOG_APPLY = saved
        assert records(planned) == records(each) == records(apart) == records(commits)
        for storage in (each, planned, apart, commits):
            storage.close()


def test_a_run_of_a_begun_record_parses_only_its_last_reading(monkeypatch: Any) -> None:
    """A run of meter readings: the first and last parsed, or only the last when the record has its meter
    start; the frames in between are kept for their signed data (one entry per stretch, in frame order)."""
    from proxy.core import sessionlog

    parsed: list[str] = []
    real = sessionlog.events

    def counting(charger: str, version: OcppVersion, call: Any, answer: Any) -> list[SessionEvent]:
        parsed.append(call.msg_id)
        return real(charger, version, call, answer)

    monkeypatch.setattr(sessionlog, "events", counting)
    ack = classify('[3, "x", {}]')
    batch = [("CP", OcppVersion.V16, classify(_relayed(f"m{n}", float(n), f"S{n}")), ack) for n in range(1, 6)]
    [run] = sessionlog.plan_relayed(batch)
    assert isinstance(run, sessionlog.MeterRun)
    for first, want in ((True, ["m1", "m5"]), (False, ["m5"])):
        parsed.clear()
        made = sessionlog.run_events(run, first)
        assert parsed == want
        frames = [text for event in made for text in ([event.signed_frame] if event.signed_frame else [])
                  + [text for _, text in event.signed_frames]]
        assert frames == [entry[2].text for entry in batch]  # every signed frame, once, in order
        assert [e.meter_wh for e in made if e.meter_wh is not None] == ([1000.0, 5000.0] if first else [5000.0])
