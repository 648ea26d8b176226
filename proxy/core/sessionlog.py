"""The local session log: what each charging transaction was, read off the wallbox's frames (sans-IO).

Every charger's transactions are recorded (docs/standalone.md): for a
standalone charger the log is the only record, for a charger with a backend
it is a local copy and the backend stays the authority. A wallbox CALL that
starts, updates or ends a transaction is turned into :class:`SessionEvent` s
together with the answer the wallbox gets (1.6: the StartTransaction answer
carries the transactionId); the trio layer commits them before that answer
goes out, so a wallbox that was told "received" is in the log.

Signed meter data is kept as the exact text of its ``sampledValue`` object,
cut out of the frame as received (:mod:`proxy.messages.jsonspan`), never
re-serialized: a verifier (e.g. a transparency software) gets the bytes the
meter signed. The cut is made when the log is read (:func:`signed_texts`):
writing keeps the frame's text as it came, which costs a parse less per
meter reading on the relay's busiest path (docs/standalone.md, "What the log
costs").

Most frames are not about a transaction: :func:`journaled` decides from the
action (and, for a MeterValues, whether its text names a transactionId at
all) before anything is parsed.

A transaction is named by the id the *wallbox* uses (1.6: the number it got
in the StartTransaction answer, the proxy's own negative one when the proxy
answered; 2.x: the station's transactionId string), so every frame about it
lands in the same record, whoever answered it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from proxy.core.offline import started_transaction
from proxy.messages.jsonspan import parse_with_spans
from proxy.messages.ocppj import Frame, payload_of
from proxy.messages.versions import OcppVersion

#: Wallbox CALLs that can start, update or end a transaction.
JOURNAL_ACTIONS = frozenset({"StartTransaction", "StopTransaction", "MeterValues", "TransactionEvent"})

#: The energy register a transaction's energy is the difference of (OCPP's default measurand).
ENERGY = "Energy.Active.Import.Register"

#: OCPP 1.6 StopTransaction without ``reason``: the specification's default.
DEFAULT_REASON = "Local"

Kind = Literal["start", "meter", "stop"]

#: A MeterValues whose text does not contain this names no transaction (1.6; a 2.x one never does).
_TX_MARK = '"transactionId"'


#: A 1.6 MeterValues's transactionId / connectorId member, as almost every wallbox writes it.
_TX_MEMBER = re.compile(r'"transactionId"\s*:\s*(-?\d+)\s*[,}]')
_CONNECTOR_MEMBER = re.compile(r'"connectorId"\s*:\s*(\d+)\s*[,}]')


def meter_keys(text: str) -> tuple[int, int | None] | None:
    """(transactionId, connectorId) of a 1.6 MeterValues read off its text; None: it must be parsed.

    Only when each key occurs once, unescaped, with a plain integer: then
    it is the payload's member (by the schema, no other object in the frame
    has these keys). Anything else (a repeated key, an escaped one, a
    number written otherwise) is left to the full parse.
    """
    if text.count('"transactionId"') != 1:
        return None
    tx = _TX_MEMBER.search(text)
    if tx is None or text[tx.start() - 1] == "\\":
        return None
    connectors = text.count('"connectorId"')
    connector = _CONNECTOR_MEMBER.search(text) if connectors == 1 else None
    if connectors > 1 or (connectors and (connector is None or text[connector.start() - 1] == "\\")):
        return None
    return int(tx.group(1)), int(connector.group(1)) if connector is not None else None


def journaled(frame: Frame) -> bool:
    """Could this wallbox CALL change a transaction's record? Decided without parsing it."""
    action = frame.action
    if action not in JOURNAL_ACTIONS:
        return False
    return action != "MeterValues" or _TX_MARK in frame.text


@dataclass(slots=True)
class SessionEvent:
    """One change to one transaction's record; applied idempotently (a retransmission changes nothing).

    Not changed once made (not ``frozen``: a frozen dataclass's ``__init__``
    costs about as much as parsing the frame, and one is made per meter reading).

    ``meter_wh``: the energy register in Wh (start: meterStart, stop: meterStop,
    meter: the latest reading). ``signed``: the exact text of each signed
    sampledValue; ``signed_frame``: instead, the whole frame's text, from
    which :func:`signed_texts` cuts them when the log is read (what
    :func:`events` gives: nothing is cut on the write path). Both are stored
    under the message id, so the same frame twice stores them once.
    ``local_tx``: a 1.6 id the proxy handed out itself (its counter is kept
    with the record, so ids never repeat after a restart).
    ``signed_frames``: (message id, text) of further frames whose only change
    is their signed data, each stored as ``signed_frame`` would be (a run of
    relayed meter readings, :func:`run_events`: one entry for many frames).
    """

    charger: str
    transaction: str
    kind: Kind
    msg_id: str
    at: str | None = None
    connector: int | None = None
    id_tag: str | None = None
    meter_wh: float | None = None
    reason: str | None = None
    signed: tuple[str, ...] = ()
    local_tx: int | None = None
    signed_frame: str | None = None
    signed_frames: tuple[tuple[str, str], ...] = ()

    @property
    def worth_writing(self) -> bool:
        """A meter reading with neither an energy value nor signed data changes no record."""
        return (self.kind != "meter" or self.meter_wh is not None or bool(self.signed)
                or self.signed_frame is not None or bool(self.signed_frames))


