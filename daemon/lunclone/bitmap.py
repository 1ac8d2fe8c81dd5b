"""An in-memory bitmap of extents, persisted as pages.

One bit per extent in a flat buffer (a 1 TiB volume with 64 KiB extents
needs 2 MiB): an anonymous private mapping (``zeroed``), whose pages cost
no memory until a bit in them is set, so a 16 TiB map with few bits set
costs a few pages, and making one costs no time.  It is indexed as a
``bytearray`` is (``bits[byte]`` is an int; slices are ``bytes``); its
identity never changes once loaded (readers without the lock keep a
reference; an unloaded map's None becomes the buffer once, below).  ``PAGE_BYTES`` bytes form a page, the unit the
metadata stores; only pages touched since the last save are written, and
an all-zero page is stored as no row at all, so a sparse map costs nothing.

A count of set bits per page is kept, so counting, "any set?", scanning
and whole-map operations skip empty pages: their cost follows the bits
set, not the volume size (a 1 TiB restore starts as fast as a 1 GiB one).

A stored map can also be made *unloaded* (``Bitmap.unloaded``): only its
count of set bits is known, read from the metadata without its pages, and
its buffer is None, so any use but ``count``/``any``/``copy`` fails loudly
instead of reading zeroes.  ``fill`` loads it in place (its identity
stays): a daemon with many fractured clones starts without reading their
delta maps, and holds in memory only the maps of the families in use.

A Bitmap does no locking: its owner (``policy``/``jobs``) holds the lock.
"""
from __future__ import annotations

import mmap
from itertools import compress
from typing import Iterator

PAGE_BYTES = 4096
PAGE_BITS = PAGE_BYTES * 8
PAGE_SHIFT = 15  # log2(PAGE_BITS)


