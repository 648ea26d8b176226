"""Which OCPP version a session speaks, from its negotiated WebSocket subprotocol.

The relay forwards text whatever the version; everything the proxy *originates
or answers* (local answers while the backend is down, charging profiles, policy
answers) must be shaped for the version the wallbox negotiated, or the wallbox
rejects it (a 1.6 ``connectorId`` is a FormatViolation in 2.0.1). One value
decides that per session, so the shapes of two versions can never mix.

Subprotocol names follow the IANA WebSocket subprotocol registry. The proxy
answers and injects for :data:`SUPPORTED`; the older or withdrawn names in
:data:`RELAY_ONLY` are relayed byte for byte with nothing injected or answered
locally (docs/offline.md, "OCPP versions").
"""

from __future__ import annotations

from enum import Enum


class OcppVersion(str, Enum):
    """An OCPP version the proxy speaks itself; the value is the ``ocpp`` library's version name."""

    V16 = "1.6"
    V201 = "2.0.1"
    V21 = "2.1"

    @property
    def is_v2(self) -> bool:
        """2.0.1 and 2.1 share the device model, TransactionEvent and idToken shapes."""
        return self is not OcppVersion.V16


#: Subprotocol → the version the proxy answers and injects in.
SUPPORTED: dict[str, OcppVersion] = {
    "ocpp1.6": OcppVersion.V16,
    "ocpp2.0.1": OcppVersion.V201,
    "ocpp2.1": OcppVersion.V21,
}

#: Registered OCPP subprotocols the proxy relays without answering or injecting anything.
RELAY_ONLY: tuple[str, ...] = ("ocpp1.2", "ocpp1.5", "ocpp2.0")

#: Every name ``[server] subprotocols`` accepts.
KNOWN: tuple[str, ...] = (*SUPPORTED, *RELAY_ONLY)

#: Offered by default: the versions the proxy speaks itself.
DEFAULT_SUBPROTOCOLS: tuple[str, ...] = tuple(SUPPORTED)


def version_of(subprotocol: str | None) -> OcppVersion | None:
    """The version the proxy speaks in a session; None: relay only (unknown or relay-only name)."""
    return SUPPORTED.get(subprotocol or "")


def format_violation(version: OcppVersion | None) -> str:
    """The CALLERROR code for a malformed payload: 1.6 spells it FormationViolation, 2.0.1 and 2.1 FormatViolation."""
    return "FormatViolation" if version is not None and version.is_v2 else "FormationViolation"
