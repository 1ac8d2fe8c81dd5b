"""Persistent metadata: the only door to SQLite.

Tables (schema version ``SCHEMA_VERSION``):

    meta     (key, value)                     schema version, creation time
    volumes  (name, size, extent_size, source, clone_state, remote)
             a row with ``source`` set is a clone of that volume
    jobs     (source, kind, clone, state, protected, ..., undo, protected_extents)
             one job per source; ``undo``: the restore keeps an undo image
             (undo.py); ``protected_extents``: what the host wrote during a
             finished restore (NULL: it finished before version 4)
    bitmaps  (owner, kind, page, nset, bits)  pages of a Bitmap; no row = zeroes
             kind is one of DELTA (owner: a clone), PENDING, PROTECTED and
             CAPTURED (owner: a source being restored, or restored); ``nset`` is the page's
             count of set bits, stored before the blob so that a map's
             count is read without its pages (``map_counts``)

Invariants:
- The database runs in WAL mode with ``synchronous=FULL``: a committed
  transaction survives power loss.
- Every change goes through ``transaction()``; a failed commit rolls back
  and raises MetadataError.  In-memory changes are registered with
  ``Transaction.then`` and run only after COMMIT, so they never get ahead.
- Opening never writes to a database it did not create: a file that is
  not a lunclone database, or one of a newer schema version, is refused
  after a read-only look.  A database of an older version of ours is
  brought forward one transaction per version (``_MIGRATIONS``) and logged.
- One ``threading.Lock`` serialises the connection; callers from nbdkit's
  threads, the committer thread and the asyncio thread share it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, asdict
from typing import Iterator

from .bitmap import Bitmap
from . import faults
from .errors import MetadataError

log = logging.getLogger("lunclone.metadata")

SCHEMA_VERSION = 4
DB_NAME = "lunclone.db"

# The kinds of map (``bitmaps.kind``)
DELTA = "delta"          # clone delta map: extent may differ from the source
PENDING = "pending"      # restore-pending map: still to copy clone -> source
PROTECTED = "protected"  # protected restore map: the host wrote it meanwhile
CAPTURED = "captured"    # captured map: the extent's pre-restore data is in the undo image

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE volumes (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    extent_size INTEGER NOT NULL,
    source TEXT,
    clone_state TEXT,
    remote TEXT,
    created REAL NOT NULL
);
CREATE TABLE jobs (
    source TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    clone TEXT NOT NULL,
    state TEXT NOT NULL,
    protected INTEGER NOT NULL DEFAULT 1,
    total_extents INTEGER NOT NULL DEFAULT 0,
    copied_bytes INTEGER NOT NULL DEFAULT 0,
    on_demand INTEGER NOT NULL DEFAULT 0,
    rate_limit INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    started REAL NOT NULL,
    undo INTEGER NOT NULL DEFAULT 0,
    protected_extents INTEGER
);
CREATE TABLE bitmaps (
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    page INTEGER NOT NULL,
    nset INTEGER NOT NULL,
    bits BLOB NOT NULL,
    PRIMARY KEY (owner, kind, page)
) WITHOUT ROWID;
"""

# Version 1 had no ``nset``: its pages are counted once, in one transaction.
# A migration spells out the table it makes rather than reuse _SCHEMA's:
# it must keep making version 2's table when a later version changes it.
_MIGRATIONS = {
    1: """
CREATE TABLE bitmaps_v2 (
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    page INTEGER NOT NULL,
    nset INTEGER NOT NULL,
    bits BLOB NOT NULL,
    PRIMARY KEY (owner, kind, page)
) WITHOUT ROWID;
INSERT INTO bitmaps_v2 SELECT owner, kind, page, popcount(bits), bits FROM bitmaps;
DROP TABLE bitmaps;
ALTER TABLE bitmaps_v2 RENAME TO bitmaps;
UPDATE meta SET value = '2' WHERE key = 'schema_version';
""",
    # Version 3: a restore may keep an undo image (its jobs row says so).
    2: """
ALTER TABLE jobs ADD COLUMN undo INTEGER NOT NULL DEFAULT 0;
UPDATE meta SET value = '3' WHERE key = 'schema_version';
""",
    # Version 4: a finished restore's count of extents the host wrote during
    # it (the clone's delta map grows afterwards; status must not change).
    3: """
ALTER TABLE jobs ADD COLUMN protected_extents INTEGER;
UPDATE meta SET value = '4' WHERE key = 'schema_version';
""",
}


def popcount(data: bytes) -> int:
    return int.from_bytes(data, "little").bit_count()


