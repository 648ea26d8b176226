"""CPU cost of secondaries in the sans-IO session, per wallbox MeterValues round trip.

    PYTHONPATH=. python bench/mirror_cost.py

One signed MeterValues (796 bytes) from the wallbox, the primary's answer, and
each secondary's answer; every secondary has its own transactionId, so each
copy gets the surgical id edit. No sockets: this is the proxy's own work.
"""

from __future__ import annotations

import json
import timeit

from proxy.core.mirror import Mirror
from proxy.core.policy import CommandPolicy
from proxy.core.session import PRIMARY, Session
from proxy.demo.peers import OCMF_SAMPLE

METER = json.dumps([2, "m", "MeterValues", {"connectorId": 1, "transactionId": 1001, "meterValue": [{
    "timestamp": "2026-11-25T10:00:00Z", "sampledValue": [{"value": OCMF_SAMPLE, "format": "SignedData"}]}]}],
    ensure_ascii=False, separators=(",", ":"))


def session(secondaries: int) -> Session:
    mirrors = {f"s{i}": Mirror(f"s{i}", replay_rate=1e12, transactions={1001: 77 + i}) for i in range(secondaries)}
    s = Session("CP1", upstreams=(PRIMARY, *mirrors), mirrors=mirrors, policy=CommandPolicy(PRIMARY))
    for name in mirrors:
        s.secondary_up(name, 0)
    return s


def main() -> None:
    for count in (0, 1, 2, 4):
        s = session(count)
        n = [0]

        def round_trip() -> None:
            n[0] += 1
            msg_id = str(n[0])
            s.from_wallbox(METER.replace('"m"', f'"{msg_id}"', 1), n[0])
            s.from_upstream(PRIMARY, f'[3,"{msg_id}",{{}}]', n[0])
            for name in s.mirrors:
                s.from_upstream(name, f'[3,"{msg_id}",{{}}]', n[0])

        number = 20_000
        seconds = min(timeit.repeat(round_trip, number=number, repeat=3)) / number
        print(f"{count} secondaries: {seconds * 1e6:6.1f} µs per MeterValues round trip")


if __name__ == "__main__":
    main()
