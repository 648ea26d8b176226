"""Charging-profile control for one wallbox (sans-IO).

A :class:`Control` keeps what the proxy knows about one wallbox's charging
profiles and decides the proxy's next CALL so that the wallbox's effective
limit is min(backend's limit, local limit):

* ``max-profile`` (default): the proxy's own ChargePointMaxProfile (reserved
  id and stack level) carries min(local, the backend's ChargePointMaxProfile
  limit); the wallbox itself takes the minimum with the backend's Tx and
  TxDefault profiles.
* ``tx-default``: for wallboxes that reject or ignore ChargePointMaxProfile.
  The backend's TxDefault/Tx profiles are clamped to the local limit on their
  way to the wallbox (the only frames the proxy ever rewrites) and re-sent
  clamped when the local limit moves; when the backend has no TxDefault the
  proxy installs its own at a low stack level, which any backend TxDefault
  outranks or replaces.

It learns from frames the session observed: the backend's SetChargingProfile
and ClearChargingProfile with the wallbox's answers (the backend's intent),
BootNotification (profiles and transactions may be gone), transactions
(TxProfile lifetime, Relative schedules). It never sends an empty
ClearChargingProfile: the proxy clears its own profile by id only.

Times: ``now`` is the driver's monotonic clock (retries, waits); ``wall`` is
UTC wall-clock time, for evaluating the backend's schedules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.loadmgmt.profiles import (
    MAX_PROFILE,
    TX_DEFAULT,
    TX_PROFILE,
    Installed,
    Kept,
    Profile,
    ProfileError,
    Transaction,
    build_profile,
    clamp,
    clear_payload,
    composite_limit,
    parse_clear,
    peak_amps,
    to_amps,
    parse_profile,
    parse_set,
    replaces,
    replaces_on_connector,
    set_payload,
    validate,
    validate_own,
)

MAX_STRATEGY = "max-profile"
TX_STRATEGY = "tx-default"
STRATEGIES = (MAX_STRATEGY, TX_STRATEGY)

#: Seconds to wait for a BootNotification before treating the wallbox as booted.
BOOT_WAIT = 10.0
#: Longest wait (s, wall clock) for the wallbox's answer to a backend profile forwarded uncapped (see
#: :attr:`Control.uncapped`) before the proxy's own profile may replace its ChargePointMaxProfile anyway.
UNCAPPED_WAIT = 60.0
#: Longest wait between retries of a limit the wallbox refused or did not answer (the wait doubles
#: from ``retry`` per failure in a row).
RETRY_CAP = 300.0


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


#: The proxy does not know whether its profile is on the wallbox (after a
#: reconnect, a reboot, a lost answer, a backend Clear that may have hit it).
UNKNOWN = _Unknown()

#: What identifies the proxy's own profile as installed: purpose, stack level, unit, limit.
Signature = tuple[str, int, str, float]


@dataclass(frozen=True)
class ControlSettings:
    managed: bool = True
    strategy: str = MAX_STRATEGY
    profile_id: int = 990_001
    stack_level: int = 8
    tx_default_stack_level: int = 0
    unit: str = "A"
    phases: int = 3
    voltage: float = 230.0
    retry: float = 5.0
    #: The connectors that are load points of their own (empty: the wallbox is one load point).
    connectors: tuple[int, ...] = ()


@dataclass(frozen=True)
class Command:
    """A CALL the proxy sends to the wallbox, and what to remember when it is answered."""

    action: str
    payload: dict[str, Any]
    #: "limit" (the proxy's own profile), "clear" (the proxy's own), "restore" (a backend profile, re-sent)
    kind: str
    generation: int
    signature: Signature | None = None
    installed: Installed | None = None
    #: The highest current (A per phase) the wallbox may apply once it accepts this; None: not
    #: capped by it (a Clear of the proxy's profile).
    amps: float | None = None
    #: The connector the profile is on (0: the whole wallbox).
    connector: int = 0
    #: A restore of a backend profile whose answer was lost (:attr:`Control.maybe`): the backend's own version,
    #: which counts as the backend's once this is accepted.
    origin: Installed | None = None

    def describe(self) -> dict[str, Any]:
        where = {"connector": self.connector} if self.connector else {}
        if self.kind == "clear":
            return {"profile_id": self.payload.get("id"), **where}
        profile = self.payload["csChargingProfiles"]
        period = profile["chargingSchedule"]["chargingSchedulePeriod"]
        return {**where, "profile_id": profile["chargingProfileId"], "purpose": profile["chargingProfilePurpose"],
                "stack_level": profile["stackLevel"], "unit": profile["chargingSchedule"]["chargingRateUnit"],
                "limit": period[0]["limit"] if len(period) == 1 else [p["limit"] for p in period]}


@dataclass(frozen=True)
class Note:
    """Something the driver should log: ``event`` plus key/values."""

    event: str
    level: str
    fields: Mapping[str, Any]


@dataclass
class Control:
    charger_id: str
    settings: ControlSettings = field(default_factory=ControlSettings)

    def __post_init__(self) -> None:
        self.strategy = self.settings.strategy
        self.local: float | None = None
        #: The backend's profiles as the backend believes them installed (by id).
        self.backend: dict[int, Installed] = {}
        #: The versions of backend profiles on the wallbox (maybe clamped), where known.
        self.on_wallbox: dict[int, Installed] = {}
        self.own: Signature | None | _Unknown = UNKNOWN  # None: absent
        #: While ``own`` is UNKNOWN: whether it may be gone (a reboot, a backend Clear), rather than
        #: still what was last installed (a reconnect).
        self.own_may_be_gone = False
        #: Connector load points: the proxy's TxDefaultProfile on each connector, as ``own`` (and whether it
        #: may be gone), and the limit each connector should have.
        self.own_at: dict[int, Signature | None | _Unknown] = {}
        self.gone_at: dict[int, bool] = {}
        self.connector_local: dict[int, float | None] = {}
        #: Per load point (connector; 0: the wallbox), what the fuse knows it surely may draw when it connects
        #: (usually 0): before the proxy decided a limit, a backend Tx/TxDefault profile is clamped to it, so
        #: forwarding it never raises what the wallbox may draw; it is re-sent at the decided limit (restore).
        self.undecided: dict[int, float] = {}
        #: Refusals or lost answers in a row (the retry wait doubles with each).
        self.failures = 0
        self.rejected: set[Any] = set()
        self.inflight: Command | None = None
        self.generation = 0
        self.connected = False
        self.ready = False
        self.ready_at: float | None = None
        self.awaiting_boot = False
        self.retry_at: float | None = None
        self.transactions: dict[int, Transaction] = {}
        self.connectors: set[int] = set()
        self._starting: dict[str, int] = {}
        #: Backend Tx/TxDefault SetChargingProfile frames forwarded on this connection and not answered yet: msg id
        #: → (the backend's profile, the version forwarded, maybe clamped).
        self._forwarding: dict[str, tuple[Installed, Installed]] = {}
        #: Backend Tx/TxDefault profiles whose answer never came (the connection dropped first): the wallbox may have
        #: applied them (as forwarded) or not, and what they would replace may still be there. They count in
        #: :meth:`holding` until a profile that surely replaces them or a Clear that matches them is accepted, their
        #: transaction ends, or the proxy re-sends them clamped (:meth:`_restore_command`): once that is accepted they
        #: are the backend's, as if its answer had been Accepted (docs/load-management.md, "Lost answers").
        self.maybe: list[tuple[Installed, Installed]] = []
        #: Backend Tx/TxDefault profiles forwarded unchanged under max-profile and not answered yet: msg id →
        #: (highest limit A, when forwarded). The proxy's ChargePointMaxProfile caps them, so the fuse does not
        #: count them; once the strategy switches to tx-default that cap may go, so they are counted then
        #: (:meth:`Coordinator.answered`) and the proxy's own profile, which replaces its ChargePointMaxProfile by
        #: id, waits for their answer (the re-sent clamped version goes first).
        self.uncapped: dict[str, tuple[float, datetime]] = {}
        self.notes: list[Note] = []

    # -- configuration -------------------------------------------------------------------

    def configure(self, settings: ControlSettings) -> None:
        if settings.strategy != self.settings.strategy:
            self.strategy = settings.strategy
            self.rejected.clear()
        self.settings = settings
        for n in settings.connectors:
            self.own_at.setdefault(n, UNKNOWN)
            self.gone_at.setdefault(n, False)

    @property
    def per_connector(self) -> bool:
        """Each configured connector is a load point with the proxy's TxDefaultProfile on it."""
        return bool(self.settings.connectors)

    def connector_profile_id(self, connector: int) -> int:
        """``profile_id`` + connector: one profile per connector, never replacing another's."""
        return self.settings.profile_id + connector

    def connector_stack_level(self, connector: int) -> int:
        """``stack_level`` + the connector's place (0, 1, ...): above the backend's TxDefaultProfiles, and
        distinct per connector, so a wallbox that replaces by purpose and stack level alone (ignoring the
        connector) never drops another connector's profile."""
        return self.settings.stack_level + sorted(self.settings.connectors).index(connector)

    def set_connector_limits(self, limits: Mapping[int, float | None]) -> None:
        self.connector_local = dict(limits)

    @property
    def rewrites(self) -> bool:
        """Whether the backend's SetChargingProfile frames go through :meth:`rewrite`."""
        return self.connected and self.settings.managed and (self.strategy == TX_STRATEGY or self.per_connector)

    def set_local(self, amps: float | None) -> None:
        self.local = amps

    # -- the wallbox's life --------------------------------------------------------------------

    def wallbox_connected(self, now: float) -> None:
        """A new connection: the proxy's profile state is unknown until re-applied."""
        self._connection_over()  # a new connection may replace the old one without its close being seen
        self.generation += 1
        self.connected = True
        self.ready = False
        self.ready_at = now + BOOT_WAIT
        self.awaiting_boot = False
        self.retry_at = None
        self.own = UNKNOWN
        self.own_at = {n: UNKNOWN for n in self.settings.connectors}
        self.gone_at = {n: False for n in self.settings.connectors}
        self.on_wallbox.clear()

    def wallbox_disconnected(self) -> None:
        self._connection_over()
        self.generation += 1
        self.connected = False
        self.uncapped.clear()

    def _connection_over(self) -> None:
        """Answers on the connection that ends will never come: what was on its way may be on the wallbox."""
        self._abandon_inflight()
        self._forwarded_given_up()

    def _forwarded_given_up(self) -> None:
        """Backend profiles on their way whose answer will not come: maybe installed (:attr:`maybe`)."""
        for origin, sent in self._forwarding.values():
            self._maybe_add(origin, sent)
        self._forwarding.clear()

    def _abandon_inflight(self) -> None:
        """The proxy's CALL on its way will never be answered (its generation is over): a backend profile it re-sent
        in place of one whose answer was lost may be on the wallbox at that version now, too."""
        command, self.inflight = self.inflight, None
        if command is not None and command.origin is not None and command.installed is not None:
            self._maybe_add(command.origin, command.installed)

    def _maybe_add(self, origin: Installed, sent: Installed) -> None:
        if (origin, sent) not in self.maybe:
            self.maybe.append((origin, sent))

    def boot(self, now: float) -> None:
        """BootNotification: the wallbox (re)started; transactions and TxProfiles are gone.

        The proxy waits for the backend's answer (no CALLs to a wallbox the
        backend rejected or keeps pending), but at most BOOT_WAIT: a backend
        that does not answer must not switch load management off.
        """
        self.awaiting_boot = True
        self.ready = False
        self.ready_at = now + BOOT_WAIT
        self.own = UNKNOWN
        self.own_may_be_gone = True
        self.own_at = {n: UNKNOWN for n in self.settings.connectors}
        self.gone_at = {n: True for n in self.settings.connectors}
        self.on_wallbox.clear()
        self.transactions.clear()
        self.retry_at = None
        for pid in [pid for pid, item in self.backend.items() if item.profile.purpose == TX_PROFILE]:
            del self.backend[pid]
        self.maybe = [(o, f) for o, f in self.maybe if o.profile.purpose != TX_PROFILE]
        if self.inflight is not None:  # its answer no longer tells anything
            self.generation += 1
            self._abandon_inflight()

    def boot_answered(self, status: str | None) -> None:
        """The backend's answer to BootNotification (None: a CALLERROR or no status)."""
        self.awaiting_boot = False
        self.ready = status not in ("Rejected", "Pending")
        self.ready_at = None

    def wallbox_call(self) -> None:
        """Any other CALL from the wallbox: it is booted (a reconnect without Boot)."""
        if not self.awaiting_boot:
            self.ready = True

    def status(self, connector: int) -> None:
        if connector > 0:
            self.connectors.add(connector)

    def transaction_starting(self, msg_id: str, connector: int, wall: datetime) -> None:
        self._starting[msg_id] = connector
        self.transactions[connector] = Transaction(connector, None, wall)
        self.connectors.add(connector)

    def transaction_started(self, msg_id: str, transaction_id: int | None) -> None:
        connector = self._starting.pop(msg_id, None)
        current = self.transactions.get(connector) if connector is not None else None
        if current is not None:
            self.transactions[current.connector] = Transaction(current.connector, transaction_id, current.started)

    def transaction_stopped(self, transaction_id: int | None) -> int | None:
        """Returns the connector the transaction ran on (None: not known)."""
        connector = None
        for tx in list(self.transactions.values()):
            if transaction_id is None or tx.transaction_id in (None, transaction_id):
                connector = tx.connector
                del self.transactions[tx.connector]
                break
        def ended(item: Installed) -> bool:
            return item.profile.purpose == TX_PROFILE and (
                item.connector == connector or item.profile.transaction_id == transaction_id)

        for store in (self.backend, self.on_wallbox):
            for pid in [pid for pid, item in store.items() if ended(item)]:
                del store[pid]
        self.maybe = [(o, f) for o, f in self.maybe if not ended(o)]
        return connector

    # -- the backend's profiles ----------------------------------------------------------------------

    def rewrite(self, msg_id: str, payload: Any, wall: datetime) -> dict[str, Any] | None:
        """Under tx-default: the backend's Tx/TxDefault SetChargingProfile clamped (None: unchanged).

        Every Tx/TxDefault one is remembered as forwarded until its answer (:attr:`maybe` if none comes)."""
        try:
            connector, profile = parse_set(payload)
        except ProfileError:
            if self.rewrites:
                raise
            return None  # forwarded as it is: the wallbox will refuse it
        clamped = None
        if self.rewrites and (self.local is not None or self.undecided) and profile.purpose in (TX_DEFAULT, TX_PROFILE):
            clamped = self._clamped(profile, connector)
        self._forwarded(msg_id, connector, profile, None if clamped == profile.raw else clamped, wall)
        if clamped is None or clamped == profile.raw:
            return None
        out = dict(payload)
        out["csChargingProfiles"] = clamped
        return out

    def _forwarded(self, msg_id: str, connector: int, profile: Profile, clamped: dict[str, Any] | None,
                   wall: datetime) -> None:
        if profile.purpose in (TX_DEFAULT, TX_PROFILE):
            sent = profile if clamped is None else parse_profile(clamped)
            self._forwarding[msg_id] = (Installed(connector, profile, wall), Installed(connector, sent, wall))

    def backend_set_answered(self, msg_id: str, payload: Any, status: str | None, wall: datetime) -> None:
        """The wallbox answered a backend SetChargingProfile (``status`` None: a CALLERROR)."""
        forwarded = self._forwarding.pop(msg_id, None)
        self.uncapped.pop(msg_id, None)
        self._forwarded_given_up()  # one CALL at a time: an earlier one still on its way was given up (call_timeout)
        if status != "Accepted":
            return
        connector, profile = parse_set(payload)
        item = Installed(connector, profile, wall)
        self._backend_installed(item, forwarded[1] if forwarded is not None else item)
        if profile.id == self.settings.profile_id:
            self._note("backend_uses_proxy_profile_id", "warning", profile_id=profile.id)
        if (profile.purpose == MAX_PROFILE and self.strategy == MAX_STRATEGY and self.settings.managed
                and profile.stack_level > self.settings.stack_level):
            self._switch("backend ChargePointMaxProfile outranks the proxy's",
                         backend_stack_level=profile.stack_level)

    def _backend_installed(self, item: Installed, sent: Installed) -> None:
        """A backend profile is on the wallbox (``sent``: its version there): the backend's from now on."""
        for pid in [pid for pid, old in self.backend.items() if replaces_on_connector(item, old)]:
            del self.backend[pid]
        self.backend[item.profile.id] = item
        self._installed(sent, own=False)

    def backend_clear_answered(self, payload: Any, status: str | None) -> None:
        self._forwarded_given_up()  # as in backend_set_answered
        if status != "Accepted":
            return
        request = parse_clear(payload)
        for store in (self.backend, self.on_wallbox):
            for pid in [pid for pid, item in store.items() if request.matches(item)]:
                del store[pid]
        self.maybe = [(o, f) for o, f in self.maybe if not request.matches(f)]
        own = self._own_installed()
        if own is not None and request.may_match(own) and self.own is not None:
            self.own = UNKNOWN  # re-install once this Clear is answered: now
            self.own_may_be_gone = True
        for n, mine in self._own_connector_profiles():
            if request.may_match(mine):
                self.own_at[n], self.gone_at[n] = UNKNOWN, True

    def _own_connector_profiles(self) -> list[tuple[int, Installed]]:
        """The proxy's connector profiles that may be installed, as model entries (for Clear matching)."""
        return [(n, Installed(n, Profile(self.connector_profile_id(n), self.connector_stack_level(n), TX_DEFAULT,
                                         "Absolute", "A", ()), datetime.min))
                for n in self.settings.connectors if self.own_at.get(n) is not None]

    def backend_limit_at(self, connector: int, wall: datetime) -> float | None:
        """The backend's composite limit on one connector: its TxProfile, else TxDefaultProfile (its own or
        connector 0's), under the ChargePointMaxProfile."""
        items = [i for i in self.backend.values() if i.connector in (0, connector)]
        if not items:
            return None
        return composite_limit(items, wall, charger_phases=self.settings.phases, voltage=self.settings.voltage,
                               transactions=[t for t in self.transactions.values() if t.connector == connector],
                               connectors=[connector])

    def can_win(self, item: Installed, connector: int) -> bool:
        """Whether a backend profile may decide the connector's Tx/TxDefault limit over the proxy's profile
        there: a TxProfile always (it beats every TxDefaultProfile), a TxDefaultProfile at or above the proxy's
        stack level, and any TxDefaultProfile while the proxy's profile is not known to be on the connector
        (after a (re)connect, a reboot, a lost answer or a backend Clear nothing of the proxy's outranks it:
        a backend default below the proxy's stack level decides the connector then, docs/load-management.md)."""
        if item.connector not in (0, connector) or connector not in self.settings.connectors:
            return False
        if item.profile.purpose == TX_PROFILE:
            return True
        if item.profile.purpose != TX_DEFAULT:
            return False
        return not isinstance(self.own_at.get(connector), tuple) \
            or item.profile.stack_level >= self.connector_stack_level(connector)

    def clamp_connectors(self, connector: int, profile: Profile) -> list[int]:
        """The connector load points a backend Tx/TxDefault profile on ``connector`` may limit (it is clamped
        to the lowest of their limits)."""
        item = Installed(connector, profile, datetime.min)
        return [n for n in self.settings.connectors if self.can_win(item, n)]

    def backend_limit(self, wall: datetime) -> float | None:
        """The backend's composite limit (A per phase), None when it sets none."""
        if not self.backend:
            return None
        return composite_limit(self.backend.values(), wall, charger_phases=self.settings.phases,
                               voltage=self.settings.voltage, transactions=self.transactions.values(),
                               connectors=self.connectors)

    # -- deciding the next CALL -----------------------------------------------------------------------

    def next_event(self) -> float | None:
        times = [t for t in (self.retry_at, None if self.ready else self.ready_at) if t is not None]
        return min(times, default=None)

    def _decide(self, now: float, wall: datetime) -> Command | None:
        if not self.connected or self.inflight is not None:
            return None
        if not self.ready and (self.ready_at is None or now < self.ready_at):
            return None
        if self.retry_at is not None and now < self.retry_at:
            return None
        if self.retry_at is not None:
            self.rejected.clear()  # refused ones get another try after the backoff
        return self._restore_command(wall) or self._own_command(wall)

    def peek(self, now: float, wall: datetime) -> Command | None:
        """What :meth:`next_command` would send, without committing to it."""
        return self._decide(now, wall)

    def next_command(self, now: float, wall: datetime) -> Command | None:
        """The proxy's next CALL to this wallbox, or None (nothing to change, or not now)."""
        command = self._decide(now, wall)
        return None if command is None else self.take(command)

    def take(self, command: Command) -> Command | None:
        """Commit to ``command`` (what :meth:`peek` gave, for the same moment): checked, then in flight.

        None: it is invalid (noted and not tried again)."""
        self.ready = True
        self.retry_at = None
        try:
            if command.kind == "restore":
                validate(command.action, command.payload)  # the backend's profile, clamped: check it all
            else:
                validate_own(command.action, command.payload)
        except ProfileError as exc:
            self._note("profile_invalid", "error", reason=str(exc))
            self.rejected.add(command.signature if command.kind != "restore" else _restore_key(command))
            return None
        self.inflight = command
        return command

    def _clamped(self, profile: Profile, connector: int = 0) -> dict[str, Any]:
        amps = self._clamp_amps(profile, connector)
        if amps is None:
            return dict(profile.raw)
        return clamp(profile.raw, amps, charger_phases=self.settings.phases, voltage=self.settings.voltage)

    def _clamp_amps(self, profile: Profile, connector: int) -> float | None:
        """What a backend Tx/TxDefault profile is clamped to (None: left as it is): the local limit, or with
        connector load points the lowest limit of the connectors it may decide (none: it is outranked)."""
        if not self.per_connector:
            return self.local if self.local is not None else self.undecided.get(0)
        limits = [self._decided(n) for n in self.clamp_connectors(connector, profile)]
        if not limits or any(v is None for v in limits):
            return None
        return min(v for v in limits if v is not None)

    def _decided(self, connector: int) -> float | None:
        local = self.connector_local.get(connector)
        return local if local is not None else self.undecided.get(connector)

    def _restore_command(self, wall: datetime) -> Command | None:
        """Backend Tx/TxDefault profiles whose version on the wallbox is not the one it should have."""
        clamping = self.rewrites and self.local is not None
        for pid, item in sorted(self.backend.items()):
            if item.profile.purpose not in (TX_DEFAULT, TX_PROFILE):
                continue
            have = self.on_wallbox.get(pid)
            if have is None and not clamping:
                continue  # unknown, and not the proxy's business to re-install
            want = self._clamped(item.profile, item.connector) if clamping else dict(item.profile.raw)
            if have is not None and dict(have.profile.raw) == want:
                continue
            if (pid, repr(want)) in self.rejected:
                continue
            return self._restore(item, want, wall)
        if not clamping:
            return None
        for origin, forwarded in self.maybe:  # re-sent clamped: then the backend's, as if it had been Accepted
            want = self._clamped(origin.profile, origin.connector)
            if dict(forwarded.profile.raw) != want and (origin.profile.id, repr(want)) not in self.rejected:
                return self._restore(origin, want, wall, maybe=True)
        return None

    def _restore(self, item: Installed, want: dict[str, Any], wall: datetime, maybe: bool = False) -> Command:
        installed = Installed(item.connector, parse_profile(want), wall)
        return Command("SetChargingProfile", set_payload(item.connector, want), "restore", self.generation,
                       installed=installed, amps=self._peak(installed.profile), origin=item if maybe else None)

    def _desired_own(self, wall: datetime) -> tuple[Signature, dict[str, Any]] | None | _Unknown:
        """(signature, profile) the proxy's own profile should be; None: absent; UNKNOWN: wait."""
        s = self.settings
        if not s.managed:
            return None
        if self.local is None:
            return UNKNOWN
        if self.strategy == MAX_STRATEGY:
            amps = self.local
            backend_max = self._backend_max(wall)
            if backend_max is not None:
                amps = min(amps, backend_max)
            purpose, level = MAX_PROFILE, s.stack_level
        else:
            if self.per_connector or any(item.profile.purpose == TX_DEFAULT for item in self.backend.values()):
                return None  # (connector load points: their own profiles carry the limits)
            amps, purpose, level = self.local, TX_DEFAULT, s.tx_default_stack_level
        profile = build_profile(s.profile_id, level, purpose, amps, unit=s.unit, phases=s.phases,
                                voltage=s.voltage, now=wall)
        limit = float(profile["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"])
        return (purpose, level, s.unit, limit), profile

    def _backend_max(self, wall: datetime) -> float | None:
        items = [i for i in self.backend.values() if i.profile.purpose == MAX_PROFILE]
        if not items:
            return None
        return composite_limit(items, wall, charger_phases=self.settings.phases, voltage=self.settings.voltage)

    def _own_command(self, wall: datetime) -> Command | None:
        commands = [c for c in (self._connector_command(n, wall) for n in self.settings.connectors) if c is not None]
        commands.sort(key=lambda c: (c.amps is None, c.amps or 0.0))  # the lowest first: decreases before increases
        whole = self._whole_command(wall)
        decreases = [c for c in commands if c.kind == "limit" and c.amps is not None
                     and self._own_amps(c.connector) is not None and c.amps < (self._own_amps(c.connector) or 0.0)]
        ordered = decreases + ([whole] if whole is not None else []) + [c for c in commands if c not in decreases]
        return ordered[0] if ordered else None

    def _awaiting_uncapped(self, wall: datetime) -> bool:
        """Under tx-default, a backend profile forwarded uncapped may still go in (its answer is on its way): the
        proxy's ChargePointMaxProfile, which may be in force even when the wallbox refused it, is what caps it,
        and the proxy's own TxDefaultProfile or Clear would replace it by id. Bounded by UNCAPPED_WAIT."""
        if self.strategy != TX_STRATEGY:
            return False
        return any((wall - at).total_seconds() < UNCAPPED_WAIT for _, at in self.uncapped.values())

    def _own_amps(self, connector: int) -> float | None:
        own = self.own_at.get(connector)
        return self._signature_amps(own) if isinstance(own, tuple) else None

    def _connector_command(self, connector: int, wall: datetime) -> Command | None:
        """The proxy's TxDefaultProfile on one connector: min(its load point's limit, the backend's limit there)."""
        own, pid = self.own_at.get(connector, UNKNOWN), self.connector_profile_id(connector)
        if not self.settings.managed:
            if own is None:
                return None
            return Command("ClearChargingProfile", clear_payload(pid), "clear", self.generation, connector=connector)
        local = self.connector_local.get(connector)
        if local is None:
            return None
        backend = self.backend_limit_at(connector, wall)
        amps = local if backend is None else min(local, backend)
        level = self.connector_stack_level(connector)
        profile = build_profile(pid, level, TX_DEFAULT, amps, unit="A", phases=self.settings.phases,
                                voltage=self.settings.voltage, now=wall)
        signature: Signature = (TX_DEFAULT, level, "A", float(profile["chargingSchedule"]["chargingSchedulePeriod"]
                                                              [0]["limit"]))
        if own == signature or signature in self.rejected:
            return None
        return Command("SetChargingProfile", set_payload(connector, profile), "limit", self.generation,
                       signature=signature, installed=Installed(connector, parse_profile(profile), wall),
                       amps=signature[3], connector=connector)

    def _whole_command(self, wall: datetime) -> Command | None:
        desired = self._desired_own(wall)
        if isinstance(desired, _Unknown) or self._awaiting_uncapped(wall):
            return None
        if desired is None:
            if self.own is None:
                return None
            return Command("ClearChargingProfile", clear_payload(self.settings.profile_id), "clear", self.generation)
        signature, profile = desired
        if self.own == signature or signature in self.rejected:
            return None
        installed = Installed(0, parse_profile(profile), wall)
        return Command("SetChargingProfile", set_payload(0, profile), "limit", self.generation,
                       signature=signature, installed=installed, amps=self._signature_amps(signature))

    # -- answers to the proxy's CALLs -------------------------------------------------------------------

    def answered(self, command: Command, status: str | None, error: str | None, now: float) -> None:
        """The wallbox answered ``command``: ``status`` from a CALLRESULT, or ``error`` (CALLERROR code)."""
        if command.generation != self.generation:
            return
        self.inflight = None
        if command.kind == "clear":
            if status in ("Accepted", "Unknown"):
                self._set_own(command.connector, None)
                self.failures = 0
            else:
                self._retry(now, command, status or error)
            return
        if status == "Accepted":
            assert command.installed is not None
            self.failures = 0
            if command.origin is not None:
                self._backend_installed(command.origin, command.installed)
            else:
                self._installed(command.installed, own=command.kind == "limit")
            if command.kind == "limit":
                self._set_own(command.connector, command.signature)
            return
        refused = status in ("Rejected", "NotSupported") or error in ("NotSupported", "NotImplemented")
        if not refused:
            self._retry(now, command, status or error)
            return
        if command.kind == "limit" and command.signature and command.signature[0] == MAX_PROFILE \
                and self.strategy == MAX_STRATEGY:
            self._switch(f"wallbox answered {status or error} to ChargePointMaxProfile")
            return
        self.rejected.add(command.signature if command.kind == "limit" else _restore_key(command))
        self.retry_at = now + self._backoff()
        self._note("profile_rejected", "error", answer=status or error, retry_in=self.retry_at - now,
                   **command.describe())

    def failed(self, command: Command, reason: str, now: float) -> None:
        """No answer (timeout, connection gone): state unknown, try again later."""
        if command.generation != self.generation:
            return
        self.inflight = None
        self._retry(now, command, reason)

    # -- helpers ------------------------------------------------------------------------------------------

    def _set_own(self, connector: int, value: Signature | None | _Unknown) -> None:
        """What the proxy now knows of its profile on ``connector`` (0: its whole-wallbox profile)."""
        if connector:
            self.own_at[connector], self.gone_at[connector] = value, False
        elif isinstance(value, _Unknown):
            self.own = UNKNOWN
        else:
            self.own, self.own_may_be_gone = value, False

    def _retry(self, now: float, command: Command, reason: str | None) -> None:
        if command.kind in ("limit", "clear"):
            self._set_own(command.connector, UNKNOWN)
        else:
            assert command.installed is not None
            self.on_wallbox.pop(command.installed.profile.id, None)
            if command.origin is not None:  # it may be on the wallbox at this version now, too
                self._maybe_add(command.origin, command.installed)
        delay = self._backoff()
        self.retry_at = now + delay
        self._note("profile_retry", "warning", reason=reason, seconds=delay, **command.describe())

    def _backoff(self) -> float:
        """``retry`` doubled per failure in a row, at most RETRY_CAP."""
        self.failures += 1
        return float(min(RETRY_CAP, self.settings.retry * 2.0 ** min(self.failures - 1, 16)))

    # -- what the wallbox may apply (for the fuse) -----------------------------------------------------

    def holding(self) -> float | None | _Unknown:
        """The highest current (A per phase) the wallbox may apply by what the proxy knows is on it.

        None: nothing known caps it (its max_current counts). UNKNOWN: the proxy's profile may or
        may not be what it was (a reconnect, a lost answer): the earlier value still counts.
        Under tx-default every Tx/TxDefault profile counts at its highest period, a backend
        profile at its version on the wallbox where known (clamped), else at the backend's own.
        """
        if isinstance(self.own, _Unknown):
            return None if self.own_may_be_gone else UNKNOWN
        own = None if self.own is None else self._signature_amps(self.own)
        if self.strategy == MAX_STRATEGY:
            return own
        values = [] if own is None else [own]
        for pid, item in self.backend.items():
            if item.profile.purpose in (TX_DEFAULT, TX_PROFILE):
                values.append(self._peak(self.on_wallbox.get(pid, item).profile))
        values += [self._peak(sent.profile) for sent in self._unconfirmed()]
        return max(values, default=None)

    def kept(self) -> list[Kept]:
        """Backend Tx/TxDefault profiles that may be on the wallbox, as (the backend's, the version that may be there):
        the accepted ones (at their version on the wallbox where known, else the backend's own, as :meth:`holding`
        counts them), those whose answer was lost (:attr:`maybe`) or is on its way, and a clamped re-send on its way.
        The driver keeps this in the durable record, so a proxy restart does not forget them (:meth:`restore_kept`)."""
        pairs = [(item, self.on_wallbox.get(pid, item)) for pid, item in sorted(self.backend.items())
                 if item.profile.purpose in (TX_DEFAULT, TX_PROFILE)]
        pairs += self.maybe + list(self._forwarding.values())
        command = self.inflight
        if command is not None and command.kind == "restore" and command.installed is not None:
            origin = command.origin or self.backend.get(command.installed.profile.id)
            if origin is not None:
                pairs.append((origin, command.installed))
        unique: list[Kept] = []
        for pair in pairs:
            if pair not in unique:
                unique.append(pair)
        return unique

    def restore_kept(self, pairs: list[Kept]) -> None:
        """The durable record's :meth:`kept` from before a proxy restart: the proxy has not seen their answers
        (nor, for the accepted ones, what happened on the wallbox since), so they are maybe installed, counted and
        re-sent clamped until settled exactly as lost answers are (docs/load-management.md, "The backend's profiles
        over a restart")."""
        for origin, sent in pairs:
            self._maybe_add(origin, sent)

    def _unconfirmed(self) -> list[Installed]:
        """Backend Tx/TxDefault profiles the wallbox may have applied without the proxy knowing (as forwarded): those
        whose answer was lost (:attr:`maybe`) and those still on their way."""
        return [sent for _, sent in self.maybe] + [sent for _, sent in self._forwarding.values()]

    def holding_at(self, connector: int) -> float | None | _Unknown:
        """:meth:`holding` of one connector load point: the proxy's TxDefaultProfile there, or higher where a
        backend TxProfile or a TxDefaultProfile at or above its stack level may decide instead (at its version
        on the wallbox, clamped, where known). The ChargePointMaxProfile only lowers that: not counted."""
        own = self.own_at.get(connector, UNKNOWN)
        if isinstance(own, _Unknown):
            return None if self.gone_at.get(connector, True) else UNKNOWN
        if own is None:
            return None
        values = [self._signature_amps(own)]
        for pid, item in self.backend.items():
            if self.can_win(item, connector):
                values.append(self._peak(self.on_wallbox.get(pid, item).profile))
        values += [self._peak(sent.profile) for sent in self._unconfirmed() if self.can_win(sent, connector)]
        return max(values)

    def _peak(self, profile: Profile) -> float:
        return peak_amps(profile, self.settings.phases, self.settings.voltage)

    def _signature_amps(self, signature: Signature) -> float:
        return to_amps(signature[3], signature[2], self.settings.phases, self.settings.voltage)

    def _own_installed(self) -> Installed | None:
        """The proxy's profile as a model entry (for Clear matching), where it may be installed."""
        if self.own is None:
            return None
        if isinstance(self.own, tuple):
            purpose, level = self.own[0], self.own[1]
        elif self.strategy == MAX_STRATEGY:
            purpose, level = MAX_PROFILE, self.settings.stack_level
        else:
            purpose, level = TX_DEFAULT, self.settings.tx_default_stack_level
        profile = Profile(self.settings.profile_id, level, purpose, "Absolute", self.settings.unit, ())
        return Installed(0, profile, datetime.min)

    def _installed(self, item: Installed, *, own: bool) -> None:
        """A profile went onto the wallbox: what it surely replaced is gone; the proxy's own, if it may have been
        replaced, is re-installed."""
        for pid in [pid for pid, old in self.on_wallbox.items() if replaces_on_connector(item, old)]:
            del self.on_wallbox[pid]
        self.maybe = [(o, f) for o, f in self.maybe if not replaces_on_connector(item, f)]
        if not own:
            self.on_wallbox[item.profile.id] = item
            mine = self._own_installed()
            if mine is not None and replaces(item, mine):
                self.own = None
            for n, theirs in self._own_connector_profiles():
                if replaces(item, theirs):
                    self.own_at[n] = None

    def _switch(self, reason: str, **fields: Any) -> None:
        self.strategy = TX_STRATEGY
        self.own = UNKNOWN
        self._note("strategy_switched", "warning", strategy=TX_STRATEGY, reason=reason, **fields)

    def _note(self, event: str, level: str, **fields: Any) -> None:
        self.notes.append(Note(event, level, fields))

    def drain_notes(self) -> list[Note]:
        notes, self.notes = self.notes, []
        return notes


