"""ocpp-proxy: an OCPP 1.6J gateway between wallboxes and billing backends."""

__version__ = "0.1.0"
