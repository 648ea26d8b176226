"""Placeholder until the demo lands (same commit series)."""


def run_demo(wallboxes: int = 3, forever: bool = False) -> int:
    raise SystemExit("demo not built yet")
