"""Which process serves a charger (sans-IO): the decision on a charger lease (docs/cluster.md).

Several proxy processes share one database; exactly one of them may serve a
charger at a time. The database keeps one lease per charger (holder, expiry)
and takes it atomically (:class:`proxy.storage.leases.LeaseStore`); what the
process then does is decided here, from the lease as the database left it,
without sockets or clocks: serve and renew in time, or refuse the wallbox so
that it reconnects (through HAProxy) once the old holder released the lease
or its lease ran out.

Times are *remaining seconds as the database counts them*, never two
machines' clocks compared: a process whose clock is off cannot take a lease
early.

The running proxy's keeper of these leases is :mod:`proxy.runtime.leases`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LeaseState:
    """A charger's lease after an acquire or renew: who holds it and for how many more seconds."""

    charger: str
    holder: str
    remaining: float


@dataclass(frozen=True, slots=True)
class Serve:
    """This process holds the lease: serve the charger, renew within ``renew_in`` seconds."""

    renew_in: float


@dataclass(frozen=True, slots=True)
class Refuse:
    """Another process holds the lease: refuse the wallbox (it retries after ``retry_after`` s)."""

    holder: str
    retry_after: float


@dataclass(frozen=True, slots=True)
class Close:
    """The lease is lost or about to run out unrenewed: end the session now (another may take over)."""

    reason: str


@dataclass(frozen=True)
class LeasePolicy:
    """``ttl``: a lease's life; renewals every third of it, so two may fail before it runs out."""

    me: str
    ttl: float = 15.0

    def __post_init__(self) -> None:
        if not self.me or self.ttl <= 0:
            raise ValueError("a lease policy needs a process name and a positive ttl")

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    def on_acquire(self, state: LeaseState) -> Serve | Refuse:
        """A wallbox connected and the store answered the acquire: serve it or refuse it."""
        if state.holder == self.me and state.remaining > 0:
            return Serve(self.renew_every)
        return Refuse(state.holder, max(state.remaining, 0.0))

    def on_renew(self, state: LeaseState) -> Serve | Close:
        """A renewal answered: still ours (serve on), or taken over (close: never serve twice)."""
        if state.holder == self.me and state.remaining > 0:
            return Serve(self.renew_every)
        return Close(f"the lease is held by {state.holder}")

    def on_renew_failed(self, remaining: float) -> Serve | Close:
        """A renewal could not reach the store; ``remaining``: seconds left of the last granted lease.

        The session may go on only while another renewal attempt can still land
        before the lease runs out; after that another process may take it.
        """
        if remaining > self.renew_every:
            return Serve(min(self.renew_every, remaining - self.renew_every))
        return Close("the lease could not be renewed before it runs out")
