"""Register values as meters and wallboxes encode them (sans-IO).

A :class:`Field` says where a value lives (coil, input or holding register,
address), how it is encoded (16/32/64-bit integer or IEEE float, word order,
or an ASCII string of several registers) and its scale. Maps are data built
from fields; decoding a block of registers is a pure function, so every map is
testable without a device.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

_FORMATS = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f", "float64": ">d"}
_WORDS = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2, "float64": 4}
KINDS = ("coil", "input", "holding")
TYPES = (*_FORMATS, "string")


@dataclass(frozen=True)
class Field:
    address: int
    kind: str = "input"        # coil | input | holding
    type: str = "uint16"       # uint16 | int16 | uint32 | int32 | float32 | float64 | string
    word_order: str = "big"    # big: high word first; little: low word first
    scale: float = 1.0         # physical value = raw * scale
    length: int = 1            # registers of a string (two ASCII characters each, high byte first)

    @property
    def words(self) -> int:
        if self.kind == "coil":
            return 1
        return self.length if self.type == "string" else _WORDS[self.type]

    def shifted(self, offset: int) -> Field:
        """The same value ``offset`` registers further on (the second socket of a wallbox)."""
        return replace(self, address=self.address + offset) if offset else self

    def _words(self, registers: Sequence[int]) -> list[int]:
        words = list(registers[: self.words])
        if len(words) != self.words:
            raise ValueError(f"need {self.words} registers at {self.address}, got {len(words)}")
        return words

    def decode(self, registers: Sequence[int]) -> float:
        words = self._words(registers)
        if self.kind == "coil":
            return float(bool(words[0]))
        if self.type == "string":
            raise ValueError(f"register {self.address} holds text, not a number")
        if self.word_order == "little":
            words.reverse()
        raw = struct.unpack(_FORMATS[self.type], b"".join(w.to_bytes(2, "big") for w in words))[0]
        value = float(raw) * self.scale
        if not math.isfinite(value):
            raise ValueError(f"register {self.address} holds no number ({raw!r})")
        return value

    def text(self, registers: Sequence[int]) -> str:
        """A string register: ASCII, two characters per register, NUL-terminated (trailing blanks cut)."""
        data = b"".join(w.to_bytes(2, "big") for w in self._words(registers))
        return data.lstrip(b"\0").split(b"\0")[0].decode("ascii", errors="replace").strip()

    def key(self, registers: Sequence[int]) -> int | str:
        """What a value table is looked up by: the text of a string, else the raw integer."""
        if self.type == "string":
            return self.text(registers)
        return int(round(self.decode(registers) / self.scale))

    def encode(self, value: float) -> list[int]:
        if self.kind == "coil":
            return [1 if value else 0]
        raw: float | int = value / self.scale
        if self.type not in ("float32", "float64"):
            raw = int(round(raw))
        data = struct.pack(_FORMATS[self.type], raw)
        words = [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]
        return words[::-1] if self.word_order == "little" else words


@dataclass(frozen=True)
class Block:
    kind: str
    address: int
    count: int


def blocks(fields: Iterable[Field], max_gap: int = 16, max_count: int = 120) -> list[Block]:
    """Few contiguous reads covering every field (a read per field would be slow on RS485 gateways).

    ``max_gap=-1`` reads every field on its own, for devices that refuse reads across
    value boundaries (KEBA).
    """
    result: list[Block] = []
    for kind in KINDS:
        spans = sorted({(f.address, f.address + f.words) for f in fields if f.kind == kind})
        for start, end in spans:
            last = result[-1] if result and result[-1].kind == kind else None
            if (last and max_gap >= 0 and start - (last.address + last.count) <= max_gap
                    and end - last.address <= max_count):
                result[-1] = Block(kind, last.address, max(last.count, end - last.address))
            else:
                result.append(Block(kind, start, end - start))
    return result


def _registers_of(field: Field, data: dict[Block, list[int]]) -> list[int]:
    for block, registers in data.items():
        if block.kind == field.kind and block.address <= field.address < block.address + block.count:
            offset = field.address - block.address
            return registers[offset:offset + field.words]
    raise KeyError(f"register {field.address} was not read")


def value_at(field: Field, data: dict[Block, list[int]]) -> float:
    return field.decode(_registers_of(field, data))


def key_at(field: Field, data: dict[Block, list[int]]) -> int | str:
    return field.key(_registers_of(field, data))
