"""The session core (sans-IO): routing and CALL arbitration, admission, offline answers, secondaries' mirrors and policies."""
