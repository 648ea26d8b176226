"""The trio layer: the wallbox listener, paired sessions, upstream connections, reload."""