@dataclass
class VolumeRecord:
    name: str
    size: int
    extent_size: int
    source: str | None = None
    clone_state: str | None = None
    remote: str | None = None
    created: float = 0.0

    @property
    def nextents(self) -> int:
        return -(-self.size // self.extent_size)


@dataclass
class JobRecord:
    source: str
    kind: str
    clone: str
    state: str
    protected: bool = True
    total_extents: int = 0
    copied_bytes: int = 0
    on_demand: int = 0
    rate_limit: int = 0
    error: str | None = None
    started: float = 0.0
    undo: bool = False
    protected_extents: int | None = None  # a finished restore's (None: unknown)


class Transaction:
    """The writes of one transaction; only valid inside ``transaction()``."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self.after_commit: list = []

    def then(self, change) -> None:
        """Run ``change()`` (an in-memory change) once the transaction has
        committed; never if it fails.  Memory never runs ahead of the
        database: compute the new state into copies inside the transaction,
        save them, and assign them here."""
        self.after_commit.append(change)

    def put_volume(self, rec: VolumeRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO volumes VALUES (:name, :size, :extent_size,"
            " :source, :clone_state, :remote, :created)", asdict(rec))

    def delete_volume(self, name: str) -> None:
        self._db.execute("DELETE FROM volumes WHERE name = ?", (name,))
        self._db.execute("DELETE FROM bitmaps WHERE owner = ?", (name,))

    def put_job(self, rec: JobRecord) -> None:
        d = asdict(rec)
        d["protected"] = int(rec.protected)
        d["undo"] = int(rec.undo)
        self._db.execute(
            "INSERT OR REPLACE INTO jobs VALUES (:source, :kind, :clone, :state,"
            " :protected, :total_extents, :copied_bytes, :on_demand, :rate_limit,"
            " :error, :started, :undo, :protected_extents)", d)

    def delete_job(self, source: str) -> None:
        self._db.execute("DELETE FROM jobs WHERE source = ?", (source,))

    def save_bitmap(self, owner: str, kind: str, bm: Bitmap,
                    pages: list[int] | None = None) -> None:
        """Write the given pages of ``bm`` (default: its dirty pages)."""
        for p in (bm.take_dirty() if pages is None else pages):
            self.save_page(owner, kind, p, bm.page(p))

    def replace_bitmap(self, owner: str, kind: str, bm: Bitmap) -> None:
        """The stored map becomes exactly ``bm`` (for a map computed as a
        copy, whose changes are not tracked): its rows are deleted and its
        pages with a bit set written, so the cost follows the bits set."""
        self.delete_bitmap(owner, kind)
        for p in bm.used_pages():
            self._db.execute("INSERT INTO bitmaps VALUES (?, ?, ?, ?, ?)",
                             (owner, kind, p, bm.counts[p], bm.page(p)))

    def save_page(self, owner: str, kind: str, page: int, data: bytes) -> None:
        """Store one page; an all-zero page is stored as no row."""
        nset = popcount(data)
        if not nset:
            self._db.execute(
                "DELETE FROM bitmaps WHERE owner=? AND kind=? AND page=?",
                (owner, kind, page))
        else:
            self._db.execute(
                "INSERT OR REPLACE INTO bitmaps VALUES (?, ?, ?, ?, ?)",
                (owner, kind, page, nset, data))

    def set_bits(self, owner: str, kind: str, page: int, offsets: list[int],
                 length: int) -> None:
        """Set bits (offsets within the page) in the page as stored; a page
        with no row is ``length`` zero bytes."""
        row = self._db.execute("SELECT bits FROM bitmaps WHERE owner=? AND kind=? AND page=?",
                               (owner, kind, page)).fetchone()
        data = bytearray(row[0]) if row else bytearray(length)
        for j in offsets:
            data[j >> 3] |= 1 << (j & 7)
        self.save_page(owner, kind, page, bytes(data))

    def delete_bitmap(self, owner: str, kind: str) -> None:
        self._db.execute("DELETE FROM bitmaps WHERE owner=? AND kind=?", (owner, kind))


class Metadata:
    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, DB_NAME)
        self.lock = threading.Lock()
        self.commit_failures = 0  # transactions SQLite refused (metrics; under ``lock``)
        if os.path.exists(self.path):
            version = check_existing(self.path)
            self._db = self._connect()
            if version < SCHEMA_VERSION:
                self._migrate(version)
        else:
            self._db = self._connect()
            self._create()

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None,
                                 check_same_thread=False, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.create_function("popcount", 1, popcount, deterministic=True)
            return db
        except sqlite3.Error as e:
            raise MetadataError(f"cannot open metadata {self.path}: {e}") from e

    def _create(self) -> None:
        with self.transaction() as tx:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    tx._db.execute(stmt)
            tx._db.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                           (str(SCHEMA_VERSION),))
            tx._db.execute("INSERT INTO meta VALUES ('created', ?)", (str(time.time()),))

    def _migrate(self, version: int) -> None:
        """Bring a database of an older schema version forward, one
        transaction per version step."""
        while version < SCHEMA_VERSION:
            log.warning("metadata %s: schema version %d -> %d", self.path, version, version + 1)
            try:
                with self.transaction() as tx:
                    for stmt in _MIGRATIONS[version].split(";"):
                        if stmt.strip():
                            tx._db.execute(stmt)
            except MetadataError as e:  # e.g. a full disk: the WAL holds a copy of the maps
                raise MetadataError(f"bringing {self.path} from schema version {version} to "
                                    f"{version + 1} failed, nothing changed: {e.message}") from e
            version += 1

    def close(self) -> None:
        with self.lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One atomic, durable transaction; MetadataError if it fails."""
        with self.lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise MetadataError(f"metadata {self.path}: {e}") from e
            try:
                yield Transaction(self._db)
                if faults.armed is not None:
                    faults.hit("metadata.commit")
                self._db.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    self.commit_failures += 1
                    raise MetadataError(f"metadata commit failed ({self.path}): {e}") from e
                raise

    # -- reads -----------------------------------------------------------
    def volumes(self) -> list[VolumeRecord]:
        with self.lock:
            rows = self._db.execute(
                "SELECT name, size, extent_size, source, clone_state, remote, created"
                " FROM volumes ORDER BY name").fetchall()
        return [VolumeRecord(*r) for r in rows]

    def jobs(self) -> list[JobRecord]:
        with self.lock:
            rows = self._db.execute(
                "SELECT source, kind, clone, state, protected, total_extents,"
                " copied_bytes, on_demand, rate_limit, error, started, undo,"
                " protected_extents FROM jobs").fetchall()
        return [JobRecord(*r[:4], bool(r[4]), *r[5:11], bool(r[11]), r[12]) for r in rows]

    def map_counts(self) -> dict[tuple[str, str], int]:
        """Every stored map's count of set bits, by (owner, kind), read
        without its pages (``nset`` lies before the blob in each row)."""
        with self.lock:
            rows = self._db.execute(
                "SELECT owner, kind, sum(nset) FROM bitmaps GROUP BY owner, kind").fetchall()
        return {(owner, kind): n for owner, kind, n in rows}

    def map_count(self, owner: str, kind: str) -> int | None:
        """One stored map's count of set bits (None: no page stored), read
        through the primary key, without its pages."""
        with self.lock:
            (n,) = self._db.execute("SELECT sum(nset) FROM bitmaps WHERE owner=? AND kind=?",
                                    (owner, kind)).fetchone()
        return n

    def load_bitmap(self, owner: str, kind: str, nbits: int) -> Bitmap:
        bm = Bitmap(nbits, key=(owner, kind))
        with self.lock:
            rows = self._db.execute(
                "SELECT page, bits FROM bitmaps WHERE owner=? AND kind=?",
                (owner, kind)).fetchall()
        for page, data in rows:
            bm.load_page(page, data)
        return bm


def check_state_dir(state_dir: str) -> None:
    """Refuse, read-only, a state directory whose database is not ours;
    no database yet is fine (the daemon creates one).  For ``serve``,
    before nbdkit starts: the quick checks only, as the engine's open
    checks the whole file again (``quick_check`` reads every page: 0.4 s
    for a 1 GiB database, which start-up would pay twice)."""
    path = os.path.join(state_dir, DB_NAME)
    if os.path.exists(path):
        check_existing(path, integrity=False)


def check_existing(path: str, integrity: bool = True) -> int:
    """Refuse, read-only, a file that is not our database of a version we
    know (this one or an older one, which opening brings forward), or
    (``integrity``) one that SQLite's ``quick_check`` finds damaged;
    returns the version."""
    not_ours = (f"{path} is not a lunclone metadata database ({{}}); "
                "restore it from a backup or move it away")
    try:
        with open(path, "rb") as f:
            header = f.read(16)
        if header != b"SQLite format 3\x00":
            raise MetadataError(not_ours.format("bad header"))
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if integrity and db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise MetadataError(f"{path} is corrupt (quick_check failed); "
                                    "restore it from a backup")
            if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
                          ).fetchone() is None:
                raise MetadataError(not_ours.format("no meta table"))
            row = db.execute(
                "SELECT value FROM meta WHERE key='schema_version'").fetchone()
        finally:
            db.close()
    except OSError as e:
        raise MetadataError(f"cannot read {path}: {e.strerror}") from e
    except sqlite3.Error as e:
        raise MetadataError(f"{path} is corrupt or unreadable: {e}; "
                            "restore it from a backup or move it away") from e
    known = [str(v) for v in range(1, SCHEMA_VERSION + 1)]
    if row is None or row[0] not in known:
        raise MetadataError(
            f"{path} has schema version {row[0] if row else 'none'}, this lunclone "
            f"knows {SCHEMA_VERSION} and older; use a matching lunclone")
    return int(row[0])
