"""OCPP-J message handling without re-encoding: frame classification and in-place JSON edits (sans-IO)."""