#: A relayed frame waiting for the log: charger, version, the wallbox's CALL, the backend's answer.
Relayed = tuple[str, OcppVersion, Frame, Frame]


#: Frames :func:`plan_relayed` reads between two calls of its ``pause``.
PLAN_TICK = 256


@dataclass(slots=True)
class MeterRun:
    """Relayed 1.6 MeterValues of one transaction, in order, with no other frame of the charger between."""

    charger: str
    transaction: int
    frames: list[tuple[Frame, int | None]]  # each with its connectorId
    version: OcppVersion
    answer: Frame


def plan_relayed(frames: Sequence[Relayed], pause: Callable[[], None] | None = None) -> list[Relayed | MeterRun]:
    """A batch of relayed frames in the order to read them, each charger's MeterValues gathered in runs.

    A charger with a backend sends mostly MeterValues. Of a run of them about
    one transaction, only the first and the last energy reading change the
    record (what applying each one would leave, ``storage.session_log.METERS``),
    and a signed value is stored with its frame as it came; so
    :func:`run_events` parses only the frames holding those two readings.
    Records are independent, so only each charger's own order is kept: a
    charger's runs end before its next other frame. ``pause``: called every
    :data:`PLAN_TICK` frames (the store lets the event loop run there).
    """
    plan: list[Relayed | MeterRun] = []
    runs: dict[tuple[str, int], MeterRun] = {}
    for count, entry in enumerate(frames, 1):
        if pause is not None and not count % PLAN_TICK:
            pause()
        charger, version, call, answer = entry
        keys = meter_keys(call.text) if call.action == "MeterValues" and not version.is_v2 else None
        if keys is None:
            for key in [key for key in runs if key[0] == charger]:
                plan.append(runs.pop(key))
            plan.append(entry)
            continue
        run = runs.get((charger, keys[0]))
        if run is None:
            run = runs[(charger, keys[0])] = MeterRun(charger, keys[0], [], version, answer)
        run.frames.append((call, keys[1]))
    return plan + list(runs.values())


def run_events(run: MeterRun, first: bool = True) -> list[SessionEvent]:
    """A run's entries: its first and last readings parsed, the other frames only kept if signed.

    ``first``: False when the record already holds what a first reading could
    fill in (its meter start and connector; ``storage.session_log.begun``):
    then only the last reading is parsed. The frames kept for their signed
    data alone go in one entry per stretch between parsed frames
    (``signed_frames``), in frame order.
    """
    parsed: dict[int, SessionEvent | None] = {}
    frames = run.frames
    last = range(len(frames) - 1, -1, -1)
    for order in (range(len(frames)), last) if first else (last,):  # the first reading, then the last
        for index in order:
            if index not in parsed:
                found = events(run.charger, run.version, frames[index][0], run.answer)
                parsed[index] = found[0] if found else None
            event = parsed[index]
            if event is not None and event.meter_wh is not None:
                break
    made: list[SessionEvent] = []
    kept: list[tuple[str, str]] = []
    connector: int | None = None
    for index, (call, at) in enumerate(frames):
        if index in parsed:
            event = parsed[index]
            if event is not None and event.worth_writing:
                if kept:
                    made.append(_signed_only(run, kept, connector))
                    kept, connector = [], None
                made.append(event)
            continue
        text = call.text
        if _signed_marked(text):  # its reading changes nothing: only its signed data
            kept.append((call.msg_id or "", text))
            connector = at if connector is None else connector
    if kept:
        made.append(_signed_only(run, kept, connector))
    return made


def _signed_only(run: MeterRun, kept: list[tuple[str, str]], connector: int | None) -> SessionEvent:
    return SessionEvent(run.charger, str(run.transaction), "meter", kept[0][0], connector=connector,
                        signed_frames=tuple(kept))


def relayed_events(frames: Sequence[Relayed]) -> list[SessionEvent]:
    """The session-log entries of relayed frames, each charger's in its frames' order (:func:`plan_relayed`).

    Run by the store as part of the write that commits them
    (:class:`~proxy.storage.interface.LogRelayed`), in its worker thread: the
    event loop only kept references to the frames.
    """
    return [event for item in plan_relayed(frames) for event in planned_events(item)]


