"""Operations: metrics, the monitor HTTP server, health, logging, certificates."""
