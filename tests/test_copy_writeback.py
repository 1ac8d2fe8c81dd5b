"""A job's copy into a local file starts that file's write-back at once
(``volume.start_writeback``, sync_file_range SYNC_FILE_RANGE_WRITE): the
disk works while the job copies on, and the fdatasync before the clear
commits has little left.  Shown on a real file through the kernel's own
page flags (/proc/self/pagemap and /proc/kpageflags, root only): dirty
pages of the copied range are no longer dirty once it returns (under
write-back or written; ext4 may take pages beyond the range along)."""
from __future__ import annotations

import mmap
import os
import struct

import pytest

from lunclone import volume as vf

PAGE = 4096
KPF_DIRTY = 1 << 4


def dirty_pages(path: str, length: int) -> list[bool] | None:
    """For each page of the file's first ``length`` bytes: is it dirty?
    None where the kernel hides page frame numbers (not root)."""
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        import ctypes
        buf = (ctypes.c_char * length).from_buffer(mm)
        addr = ctypes.addressof(buf)
        for off in range(0, length, PAGE):
            _ = mm[off]  # map the page-cache page here
        out = []
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            for off in range(0, length, PAGE):
                pm.seek((addr + off) // PAGE * 8)
                entry = struct.unpack("<Q", pm.read(8))[0]
                pfn = entry & ((1 << 55) - 1)
                if not entry >> 63 or pfn == 0:
                    return None
                kf.seek(pfn * 8)
                out.append(bool(struct.unpack("<Q", kf.read(8))[0] & KPF_DIRTY))
        del buf
        return out
    finally:
        mm.close()


def test_start_writeback_leaves_no_dirty_page_in_its_range(tmp_path):
    if not os.access("/proc/kpageflags", os.R_OK):
        pytest.skip("/proc/kpageflags is not readable (not root)")
    path = str(tmp_path / "vol.img")
    size = 64 * PAGE
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(size), 0)  # every page dirty again
        before = dirty_pages(path, size)
        if before is None:
            pytest.skip("the kernel hides page frame numbers here")
        if not all(before):
            pytest.skip("the kernel wrote the pages back on its own meanwhile")
        vf.start_writeback(fd, 0, 32 * PAGE)
        after = dirty_pages(path, size)
        assert not any(after[:32]), "pages of the range are still dirty"
        os.fdatasync(fd)  # durability still comes from here
    finally:
        os.close(fd)
