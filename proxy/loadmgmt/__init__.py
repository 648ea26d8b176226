"""Load management: the limit engine and profile control (sans-IO), and the trio driver that puts them on the wire."""
