"""Where an offline answer's time goes: the group commit's stages, measured in the running proxy.

:class:`CommitStats` is filled by :class:`proxy.storage.offline_queue.AsyncQueue`
(per commit: waiting for the committer, the hop into the worker thread, the
work there, the hop back) and by the relay (per locally answered frame: read
to enqueue, enqueue to commit, commit to answer written). The proxy logs the
summary as ``queue_stats`` at shutdown; ``bench/offline_answer.py`` prints it
(docs/storage.md, "Where the time goes"). Costs a few ``perf_counter`` calls
and list appends per frame; the lists are capped.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

#: Samples kept per measure (enough for a benchmark run; older samples are kept, newer dropped).
_CAP = 200_000

#: Per frame: read → enqueued, enqueued → committed, committed → answer written to the socket;
#: per replayed frame: its delivery enqueued → committed (the kill -9 duplicate window's tail).
FRAME_STAGES = ("read_to_enqueue", "enqueue_to_commit", "commit_to_sent", "deliver_to_commit")
#: Per commit: batch waiting for the committer, how long its oldest change waited while no commit ran (the
#: disk idle with work waiting), hop into the thread, work in it, hop back to trio.
COMMIT_STAGES = ("gather", "idle", "hop_in", "work", "fsync", "hop_out", "batch")
#: Per garbage collection from the store's first commit on: its pause (any generation), and full collections apart
#: (they stop every thread holding the GIL, the event loop included: a stall every frame in flight waits for).
PAUSE_STAGES = ("gc", "gc_full")


@dataclass
class CommitStats:
    """Samples in seconds (``batch``: frames per commit), summarised as p50/p99/mean in ms."""

    samples: dict[str, list[float]] = field(
        default_factory=lambda: {k: [] for k in FRAME_STAGES + COMMIT_STAGES + PAUSE_STAGES})
    #: Seconds the worker thread spent on writes, and when the first write began (utilisation).
    busy: float = 0.0
    first: float | None = None

    def add(self, stage: str, value: float) -> None:
        values = self.samples[stage]
        if len(values) < _CAP:
            values.append(value)

    _gc_began: float = 0.0

    def watch_gc(self) -> None:
        """Record every garbage collection's pause from now on (until :meth:`unwatch_gc`)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if self.first is None:  # start-up's collections (and its explicit one before gc.freeze) are no stall
            return
        now = time.perf_counter()
        if phase == "start":
            self._gc_began = now
            return
        pause = now - self._gc_began
        self.add("gc", pause)
        if info.get("generation") == 2:
            self.add("gc_full", pause)

    def worked(self, started: float, ended: float) -> None:
        if self.first is None:
            self.first = started
        self.busy += ended - started

    def summary(self) -> dict[str, object]:
        """``{stage: {"n", "p50", "p99", "mean", "max"}}`` (ms; frames for ``batch``) and the thread's utilisation."""
        out: dict[str, object] = {}
        for stage, values in self.samples.items():
            if not values:
                continue
            ordered = sorted(values)
            scale = 1.0 if stage == "batch" else 1000.0
            out[stage] = {"n": len(values), "p50": round(ordered[len(ordered) // 2] * scale, 3),
                          "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * scale, 3),
                          "mean": round(sum(values) / len(values) * scale, 3),
                          "max": round(ordered[-1] * scale, 3)}
        if self.first is not None:
            wall = time.perf_counter() - self.first
            out["thread_utilisation"] = round(self.busy / wall, 3) if wall > 0 else None
        return out