def planned_events(item: Relayed | MeterRun) -> list[SessionEvent]:
    """The entries of one item of :func:`plan_relayed` (a meter reading with nothing to record makes none)."""
    if type(item) is MeterRun:
        return run_events(item)
    return [event for event in events(*item) if event.worth_writing]  # type: ignore[misc]


def events(charger: str, version: OcppVersion, call: Frame, answer: Frame) -> list[SessionEvent]:
    """What ``call`` (a wallbox CALL) answered by ``answer`` changes in the log; [] for anything else."""
    if call.action not in JOURNAL_ACTIONS:
        return []
    try:
        payload = payload_of(call)
    except (ValueError, IndexError):
        return []
    if type(payload) is not dict:
        return []
    if version.is_v2:
        return _transaction_event(charger, call, payload) if call.action == "TransactionEvent" else []
    return _v16(charger, call, payload, answer)


# --- OCPP 1.6 ---------------------------------------------------------------------------

def _v16(charger: str, call: Frame, payload: Mapping[str, Any], answer: Frame) -> list[SessionEvent]:
    msg_id = call.msg_id or ""
    if call.action == "StartTransaction":
        tx = started_transaction(answer)  # whoever answered: the backend or the proxy
        if tx is None:
            return []
        return [SessionEvent(charger, str(tx), "start", msg_id, at=utc(payload.get("timestamp")),
                             connector=_int(payload.get("connectorId")), id_tag=_str(payload.get("idTag")),
                             meter_wh=_number(payload.get("meterStart")), local_tx=tx if tx < 0 else None)]
    tx = payload.get("transactionId")
    if not isinstance(tx, int) or isinstance(tx, bool):
        return []  # MeterValues outside a transaction (or garbage): no record to change
    if call.action == "MeterValues":
        samples = payload.get("meterValue")
        return [SessionEvent(charger, str(tx), "meter", msg_id, at=_last_time(samples),
                             connector=_int(payload.get("connectorId")), meter_wh=_last_energy(samples),
                             signed_frame=_signed_frame(call, samples, _is_signed_v16))]
    data = payload.get("transactionData")
    return [SessionEvent(charger, str(tx), "stop", msg_id, at=utc(payload.get("timestamp")),
                         id_tag=_str(payload.get("idTag")), meter_wh=_number(payload.get("meterStop")),
                         reason=_str(payload.get("reason")) or DEFAULT_REASON,
                         signed_frame=_signed_frame(call, data, _is_signed_v16))]


def _is_signed_v16(sample: dict[str, Any]) -> bool:
    return sample.get("format") == "SignedData"


# --- OCPP 2.0.1 / 2.1 -------------------------------------------------------------------

_V2_KINDS: dict[str, Kind] = {"Started": "start", "Updated": "meter", "Ended": "stop"}


def _transaction_event(charger: str, call: Frame, payload: Mapping[str, Any]) -> list[SessionEvent]:
    info = payload.get("transactionInfo")
    kind = _V2_KINDS.get(str(payload.get("eventType")))
    if not isinstance(info, Mapping) or kind is None:
        return []
    tx = info.get("transactionId")
    if not isinstance(tx, str):
        return []
    samples = payload.get("meterValue")
    reading = _last_energy(samples) if kind != "start" else _first_energy(samples)
    evse = payload.get("evse")
    token = payload.get("idToken")
    reason = None
    if kind == "stop":
        reason = _str(info.get("stoppedReason")) or DEFAULT_REASON
    return [SessionEvent(charger, tx, kind, call.msg_id or "", at=utc(payload.get("timestamp")),
                         connector=_int(evse.get("id")) if isinstance(evse, Mapping) else None,
                         id_tag=_str(token.get("idToken")) if isinstance(token, Mapping) else None,
                         meter_wh=reading, reason=reason,
                         signed_frame=_signed_frame(call, samples, _is_signed_v2))]


def _is_signed_v2(sample: dict[str, Any]) -> bool:
    return type(sample.get("signedMeterValue")) is dict


# --- meter values -----------------------------------------------------------------------
# Payloads come from json.loads: objects are dicts (an exact type check is much cheaper than Mapping's).

def _entries(samples: Any) -> list[dict[str, Any]]:
    """Every sampledValue object under a ``meterValue`` / ``transactionData`` list, in frame order."""
    found: list[dict[str, Any]] = []
    if type(samples) is not list:
        return found
    for meter_value in samples:
        entries = meter_value.get("sampledValue") if type(meter_value) is dict else None
        if type(entries) is list:
            found += [sample for sample in entries if type(sample) is dict]
    return found


def _energy_wh(sample: dict[str, Any]) -> float | None:
    if sample.get("measurand", ENERGY) != ENERGY or sample.get("phase") or _is_signed_v16(sample):
        return None
    value = _number(sample.get("value"))
    if value is None:
        return None
    unit, multiplier = sample.get("unit", "Wh"), 0
    measure = sample.get("unitOfMeasure")
    if type(measure) is dict:
        unit, multiplier = measure.get("unit", "Wh"), _int(measure.get("multiplier")) or 0
    scale = _SCALES.get(unit) if type(unit) is str else None
    return None if scale is None else value * scale * 10.0 ** multiplier


