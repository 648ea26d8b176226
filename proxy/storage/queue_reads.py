"""The offline queue's reads, one SQL text for both implementations (SQLite and PostgreSQL).

Both keep the same tables (``frames``, ``transactions``, ``counters``); an
implementation only supplies :meth:`QueueReads._rows`, which runs a query
written with ``?`` placeholders and turns its errors into StorageError("read").
"""

from __future__ import annotations

from proxy.core.offline import Stored


class QueueReads:
    """The read half of :class:`proxy.storage.interface.Storage` over the shared queue tables."""

    def _rows(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        raise NotImplementedError

    def pending(self, charger: str) -> list[Stored]:
        rows = self._rows("SELECT row, action, text, local_tx, attempts FROM frames WHERE charger = ? ORDER BY row",
                          charger)
        return [Stored(int(row), str(action), str(text), None if local is None else int(local),  # type: ignore[call-overload]
                       int(attempts))  # type: ignore[call-overload]
                for row, action, text, local, attempts in rows]

    def backlog(self) -> dict[str, int]:
        rows = self._rows("SELECT charger, count(*) FROM frames GROUP BY charger")
        return {str(charger): int(count) for charger, count in rows}  # type: ignore[call-overload]

    def depth(self, charger: str) -> tuple[int, float | None]:
        [(count, oldest)] = self._rows("SELECT count(*), min(created) FROM frames WHERE charger = ?", charger)
        return int(count), None if oldest is None else float(oldest)  # type: ignore[call-overload, arg-type]

    def transactions(self, charger: str) -> dict[int, int]:
        rows = self._rows("SELECT local_tx, backend_tx FROM transactions WHERE charger = ?", charger)
        return {int(local): int(backend) for local, backend in rows}  # type: ignore[call-overload]

    def last_local_tx(self, charger: str) -> int:
        rows = self._rows("SELECT last_local_tx FROM counters WHERE charger = ?", charger)
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]

    def subprotocol(self, charger: str) -> str | None:
        rows = self._rows("SELECT subprotocol FROM frames WHERE charger = ? AND subprotocol IS NOT NULL "
                          "ORDER BY row DESC LIMIT 1", charger)
        return str(rows[0][0]) if rows else None