def _restore_key(command: Command) -> tuple[int | None, str]:
    profile = command.payload.get("csChargingProfiles")
    return (command.installed.profile.id if command.installed else None, repr(profile))


# --- reading the frames the limit engine needs ----------------------------------------------------

@dataclass(frozen=True)
class Meter:
    """Measurements from one MeterValues.req."""

    currents: tuple[float, float, float] | None
    power_w: float | None
    energy_wh: float | None


_PHASE_INDEX = {"L1": 0, "L2": 1, "L3": 2, "L1-N": 0, "L2-N": 1, "L3-N": 2}
_SCALE = {"W": 1.0, "kW": 1000.0, "Wh": 1.0, "kWh": 1000.0, "A": 1.0}


def read_meter_values(payload: Any, charger_phases: int = 3) -> Meter:
    """Current.Import per phase, Power.Active.Import and the energy register of the latest sample.

    Signed values (``format = SignedData``) and unparsable values are skipped.
    A current without a phase is taken as the current on each of the
    charger's phases.
    """
    values = payload.get("meterValue") if isinstance(payload, dict) else None
    if not isinstance(values, list) or not values:
        return Meter(None, None, None)
    currents: list[float | None] = [None, None, None]
    power = energy = None
    for sample in values:
        sampled = sample.get("sampledValue") if isinstance(sample, dict) else None
        for item in sampled if isinstance(sampled, list) else []:
            if not isinstance(item, dict) or item.get("format") == "SignedData":
                continue
            try:
                value = float(item.get("value", ""))
            except (TypeError, ValueError):
                continue
            measurand = item.get("measurand", "Energy.Active.Import.Register")
            scale = _SCALE.get(str(item.get("unit", "")), 1.0)
            if measurand == "Current.Import":
                phase = item.get("phase")
                if phase in _PHASE_INDEX:
                    currents[_PHASE_INDEX[phase]] = value
                elif phase is None:
                    for i in range(max(1, min(charger_phases, 3))):
                        currents[i] = value
            elif measurand == "Power.Active.Import" and item.get("phase") is None:
                power = value * scale
            elif measurand == "Energy.Active.Import.Register" and item.get("phase") is None:
                energy = value * scale
    measured = None
    if any(c is not None for c in currents):
        measured = (currents[0] or 0.0, currents[1] or 0.0, currents[2] or 0.0)
    return Meter(measured, power, energy)


def field_of(payload: Any, key: str) -> Any:
    return payload.get(key) if isinstance(payload, dict) else None