_SCALES = {"Wh": 1.0, "kWh": 1000.0}


def _first_energy(samples: Any) -> float | None:
    for sample in _entries(samples):
        value = _energy_wh(sample)
        if value is not None:
            return value
    return None


def _last_energy(samples: Any) -> float | None:
    for sample in reversed(_entries(samples)):
        value = _energy_wh(sample)
        if value is not None:
            return value
    return None


def _last_time(samples: Any) -> str | None:
    if type(samples) is not list:
        return None
    for meter_value in reversed(samples):
        at = utc(meter_value.get("timestamp")) if type(meter_value) is dict else None
        if at is not None:
            return at
    return None


def _is_signed(sample: dict[str, Any]) -> bool:
    """1.6 ``format = SignedData`` or a 2.x ``signedMeterValue`` (a frame is one version or the other)."""
    return _is_signed_v16(sample) or _is_signed_v2(sample)


def _signed_marked(text: str) -> bool:
    """False: ``text`` holds no signed sample (checked before walking the samples). The one place the two
    marks are named; two ``in`` tests, not a loop over a tuple: it runs for nearly every relayed frame."""
    return "SignedData" in text or "signedMeterValue" in text


def _signed_frame(call: Frame, samples: Any, signed: Callable[[dict[str, Any]], bool]) -> str | None:
    """The frame's text if a sample in ``samples`` is ``signed`` (it is stored whole; see signed_texts)."""
    text = call.text
    if not _signed_marked(text):
        return None
    return text if any(signed(sample) for sample in _entries(samples)) else None


def signed_texts(frame_text: str) -> list[str]:
    """The exact text of each signed sampledValue in a stored frame, in frame order ([] if it has none).

    ``frame_text`` is a wallbox CALL as received (``[2, id, action, payload]``):
    its samples are under ``transactionData`` (1.6 StopTransaction) or
    ``meterValue``. One parse finds them and their spans.
    """
    try:
        parsed, spans = parse_with_spans(frame_text, (3, None, None, "sampledValue", None))
    except ValueError:
        return []
    if type(parsed) is not list or len(parsed) < 4:
        return []
    key = "transactionData" if parsed[2] == "StopTransaction" else "meterValue"
    found: list[str] = []
    for path, (start, end) in spans.items():
        if path[1] != key:
            continue
        sample = parsed[3][key][path[2]]["sampledValue"][path[4]]
        if type(sample) is dict and _is_signed(sample):
            found.append(frame_text[start:end])
    return found


# --- small parsers ------------------------------------------------------------------------

#: The form nearly every wallbox sends: already UTC, only the fraction to drop (no datetime needed).
_PLAIN_UTC = re.compile(r"\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d"
                        r"(?:\.\d{1,9})?Z")


def utc(value: Any) -> str | None:
    """An OCPP timestamp as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, sortable as text); None if it is not one."""
    if not isinstance(value, str):
        return None
    if _PLAIN_UTC.fullmatch(value) and value[8:10] <= "28":  # days 29-31 are checked against their month below
        return value[:19] + "Z"
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)  # OCPP times are UTC; a missing offset means UTC
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def _str(value: Any) -> str | None:
    return value[:255] if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    kind = type(value)
    if kind is int or kind is float:
        return float(value)
    if kind is str:
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One transaction as the log holds it (what ``ocpp-proxy sessions export`` prints)."""

    charger: str
    transaction: str
    connector: int | None
    id_tag: str | None
    started: str | None
    stopped: str | None
    meter_start_wh: float | None
    meter_stop_wh: float | None
    reason: str | None
    #: Exact text of each signed sampledValue, in the order received.
    signed: Sequence[str]
    #: The id the backend gave a transaction the proxy started offline (1.6, after the replay).
    backend_transaction: int | None = None
    #: The latest energy reading while the transaction runs (no stop yet).
    meter_last_wh: float | None = None

    @property
    def energy_wh(self) -> float | None:
        end = self.meter_stop_wh if self.meter_stop_wh is not None else self.meter_last_wh
        if end is None or self.meter_start_wh is None:
            return None
        return end - self.meter_start_wh


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One transaction as the status page lists it: the record without its signed texts (docs/status.md).

    ``number``: the record's number in the log (newer records have higher
    ones; a page of older ones asks for those below the last it got).
    ``signed``: whether the log holds signed meter data for it (the texts
    themselves are in the export).
    """

    number: int
    record: SessionRecord
    signed: bool


#: The most sessions one status request lists (per charger, or in all).
MAX_LISTED = 100
