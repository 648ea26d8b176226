"""The wallbox and backend wire: RFC 6455 codec, WebSocket connections, TLS (trio at the edge, codec sans-IO)."""
