"""An in-memory bitmap of extents, persisted as pages.

One bit per extent in a flat ``bytearray`` (a 1 TiB volume with 64 KiB
extents needs 2 MiB).  ``PAGE_BYTES`` bytes form a page, the unit the
metadata stores; only pages touched since the last save are written, and
an all-zero page is stored as no row at all, so a sparse map costs nothing.

A Bitmap does no locking: its owner (``iopath``/``jobs``) holds the lock.
"""
from __future__ import annotations

from typing import Iterable, Iterator

PAGE_BYTES = 4096
PAGE_BITS = PAGE_BYTES * 8


class Bitmap:
    """``key`` = (owner, kind) names the map in the metadata, if persisted."""
    __slots__ = ("nbits", "bits", "dirty_pages", "key")

    def __init__(self, nbits: int, bits: bytearray | None = None,
                 key: tuple[str, str] | None = None):
        self.nbits = nbits
        self.bits = bits if bits is not None else bytearray((nbits + 7) // 8)
        self.dirty_pages: set[int] = set()
        self.key = key

    # -- single bits (the hot path) -------------------------------------
    def test(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def set(self, i: int) -> None:
        self.bits[i >> 3] |= 1 << (i & 7)
        self.dirty_pages.add(i // PAGE_BITS)

    def set_committed(self, i: int) -> None:
        """Set a bit the metadata already holds: no page becomes dirty."""
        self.bits[i >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        self.bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        self.dirty_pages.add(i // PAGE_BITS)

    # -- whole maps ----------------------------------------------------
    def count(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()

    def any(self) -> bool:
        return self.bits.count(0) != len(self.bits)

    def copy(self, key: tuple[str, str] | None = None) -> "Bitmap":
        return Bitmap(self.nbits, bytearray(self.bits), key)

    def set_all(self) -> None:
        self.bits[:] = b"\xff" * len(self.bits)
        extra = len(self.bits) * 8 - self.nbits
        if extra:
            self.bits[-1] = 0xFF >> extra
        self.mark_all_dirty()

    def clear_all(self) -> None:
        self.bits[:] = bytes(len(self.bits))
        self.mark_all_dirty()

    def assign(self, other: "Bitmap") -> None:
        """self := other, marking every changed page dirty."""
        self.mark_changed_pages(other)
        self.bits[:] = other.bits

    def union(self, other: "Bitmap") -> None:
        """self |= other."""
        merged = (int.from_bytes(self.bits, "little")
                  | int.from_bytes(other.bits, "little"))
        new = merged.to_bytes(len(self.bits), "little")
        self.mark_changed_pages(Bitmap(self.nbits, bytearray(new)))
        self.bits[:] = new

    def mark_changed_pages(self, other: "Bitmap") -> None:
        for p in range(self.page_count()):
            s = slice(p * PAGE_BYTES, (p + 1) * PAGE_BYTES)
            if self.bits[s] != other.bits[s]:
                self.dirty_pages.add(p)

    def mark_all_dirty(self) -> None:
        self.dirty_pages.update(range(self.page_count()))

    def iter_set(self, start: int = 0) -> Iterator[int]:
        """Set bits in ascending order from ``start``; skips zero bytes fast."""
        bits = self.bits
        byte = start >> 3
        n = len(bits)
        while byte < n:
            nz = _next_nonzero(bits, byte)
            if nz < 0:
                return
            b = bits[nz]
            for k in range(8):
                i = nz * 8 + k
                if b >> k & 1 and i >= start and i < self.nbits:
                    yield i
            byte = nz + 1

    # -- pages -----------------------------------------------------------
    def page_count(self) -> int:
        return (len(self.bits) + PAGE_BYTES - 1) // PAGE_BYTES

    def page(self, p: int) -> bytes:
        return bytes(self.bits[p * PAGE_BYTES:(p + 1) * PAGE_BYTES])

    def page_with(self, p: int, extra: list[int]) -> bytes:
        """Page ``p`` with the bits ``extra`` (all within page p) set."""
        data = bytearray(self.bits[p * PAGE_BYTES:(p + 1) * PAGE_BYTES])
        base = p * PAGE_BITS
        for i in extra:
            j = i - base
            data[j >> 3] |= 1 << (j & 7)
        return bytes(data)

    def run_from(self, i: int, limit: int) -> int:
        """How many consecutive set bits start at ``i`` (at most ``limit``)."""
        n = 0
        while n < limit and i + n < self.nbits and self.test(i + n):
            n += 1
        return n

    def load_page(self, p: int, data: bytes) -> None:
        start = p * PAGE_BYTES
        end = min(start + len(data), len(self.bits))
        self.bits[start:end] = data[:end - start]

    def take_dirty(self) -> list[int]:
        pages = sorted(self.dirty_pages)
        self.dirty_pages.clear()
        return pages


def _next_nonzero(bits: bytearray, start: int) -> int:
    """Index of the first non-zero byte at or after ``start``, or -1."""
    n = len(bits)
    step = 4096
    pos = start
    while pos < n:
        chunk = bits[pos:pos + step]
        if chunk.count(0) != len(chunk):
            stripped = len(chunk) - len(chunk.lstrip(b"\0"))
            return pos + stripped
        pos += step
    return -1


def extent_range(offset: int, length: int, shift: int) -> range:
    """The extents that bytes [offset, offset+length) touch."""
    return range(offset >> shift, (offset + length - 1 >> shift) + 1)


def from_indices(nbits: int, indices: Iterable[int]) -> Bitmap:
    b = Bitmap(nbits)
    for i in indices:
        b.set(i)
    return b
