"""The status page's limit attribution (proxy/ops/status.py) against the real limit engine, as a
hypothesis state machine: whatever the inputs (backend profiles, EMS, meter, site limit, cars coming
and going, time passing), the page names a setter that is consistent with the numbers it shows."""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from proxy.config import ChargerSettings
from proxy.loadmgmt.engine import ChargerLimits, LimitEngine, SiteLimits
from proxy.ops.status import (BACKEND, CHARGER_MAX, CONFIG, EMS, FALLBACK, METER_HEADROOM, SITE_FUSE,
                              limit_entry)

CHARGERS = {"CP1": ChargerSettings(id="CP1", max_current=16.0), "CP2": ChargerSettings(id="CP2", max_current=32.0)}
SITE_LIMIT = 40.0
METER_TIMEOUT = 10.0
amps = st.one_of(st.none(), st.floats(min_value=0, max_value=40, allow_nan=False).map(lambda a: round(a, 1)))
charger_ids = st.sampled_from(sorted(CHARGERS))


class StatusLimits(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.engine = LimitEngine(
            SiteLimits(max_current=SITE_LIMIT, meter=True, meter_timeout=METER_TIMEOUT, ramp_up_interval=0,
                       hysteresis=0, min_hold_time=0),
            {cid: ChargerLimits(max_current=c.max_current, min_current=6) for cid, c in CHARGERS.items()})
        self.connected: set[str] = set()

    def _tick(self) -> None:
        self.engine.targets(self.now)  # what the driver does after every input

    @rule(cid=charger_ids)
    def connect(self, cid: str) -> None:
        self.engine.charger_connected(cid, self.now)
        self.connected.add(cid)
        self._tick()

    @rule(cid=charger_ids)
    def disconnect(self, cid: str) -> None:
        self.engine.charger_disconnected(cid, self.now)
        self.connected.discard(cid)
        self._tick()

    @rule(cid=charger_ids, charging=st.booleans())
    def car(self, cid: str, charging: bool) -> None:
        self.engine.status(cid, 1, "Charging" if charging else "Available", self.now)
        (self.engine.transaction_started if charging else self.engine.transaction_stopped)(cid, 1, self.now)
        self._tick()

    @rule(cid=charger_ids, value=amps)
    def backend(self, cid: str, value: float | None) -> None:
        self.engine.backend_limit(cid, value, self.now)
        self._tick()

    @rule(cid=charger_ids, value=amps, enabled=st.booleans())
    def ems_charger(self, cid: str, value: float | None, enabled: bool) -> None:
        self.engine.ems_charger_limit(cid, value, self.now)
        self.engine.ems_charger_enabled(cid, enabled, self.now)
        self._tick()

    @rule(value=amps)
    def ems_site(self, value: float | None) -> None:
        self.engine.ems_site_limit(value, self.now)
        self._tick()

    @rule(house=st.floats(min_value=0, max_value=60, allow_nan=False))
    def meter(self, house: float) -> None:
        self.engine.meter_reading((house, house, house), self.now)
        self._tick()

    @rule(seconds=st.sampled_from([1.0, METER_TIMEOUT + 1]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self._tick()

    @invariant()
    def setter_matches_the_numbers(self) -> None:
        site = self.engine.site_view(self.now)
        for cid in self.connected:
            view = self.engine.charger_view(cid)
            assert view is not None
            entry = limit_entry(view, site, CHARGERS[cid], None, meter=True)
            json.dumps(entry, allow_nan=False)  # valid JSON whatever the inputs
            shown = [v for v in (entry["local_a"], entry["backend_a"]) if v is not None]
            assert entry["amps"] == (min(shown) if shown else None)
            source, local, backend = entry["set_by"], entry["local_a"], entry["backend_a"]
            assert (source is None) == (entry["amps"] is None)
            if source == BACKEND:
                assert backend is not None and (local is None or backend <= local + 0.05)
            elif source is not None:  # the proxy's own limit is the tighter one
                assert local is not None and (backend is None or local < backend)
            if source == FALLBACK:
                assert site.fallback and not site.meter_fresh
            if source == METER_HEADROOM:
                assert site.meter_fresh and not view.fallback
            if source == CHARGER_MAX:
                assert local >= CHARGERS[cid].max_current - 0.05
            if source == EMS:
                lowered_site = site.ems_limit is not None and site.ems_limit < SITE_LIMIT
                assert view.ems_limit is not None or not view.enabled or lowered_site
            if source in (SITE_FUSE, METER_HEADROOM):
                assert local < CHARGERS[cid].max_current - 0.05
                assert view.ems_limit is None or local < math.floor(view.ems_limit * 10) / 10 - 0.05
            assert source != CONFIG  # both chargers are enabled in the configuration


TestStatusLimits = StatusLimits.TestCase
