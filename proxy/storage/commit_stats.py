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

import time
from dataclasses import dataclass, field

#: Samples kept per measure (enough for a benchmark run; older samples are kept, newer dropped).
_CAP = 200_000

#: Per frame: read → enqueued, enqueued → committed, committed → answer written to the socket;
#: per replayed frame: its delivery enqueued → committed (the kill -9 duplicate window's tail).
FRAME_STAGES = ("read_to_enqueue", "enqueue_to_commit", "commit_to_sent", "deliver_to_commit")
#: Per commit: batch waiting for the committer, hop into the thread, work in it, hop back to trio.
COMMIT_STAGES = ("gather", "hop_in", "work", "fsync", "hop_out", "batch")


@dataclass
class CommitStats:
    """Samples in seconds (``batch``: frames per commit), summarised as p50/p99/mean in ms."""

    samples: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in FRAME_STAGES + COMMIT_STAGES})
    #: Seconds the worker thread spent on writes, and when the first write began (utilisation).
    busy: float = 0.0
    first: float | None = None

    def add(self, stage: str, value: float) -> None:
        values = self.samples[stage]
        if len(values) < _CAP:
            values.append(value)

    def worked(self, started: float, ended: float) -> None:
        if self.first is None:
            self.first = started
        self.busy += ended - started

    def summary(self) -> dict[str, object]:
        """``{stage: {"n", "p50", "p99", "mean"}}`` (ms; frames for ``batch``) and the thread's utilisation."""
        out: dict[str, object] = {}
        for stage, values in self.samples.items():
            if not values:
                continue
            ordered = sorted(values)
            scale = 1.0 if stage == "batch" else 1000.0
            out[stage] = {"n": len(values), "p50": round(ordered[len(ordered) // 2] * scale, 3),
                          "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * scale, 3),
                          "mean": round(sum(values) / len(values) * scale, 3)}
        if self.first is not None:
            wall = time.perf_counter() - self.first
            out["thread_utilisation"] = round(self.busy / wall, 3) if wall > 0 else None
        return out
