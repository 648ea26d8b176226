"""What the charger leases cost the database (docs/cluster.md): ``python -m bench.leases [--chargers N]``.

Against a real PostgreSQL server from the ``pgserver`` wheel (tests/pgkit.py), one client as one
proxy process uses it: N acquires one after another (one per handshake), a second process's
acquires of the same chargers refused, one renewal round of all N in one statement (one per
third of the lease's life), N releases; then N wallboxes arriving at once through the running
proxy's :class:`LeaseKeeper` (its acquires group-committed) against the same N one by one. Prints the machine, the load average and the medians of
``--repeats`` runs; wall-clock, so compare side by side in one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import trio

from bench.sysinfo import machine
from proxy.core.lease import LeasePolicy
from proxy.ops.logs import get_logger
from proxy.runtime.leases import LeaseKeeper
from proxy.storage.postgres import PostgresStorage
from tests.pgkit import PgCluster


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def release_all(store: PostgresStorage, chargers: list[str]) -> None:
    for cp in chargers:
        store.release(cp, "proxy-a")


def one_run(url: str, chargers: list[str]) -> dict[str, float]:
    a, b = PostgresStorage(url), PostgresStorage(url)
    try:
        acquire = timed(lambda: [a.acquire(cp, "proxy-a", 15) for cp in chargers])
        refused = timed(lambda: [b.acquire(cp, "proxy-b", 15) for cp in chargers])
        renew = timed(lambda: a.renew(chargers, "proxy-a", 15))
        release = timed(lambda: release_all(a, chargers))
    finally:
        a.close()
        b.close()
    n = len(chargers)
    return {"acquire_us": acquire / n * 1e6, "refused_us": refused / n * 1e6, "renew_round_ms": renew * 1e3,
            "release_us": release / n * 1e6, "keeper_together_us": trio.run(keeper_takes, url, chargers) / n * 1e6}


async def keeper_takes(url: str, chargers: list[str]) -> float:
    """Seconds until all of ``chargers`` hold their lease, taken at once through one LeaseKeeper."""
    store = PostgresStorage(url)
    keeper = LeaseKeeper(store, LeasePolicy("proxy-c", 15), log=get_logger())
    held = trio.Event()
    count = 0

    async def one(key: str) -> None:
        nonlocal count
        async with keeper.hold(key) as refused:
            assert refused is None
            count += 1
            if count == len(chargers):
                held.set()
            await trio.sleep_forever()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for key in chargers:
            nursery.start_soon(one, key)
        await held.wait()
        took = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    store.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chargers", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    chargers = [f"CP{n:05d}" for n in range(args.chargers)]
    cluster = PgCluster()
    try:
        runs = [one_run(cluster.database(), chargers) for _ in range(args.repeats)]
    finally:
        cluster.stop()
    print(machine(None))
    print(f"load average: {os.getloadavg()}")
    print(f"{args.chargers} chargers, medians of {args.repeats} runs:")
    for key in runs[0]:
        print(f"  {key}: {statistics.median(run[key] for run in runs):.1f}")


if __name__ == "__main__":
    main()
