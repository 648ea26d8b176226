"""The garbage collector's young-generation threshold, grown with the open connections.

CPython runs a young-generation pass whenever the tracked objects allocated
exceed those freed by the first threshold (700 by default). Under load, trio
wakes every connection that one ``epoll_wait`` reported ready in a batch, and
each woken task gets a couple of tracked objects (its outcome, its bound send)
before any task of the batch runs and frees its own: with 1000 wallboxes
saturating the proxy, batches of 350 ready connections passed 700 on their own,
two young passes per 1000 forwarded frames. Each pass also found the waits in
flight (about 19 tracked objects per waiting task: coroutines, closures, epoll
waiters), promoted them, and so brought on the older generations' passes, the
full ones walking the whole heap. Measured at 1000 wallboxes (session log off):
9 to 15 µs of collection per forwarded frame, a fifth of the relay's CPU; at
100 wallboxes, none (bench/results/scale-20261127.md).

A batch holds at most one task per open connection leg, so the first
threshold follows the open connections: :data:`PER_CONNECTION` objects per
open wallbox connection, never below the interpreter's own. The factor is the
size of what a young pass walks anyway: under load each waiting leg holds
about 20 tracked objects allocated since the last pass (its wait), about 40 per
wallbox connection, so a pass walks 40 × N objects plus those the threshold
let in, and the collector's cost per allocation is (40 N + T) / T: five times
its least at 10 per connection, twice at 40. Measured at 1000 wallboxes with
the session log on (whose batch keeps a second of frames: the allocations
that remain): 6.5 → 0.55 µs of collection per frame going from 10 to 40.

In steady load the relay frees what it allocates; the threshold only decides
when garbage cycles (a closed pair's exception tracebacks) are found: at most
40 tracked objects per open connection wait for a pass, against the ~150 each
idle pair keeps alive (RSS per idle pair unchanged: 27 KiB). Nothing is open: the interpreter's thresholds exactly. The other two
thresholds are left alone.

Process-wide, as the collector is: every :class:`~proxy.runtime.server.ProxyServer`
of the process counts its connections here.
"""

from __future__ import annotations

import gc

#: Tracked objects allowed per open wallbox connection before a young pass: about what a pass walks
#: anyway (each connection's waits in flight), so the collector costs at most twice its least. Saturating
#: 1000 wallboxes, a young pass came every 500 frames at 2 per connection, about never at 5 with the
#: session log off, and 6.5 µs per frame at 10 against 0.55 at 40 with it on
#: (bench/results/scale-20261127.md).
PER_CONNECTION = 40


class YoungThreshold:
    """Keeps ``gc``'s first threshold at ``max(base, per_connection × open connections)``."""

    def __init__(self, per_connection: int = PER_CONNECTION) -> None:
        self.per_connection = per_connection
        #: The interpreter's thresholds when the first connection opened (restored when none is open).
        self._base: tuple[int, int, int] | None = None
        self.open = 0

    def opened(self) -> None:
        if self.open == 0:
            self._base = gc.get_threshold()
        self.open += 1
        self._apply()

    def closed(self) -> None:
        self.open -= 1
        self._apply()

    @property
    def wanted(self) -> int:
        """The first threshold for the connections open now."""
        base = self._base or gc.get_threshold()
        return max(base[0], self.per_connection * self.open)

    def _apply(self) -> None:
        base = self._base
        if base is None:
            return
        if self.open == 0:
            gc.set_threshold(*base)
            self._base = None
            return
        current = gc.get_threshold()
        wanted = self.wanted
        if current[0] != wanted:
            gc.set_threshold(wanted, current[1], current[2])


#: The process's one pace (the collector is per process).
young = YoungThreshold()
