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
meter signed.

A transaction is named by the id the *wallbox* uses (1.6: the number it got
in the StartTransaction answer, the proxy's own negative one when the proxy
answered; 2.x: the station's transactionId string), so every frame about it
lands in the same record, whoever answered it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from proxy.core.offline import started_transaction
from proxy.messages.jsonspan import value_span
from proxy.messages.ocppj import Frame, payload_of
from proxy.messages.versions import OcppVersion

#: Wallbox CALLs that can start, update or end a transaction.
JOURNAL_ACTIONS = frozenset({"StartTransaction", "StopTransaction", "MeterValues", "TransactionEvent"})

#: The energy register a transaction's energy is the difference of (OCPP's default measurand).
ENERGY = "Energy.Active.Import.Register"

#: OCPP 1.6 StopTransaction without ``reason``: the specification's default.
DEFAULT_REASON = "Local"

Kind = Literal["start", "meter", "stop"]


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """One change to one transaction's record; applied idempotently (a retransmission changes nothing).

    ``meter_wh``: the energy register in Wh (start: meterStart, stop: meterStop,
    meter: the latest reading). ``signed``: (message id, exact text of each
    signed sampledValue) so the same frame twice stores each once.
    ``local_tx``: a 1.6 id the proxy handed out itself (its counter is kept
    with the record, so ids never repeat after a restart).
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


def events(charger: str, version: OcppVersion, call: Frame, answer: Frame) -> list[SessionEvent]:
    """What ``call`` (a wallbox CALL) answered by ``answer`` changes in the log; [] for anything else."""
    if call.action not in JOURNAL_ACTIONS:
        return []
    try:
        payload = payload_of(call)
    except (ValueError, IndexError):
        return []
    if not isinstance(payload, Mapping):
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
                             signed=_signed(call.text, "meterValue", samples, _is_signed_v16))]
    data = payload.get("transactionData")
    return [SessionEvent(charger, str(tx), "stop", msg_id, at=utc(payload.get("timestamp")),
                         id_tag=_str(payload.get("idTag")), meter_wh=_number(payload.get("meterStop")),
                         reason=_str(payload.get("reason")) or DEFAULT_REASON,
                         signed=_signed(call.text, "transactionData", data, _is_signed_v16))]


def _is_signed_v16(sample: Mapping[str, Any]) -> bool:
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
                         signed=_signed(call.text, "meterValue", samples, _is_signed_v2))]


def _is_signed_v2(sample: Mapping[str, Any]) -> bool:
    return isinstance(sample.get("signedMeterValue"), Mapping)


# --- meter values -----------------------------------------------------------------------

def _energies(samples: Any) -> list[float]:
    """Energy register readings in Wh, in frame order (1.6 ``unit``, 2.x ``unitOfMeasure``)."""
    found: list[float] = []
    for meter_value in samples if isinstance(samples, list) else []:
        entries = meter_value.get("sampledValue") if isinstance(meter_value, Mapping) else None
        for sample in entries if isinstance(entries, list) else []:
            value = _energy_wh(sample) if isinstance(sample, Mapping) else None
            if value is not None:
                found.append(value)
    return found


def _energy_wh(sample: Mapping[str, Any]) -> float | None:
    if sample.get("measurand", ENERGY) != ENERGY or sample.get("phase") or _is_signed_v16(sample):
        return None
    value = _number(sample.get("value"))
    if value is None:
        return None
    unit, multiplier = sample.get("unit", "Wh"), 0
    measure = sample.get("unitOfMeasure")
    if isinstance(measure, Mapping):
        unit, multiplier = measure.get("unit", "Wh"), _int(measure.get("multiplier")) or 0
    scale = {"Wh": 1.0, "kWh": 1000.0}.get(str(unit))
    return None if scale is None else value * scale * 10.0 ** multiplier


def _first_energy(samples: Any) -> float | None:
    found = _energies(samples)
    return found[0] if found else None


def _last_energy(samples: Any) -> float | None:
    found = _energies(samples)
    return found[-1] if found else None


def _last_time(samples: Any) -> str | None:
    times = [utc(m.get("timestamp")) for m in samples if isinstance(m, Mapping)] if isinstance(samples, list) else []
    return next((t for t in reversed(times) if t is not None), None)


def _signed(text: str, key: str, samples: Any, signed: Any) -> tuple[str, ...]:
    """The exact text of each signed sampledValue under ``payload[key]`` (frame = ``[2, id, action, payload]``)."""
    found: list[str] = []
    for i, meter_value in enumerate(samples if isinstance(samples, list) else []):
        entries = meter_value.get("sampledValue") if isinstance(meter_value, Mapping) else None
        for j, sample in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(sample, Mapping) and signed(sample):
                span = value_span(text, [3, key, i, "sampledValue", j])
                if span is not None:
                    found.append(text[span[0]:span[1]])
    return tuple(found)


# --- small parsers ------------------------------------------------------------------------

def utc(value: Any) -> str | None:
    """An OCPP timestamp as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, sortable as text); None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)  # OCPP times are UTC; a missing offset means UTC
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value[:255] if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
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
