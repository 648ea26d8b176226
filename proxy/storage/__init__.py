"""What must survive a process: the offline queue, transaction-id maps, secondaries' state (SQLite)."""