class Bitmap:
    """``key`` = (owner, kind) names the map in the metadata, if persisted."""
    __slots__ = ("nbits", "bits", "counts", "dirty_pages", "key")

    def __init__(self, nbits: int, bits: bytearray | None = None,
                 key: tuple[str, str] | None = None):
        self.nbits = nbits
        self.bits = bits if bits is not None else zeroed((nbits + 7) // 8)
        self.counts = [0] * self.page_count()
        self.dirty_pages: set[int] = set()
        self.key = key
        if bits is not None:
            for p in range(len(self.counts)):
                self._recount(p)

    @classmethod
    def unloaded(cls, nbits: int, key: tuple[str, str] | None, count: int) -> "Bitmap":
        """A stored map not read yet, of which only ``count`` is known."""
        b = cls.__new__(cls)
        b.nbits, b.key, b.bits, b.counts, b.dirty_pages = nbits, key, None, [count], set()
        return b

    @property
    def loaded(self) -> bool:
        return self.bits is not None

    def fill(self, stored: "Bitmap") -> None:
        """An unloaded map takes the pages of ``stored`` (the same map, just
        read): counts first, then the buffer that marks it loaded."""
        assert self.bits is None and not self.dirty_pages
        self.counts = stored.counts
        self.bits = stored.bits

    # -- single bits (the hot path) -------------------------------------
    def test(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def set(self, i: int) -> None:
        self.set_committed(i)
        self.dirty_pages.add(i >> PAGE_SHIFT)

    def set_committed(self, i: int) -> None:
        """Set a bit the metadata already holds: no page becomes dirty."""
        m = 1 << (i & 7)
        if not self.bits[i >> 3] & m:
            self.bits[i >> 3] |= m
            self.counts[i >> PAGE_SHIFT] += 1

    def clear(self, i: int) -> None:
        m = 1 << (i & 7)
        if self.bits[i >> 3] & m:
            self.bits[i >> 3] &= ~m & 0xFF
            self.counts[i >> PAGE_SHIFT] -= 1
            self.dirty_pages.add(i >> PAGE_SHIFT)

    # -- whole maps ----------------------------------------------------
    def count(self) -> int:
        return sum(self.counts)

    def any(self) -> bool:
        return any(self.counts)

    def copy(self, key: tuple[str, str] | None = None) -> "Bitmap":
        """A copy (no page dirty); its cost follows the pages with bits set.
        A copy of an unloaded map is unloaded (its count only)."""
        if self.bits is None:
            return Bitmap.unloaded(self.nbits, key, self.count())
        b = Bitmap(self.nbits, key=key)
        for p in self.used_pages():
            s = slice(p * PAGE_BYTES, (p + 1) * PAGE_BYTES)
            b.bits[s] = self.bits[s]
        b.counts = list(self.counts)
        return b

    def set_all(self) -> None:
        self.bits[:] = b"\xff" * len(self.bits)
        extra = len(self.bits) * 8 - self.nbits
        if extra:
            self.bits[-1] = 0xFF >> extra
        for p in range(len(self.counts)):
            self._recount(p)
        self.mark_all_dirty()

    def assign(self, other: "Bitmap") -> None:
        """self := other, marking every changed page dirty."""
        for p in sorted(set(self.used_pages()).union(other.used_pages())):
            s = slice(p * PAGE_BYTES, (p + 1) * PAGE_BYTES)
            if self.bits[s] != other.bits[s]:
                self.bits[s] = other.bits[s]
                self.counts[p] = other.counts[p]
                self.dirty_pages.add(p)

    def union(self, other: "Bitmap") -> None:
        """self |= other."""
        for p in other.used_pages():
            s = slice(p * PAGE_BYTES, (p + 1) * PAGE_BYTES)
            n = self.page_len(p)
            merged = (int.from_bytes(self.bits[s], "little")
                      | int.from_bytes(other.bits[s], "little")).to_bytes(n, "little")
            if merged != self.bits[s]:
                self.bits[s] = merged
                self._recount(p)
                self.dirty_pages.add(p)

    def union_pages(self, other: "Bitmap") -> dict[int, bytes]:
        """The pages of self | other that differ from self's, by page
        number; self is not changed (what ``union`` would write)."""
        out = {}
        for p in other.used_pages():
            s = slice(p * PAGE_BYTES, (p + 1) * PAGE_BYTES)
            mine, theirs = self.bits[s], other.bits[s]
            if mine == theirs:
                continue
            a = int.from_bytes(mine, "little")
            merged = a | int.from_bytes(theirs, "little")
            if merged != a:
                out[p] = merged.to_bytes(len(mine), "little")
        return out

    def mark_all_dirty(self) -> None:
        self.dirty_pages.update(range(self.page_count()))

    def iter_set(self, start: int = 0) -> Iterator[int]:
        """Set bits in ascending order from ``start``, skipping empty pages.

        The map may change between two steps (the caller drops its lock
        while it works on a bit); the scan reads the current state."""
        self._check_loaded()
        bits, counts = self.bits, self.counts
        for p in range(start >> PAGE_SHIFT, len(counts)):
            if not counts[p]:
                continue
            lo = max(start >> 3, p * PAGE_BYTES)
            hi = min((p + 1) * PAGE_BYTES, len(bits))
            while lo < hi:
                nz = _skip(bits, lo, hi, b"\0")
                if nz == hi:
                    break
                b = bits[nz]
                for k in range(8):
                    i = nz * 8 + k
                    if b >> k & 1 and start <= i < self.nbits:
                        yield i
                lo = nz + 1

    def any_in(self, first: int, last: int) -> bool:
        """Is a bit in [first, last) set?  Pages without bits are skipped by
        their count, whole bytes are looked at in C (``_skip``),
        only the bits at the two ends one by one."""
        self._check_loaded()
        last = min(last, self.nbits)
        if first >= last or not any(self.counts[first >> PAGE_SHIFT:(last - 1 >> PAGE_SHIFT) + 1]):
            return False
        lo, hi = (first + 7) >> 3, last >> 3  # whole bytes
        if lo >= hi:
            return any(self.test(i) for i in range(first, last))
        if any(self.test(i) for i in range(first, lo << 3)) or \
                any(self.test(i) for i in range(hi << 3, last)):
            return True
        for p in range(lo // PAGE_BYTES, (hi - 1) // PAGE_BYTES + 1):
            end = min(hi, (p + 1) * PAGE_BYTES)
            if self.counts[p] and _skip(self.bits, max(lo, p * PAGE_BYTES), end, b"\0") < end:
                return True
        return False

    def runs(self) -> Iterator[tuple[int, int]]:
        """Runs of set bits, ``(first, count)``, in order.  Bytes of eight
        set bits are taken eight at a time and empty pages skipped, so the
        cost follows the runs, not the bits (a 1 TiB map all set is one run
        found in a scan of its bytes)."""
        first = end = -1
        for i, n in self._byte_runs():
            if i == end:
                end += n
                continue
            if end > first:
                yield first, end - first
            first, end = i, i + n
        if end > first:
            yield first, end - first

    def _byte_runs(self) -> Iterator[tuple[int, int]]:
        """Set bits as short runs in order: a span of 0xFF bytes, or one bit."""
        bits = self.bits
        for p in self.used_pages():
            pos, hi = p * PAGE_BYTES, min((p + 1) * PAGE_BYTES, len(bits))
            while pos < hi:
                nz = _skip(bits, pos, hi, b"\0")
                if nz == hi:
                    break
                b = bits[nz]
                if b == 0xFF:
                    end = _skip(bits, nz, hi, b"\xff")
                    yield nz * 8, (end - nz) * 8
                    pos = end
                    continue
                for k in range(8):
                    if b >> k & 1:
                        yield nz * 8 + k, 1
                pos = nz + 1

    # -- pages -----------------------------------------------------------
    def page_count(self) -> int:
        self._check_loaded()
        return (len(self.bits) + PAGE_BYTES - 1) // PAGE_BYTES

    def page_len(self, p: int) -> int:
        return min(PAGE_BYTES, len(self.bits) - p * PAGE_BYTES)

    def used_pages(self) -> list[int]:
        """The pages with a bit set."""
        self._check_loaded()
        return list(compress(range(len(self.counts)), self.counts))

    def _check_loaded(self) -> None:
        if self.bits is None:
            raise RuntimeError(f"map {self.key} used before it was loaded")

    def _recount(self, p: int) -> None:
        data = self.bits[p * PAGE_BYTES:(p + 1) * PAGE_BYTES]
        self.counts[p] = int.from_bytes(data, "little").bit_count()

    def page(self, p: int) -> bytes:
        self._check_loaded()
        return bytes(self.bits[p * PAGE_BYTES:(p + 1) * PAGE_BYTES])

    def page_with(self, p: int, extra: list[int]) -> bytes:
        """Page ``p`` with the bits ``extra`` (all within page p) set."""
        self._check_loaded()
        data = bytearray(self.bits[p * PAGE_BYTES:(p + 1) * PAGE_BYTES])
        base = p * PAGE_BITS
        for i in extra:
            j = i - base
            data[j >> 3] |= 1 << (j & 7)
        return bytes(data)

    def load_page(self, p: int, data: bytes) -> None:
        start = p * PAGE_BYTES
        end = min(start + len(data), len(self.bits))
        data = data[:end - start]
        self.bits[start:end] = data
        if end - start == self.page_len(p):  # the whole page: count what came in
            self.counts[p] = int.from_bytes(data, "little").bit_count()
        else:
            self._recount(p)

    def take_dirty(self) -> list[int]:
        pages = sorted(self.dirty_pages)
        self.dirty_pages.clear()
        return pages


def zeroed(n: int):
    """``n`` zero bytes, indexed as a bytearray: an anonymous private
    mapping, so a page is resident only once written (and a fork copies on
    write); an empty map needs no mapping."""
    if n == 0:
        return bytearray()
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _skip(bits: bytearray, start: int, end: int, fill: bytes) -> int:
    """Index of the first byte in [start, end) that is not ``fill`` (one
    byte: b"\\0" skips empty bytes, b"\\xff" full ones), or ``end``; the
    bytes are looked at in C, 512 at a time."""
    pos = start
    while pos < end:
        chunk = bits[pos:min(pos + 512, end)]
        stripped = chunk.lstrip(fill)
        if stripped:
            return pos + len(chunk) - len(stripped)
        pos += 512
    return end


def byte_ranges(extents: Bitmap, extent_size: int, size: int) -> Iterator[tuple[int, int]]:
    """The runs of set extents as (offset, length) in bytes, the last one
    cut at the volume's end."""
    for first, count in extents.runs():
        offset = first * extent_size
        yield offset, min(size, offset + count * extent_size) - offset


def extent_range(offset: int, length: int, shift: int) -> range:
    """The extents that bytes [offset, offset+length) touch."""
    return range(offset >> shift, (offset + length - 1 >> shift) + 1)

