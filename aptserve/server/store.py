"""Video job store: job metadata in SQLite and finished MP4s as files under one data directory.

Stdlib only, so it can be used (and tested) without the web stack. One connection serves every thread, serialised
by a lock; jobs survive a restart through `recover()`, and old jobs go away through `cleanup_expired()`. A database
that fails its integrity check at start is moved aside (never deleted) and replaced by an empty one; a write the disk
refuses raises `StorageError`, and `writable` says whether the data dir takes writes (`probe()` checks again).

Transitions (anything else leaves the job untouched and returns None, exactly as if it did not exist):
    queued      -> in_progress  mark_started (attempts += 1)
    in_progress -> in_progress  set_progress
    in_progress -> completed    mark_completed
    queued | in_progress -> failed  mark_failed
    in_progress -> queued       requeue
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

QUEUED = "queued"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED)

SCHEMA_VERSION = 3
DATABASE = "jobs.sqlite3"
_ID_RE = re.compile(r"video_[0-9a-f]{32}")
log = logging.getLogger("aptserve.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,  -- explicit, so VACUUM cannot renumber it: ties on created_at sort by insertion
    id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, progress INTEGER NOT NULL,
    created_at INTEGER NOT NULL, completed_at INTEGER, expires_at INTEGER,
    model TEXT NOT NULL, prompt TEXT NOT NULL, size TEXT NOT NULL, seconds TEXT NOT NULL,
    seed INTEGER NOT NULL, steps INTEGER NOT NULL, fps INTEGER NOT NULL,
    error_code TEXT, error_message TEXT, attempts INTEGER NOT NULL, bytes INTEGER NOT NULL,
    revised_prompt TEXT,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created_at ON jobs (created_at, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created_at, seq);
"""
# From schema version n to n + 1; an old database keeps its jobs (those from before owners belong to no key).
_UPGRADES = {
    1: "ALTER TABLE jobs ADD COLUMN revised_prompt TEXT;",
    2: "ALTER TABLE jobs ADD COLUMN owner TEXT; CREATE INDEX jobs_owner ON jobs (owner, created_at, seq);",
}
# SQLite primary result codes that mean the disk refused a write: FULL; READONLY, IOERR, CANTOPEN. The rest are bugs,
# contention or damage.
_SQLITE_FULL, _SQLITE_STORAGE = 13, {8, 10, 14}
_OS_FULL, _OS_STORAGE = {errno.ENOSPC, errno.EDQUOT}, {errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class StorageError(Exception):
    """The data dir refused a write: `full` (no space left: 507) or not writable (read-only, I/O error: 503)."""

    def __init__(self, full: bool, detail: str):
        super().__init__(detail)
        self.full = full

    @property
    def code(self) -> str:
        return "storage_full" if self.full else "storage_unavailable"


class DatabaseUnavailable(Exception):
    """The shared job database could not be reached for this operation (503); the next one connects again."""


def storage_fault(exc: BaseException) -> StorageError | None:
    """The storage fault an OS or SQLite error stands for, or None when it is something else."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code == _SQLITE_FULL or code in _SQLITE_STORAGE:
            return StorageError(code == _SQLITE_FULL, f"job database: {exc}")
    if isinstance(exc, OSError) and exc.errno in _OS_FULL | _OS_STORAGE:
        return StorageError(exc.errno in _OS_FULL, str(exc))
    return None


def new_job_id() -> str:
    """A fresh job id shaped like OpenAI's: "video_" + 32 hex digits."""
    return "video_" + uuid.uuid4().hex


@dataclass(kw_only=True)
class VideoJob:
    """One video generation job as stored; timestamps are unix seconds."""

    id: str = field(default_factory=new_job_id)
    status: str = QUEUED
    progress: int = 0
    created_at: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    model: str
    prompt: str
    size: str  # "WxH"
    seconds: str  # a string, as the OpenAI API spells it
    seed: int
    steps: int
    fps: int
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0  # times a worker started it; bounds retries after crashes
    bytes: int = 0  # MP4 size, 0 until completed
    revised_prompt: str | None = None  # the prompt the model was given, where the server completed it
    owner: str | None = None  # keyed hash of the creating API key (auth.KeyRing.owner_of); None on an open server


_COLUMNS = tuple(f.name for f in fields(VideoJob))
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"


class JobStore:
    """Thread-safe job metadata (SQLite) plus MP4 files in `data_dir/videos/`."""

    shared_queue = False  # one process runs every job it stores (pgstore.PgJobStore: replicas claim them)
    _duplicate: type[Exception] = sqlite3.IntegrityError

    def __init__(self, data_dir: str | Path, ttl_seconds: float = 86400, clock: Callable[[], float] = time.time):
        self._open_data_dir(data_dir, ttl_seconds, clock)
        self._conn = self._open_checked(self.data_dir / DATABASE)

    def _open_data_dir(self, data_dir: str | Path, ttl_seconds: float, clock: Callable[[], float]) -> None:
        """The file side every store shares: `data_dir/videos/` created and probed for writes (StorageError if not)."""
        if ttl_seconds < 0:
            raise ValueError(f"ttl_seconds must be >= 0, got {ttl_seconds}")
        self.data_dir = Path(data_dir)
        self.videos_dir = self.data_dir / "videos"
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self.fault: StorageError | None = None  # the last write the data dir refused, until a probe succeeds
        try:
            self.videos_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_fault(exc) or StorageError(False, str(exc)) from exc
        if self.probe() is not None:
            raise self.fault

    def _open_checked(self, path: Path) -> sqlite3.Connection:
        """Connect; a database that fails its integrity check is moved aside (never deleted) for an empty one. Either
        way, or when the database was missing, finished videos without a row stay until their TTL."""
        existed = path.exists() and path.stat().st_size > 0
        try:
            return self._connect(path)
        except sqlite3.DatabaseError as exc:
            if (fault := storage_fault(exc)) is not None:
                raise fault from exc
            if not _is_damage(exc):
                raise
            moved = self._move_aside(path)
            log.error(
                "JOB DATABASE DAMAGED: %s failed its integrity check (%s); moved it to %s and started an empty one. "
                "Its jobs are no longer listed; their videos stay in %s until their TTL.",
                path,
                exc,
                moved.name,
                self.videos_dir,
            )
            return self._connect(path)
        finally:
            if not existed and any(self.videos_dir.glob("*.mp4")):
                log.warning(
                    "job database %s was missing or empty while %s holds finished videos: they stay, unlisted, until "
                    "their TTL",
                    path,
                    self.videos_dir,
                )

    def _connect(self, path: Path) -> sqlite3.Connection:
        # Autocommit mode: writes open explicit transactions in `_write`, so nothing stays half-open between calls.
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise DatabaseDamaged(" ".join(problems[:3]).replace("\n", " "))
            conn.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL survives a process crash; a power loss may drop the last commits but never corrupts.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _move_aside(self, path: Path) -> Path:
        """Rename the database and its write-ahead log to `<name>.damaged-<UTC time>[-wal|-shm]`."""
        target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        while target.exists():  # two starts within a second: never overwrite an earlier copy
            target = target.with_name(target.name + "+")
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}{suffix}", f"{target}{suffix}")
        os.replace(path, target)
        return target

    @property
    def writable(self) -> bool:
        """False from a write the data dir refused until a probe succeeds: /readyz says not ready meanwhile."""
        return self.fault is None

    def probe(self) -> StorageError | None:
        """Write and sync a small unnamed file in the data dir and in videos/; sets and returns `fault`."""
        try:
            for folder in (self.data_dir, self.videos_dir):
                with tempfile.TemporaryFile(dir=folder) as f:
                    f.write(b"probe")
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            self.fault = storage_fault(exc) or StorageError(False, str(exc))
        else:
            self.fault = None
        return self.fault

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a read-then-write cannot interleave with another process.
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:  # a full disk may have ended the transaction already
                        with contextlib.suppress(sqlite3.Error):
                            self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if (fault := storage_fault(exc)) is None:
                    raise
                self.fault = fault
                raise fault from exc

    def _select(self, where: str, params: tuple = ()) -> list[VideoJob]:
        rows = self._conn.execute(f"{_SELECT} {where}", params).fetchall()
        return [VideoJob(**dict(zip(_COLUMNS, row))) for row in rows]

    def _now(self) -> int:
        return int(self._clock())

    # -- records --

    def create(self, job: VideoJob) -> VideoJob:
        """Insert a new job; a zero `created_at` is filled from the clock. Returns the stored record."""
        _check_id(job.id)
        if job.status not in STATUSES:
            raise ValueError(f"unknown status {job.status!r}; expected one of {STATUSES}")
        job = replace(job, created_at=job.created_at or self._now())
        try:
            with self._write() as conn:
                placeholders = ", ".join("?" * len(_COLUMNS))
                values = tuple(getattr(job, name) for name in _COLUMNS)
                conn.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", values)
        except self._duplicate as e:
            raise ValueError(f"job {job.id} already exists") from e
        return job

    def get(self, job_id: str) -> VideoJob | None:
        with self._lock:
            jobs = self._select("WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    def list(
        self, after: str | None = None, limit: int = 20, order: str = "desc", owner: str | None = None
    ) -> tuple[list[VideoJob], bool]:
        """One page of jobs by creation time, starting after job id `after`; returns (page, has_more). With `owner`,
        only that owner's jobs (and `after` must be one of them); without, every job."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        if not 1 <= limit <= 100:
            raise ValueError(f"limit must be between 1 and 100, got {limit}")
        direction, compare = ("ASC", ">") if order == "asc" else ("DESC", "<")
        conditions, params = ([], []) if owner is None else (["owner = ?"], [owner])
        with self._lock:
            if after is not None:
                where = " AND ".join(["id = ?", *conditions])
                cursor = self._conn.execute(f"SELECT created_at, seq FROM jobs WHERE {where}", (after, *params))
                if (row := cursor.fetchone()) is None:
                    raise KeyError(after)
                conditions.append(f"(created_at, seq) {compare} (?, ?)")
                params += row
            where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
            # One extra row tells whether another page exists.
            order_by = f"ORDER BY created_at {direction}, seq {direction} LIMIT ?"
            jobs = self._select(f"{where} {order_by}", (*params, limit + 1))
        return jobs[:limit], len(jobs) > limit

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | dict(rows)

    # -- transitions: one guarded UPDATE each; None if the job is gone or not in a source state --

    def _transition(
        self, job_id: str, sources: tuple[str, ...], assignments: str, params: tuple, drop_files: bool = False
    ) -> VideoJob | None:
        in_sources = ", ".join("?" * len(sources))
        with self._write() as conn:
            sql = f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({in_sources})"
            if conn.execute(sql, (*params, job_id, *sources)).rowcount == 0:
                return None
            if drop_files:  # under the lock, so a worker that restarts the job cannot have written anything yet
                self._remove_files(job_id)
            return self._select("WHERE id = ?", (job_id,))[0]

    def mark_started(self, job_id: str, revised_prompt: str | None = None) -> VideoJob | None:
        """Queued -> in_progress; `revised_prompt` is what the worker encoded, where it differs from the prompt."""
        sets = "status = ?, attempts = attempts + 1, progress = 0, revised_prompt = ?"
        return self._transition(job_id, (QUEUED,), sets, (IN_PROGRESS, revised_prompt))

    def set_progress(self, job_id: str, progress: int) -> VideoJob | None:
        if not 0 <= progress <= 100:
            raise ValueError(f"progress must be between 0 and 100, got {progress}")
        return self._transition(job_id, (IN_PROGRESS,), "progress = ?", (progress,))

    def mark_completed(self, job_id: str, size_bytes: int) -> VideoJob | None:
        """Completion requires in_progress; call `finalize_file` first so the content exists before the status."""
        now = self._now()
        sets = "status = ?, progress = 100, completed_at = ?, expires_at = ?, bytes = ?"
        return self._transition(job_id, (IN_PROGRESS,), sets, (COMPLETED, now, self._expiry(now), size_bytes))

    def mark_failed(self, job_id: str, code: str, message: str) -> VideoJob | None:
        """Fail a queued or running job; any file it left is removed, since a failed job has no content."""
        now = self._now()
        sets = "status = ?, completed_at = ?, expires_at = ?, error_code = ?, error_message = ?"
        params = (FAILED, now, self._expiry(now), code, message)
        return self._transition(job_id, (QUEUED, IN_PROGRESS), sets, params, drop_files=True)

    def requeue(self, job_id: str) -> VideoJob | None:
        """Put a running job back in the queue (attempts kept); its partial output is discarded."""
        return self._transition(job_id, (IN_PROGRESS,), "status = ?, progress = 0", (QUEUED,), drop_files=True)

    def _expiry(self, now: int) -> int:
        return int(now + self._ttl)

    # -- files --

    def video_path(self, job_id: str) -> Path:
        _check_id(job_id)  # ids reach file names, so nothing but our own format may pass
        return self.videos_dir / f"{job_id}.mp4"

    def partial_path(self, job_id: str) -> Path:
        return self.video_path(job_id).with_name(f"{job_id}.mp4.part")

    def finalize_file(self, job_id: str) -> int:
        """Atomically move the finished `.part` file to the final path; returns its size in bytes.

        FileNotFoundError if there is no `.part` file, e.g. because the job was deleted or failed meanwhile.
        """
        partial, final = self.partial_path(job_id), self.video_path(job_id)
        # fsync before the rename: otherwise a power loss can leave the new name pointing at missing data.
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        with (
            self._lock
        ):  # so mark_failed/requeue/delete, which remove files under it, see before or after, never between
            os.replace(partial, final)
        _fsync_dir(self.videos_dir)
        return size

    def _remove_files(self, job_id: str) -> None:
        for path in (self.partial_path(job_id), self.video_path(job_id)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # a read-only disk: the orphan sweep or the TTL removes it later
                log.warning("could not remove %s: %s", path.name, exc.strerror)

    # -- housekeeping --

    def delete(self, job_id: str) -> VideoJob | None:
        """Remove a job's row and files; returns the deleted job, or None if there was none."""
        with self._write() as conn:
            jobs = self._select("WHERE id = ?", (job_id,))
            if not jobs:
                return None
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            # A worker still running may write a new .part after this; cleanup_expired removes such orphans.
            self._remove_files(job_id)
        return jobs[0]

    def recover(self, max_attempts: int = 3) -> tuple[list[VideoJob], list[VideoJob]]:
        """At startup, before any worker runs: requeue or fail interrupted jobs; returns (to_queue, failed_now)."""
        now = self._now()
        fail = "status = ?, completed_at = ?, expires_at = ?, error_code = ?, error_message = ?"
        with self._write() as conn:
            interrupted = self._select("WHERE status = ?", (IN_PROGRESS,))
            exhausted = [job for job in interrupted if job.attempts >= max_attempts]
            for job in exhausted:
                message = f"the server restarted during generation too many times ({job.attempts} attempts); giving up"
                conn.execute(
                    f"UPDATE jobs SET {fail} WHERE id = ?",
                    (FAILED, now, self._expiry(now), "interrupted", message, job.id),
                )
            conn.execute("UPDATE jobs SET status = ?, progress = 0 WHERE status = ?", (QUEUED, IN_PROGRESS))
            queued = self._select("WHERE status = ? ORDER BY created_at, seq", (QUEUED,))
            failed_now = [self._select("WHERE id = ?", (job.id,))[0] for job in exhausted]
        # Nothing is being written now, so every partial file is debris; so is a final file of an unfinished job.
        for path in self.videos_dir.glob("*.mp4.part"):
            path.unlink(missing_ok=True)
        for job in interrupted:
            self.video_path(job.id).unlink(missing_ok=True)
        return queued, failed_now

    def cleanup_expired(self) -> int:
        """Delete finished jobs past expires_at (rows and files) and files with no row; returns jobs removed."""
        with self._write() as conn:
            where = "WHERE status IN (?, ?) AND expires_at <= ?"
            params = (COMPLETED, FAILED, self._clock())
            expired = self._select(where, params)
            conn.execute(f"DELETE FROM jobs {where}", params)
        for job in expired:
            self._remove_files(job.id)
        self._remove_orphans()
        return len(expired)

    def _remove_orphans(self) -> None:
        # List files before reading ids: a job's row exists before its file, so a new job is never taken for an orphan.
        files = [p for p in self.videos_dir.iterdir() if p.name.endswith((".mp4", ".mp4.part"))]
        with self._lock:
            known = {row[0] for row in self._conn.execute("SELECT id FROM jobs")}
        # A .part file without a row is debris of a deleted job. A finished MP4 without one (its database was lost or
        # moved aside) is still content: it goes only once its TTL has passed since it was written.
        written_before = self._clock() - self._ttl
        for path in files:
            if path.name.split(".", 1)[0] in known:
                continue
            with contextlib.suppress(OSError):
                if path.name.endswith(".part") or path.stat().st_mtime <= written_before:
                    path.unlink()


class DatabaseDamaged(sqlite3.DatabaseError):
    """The job database failed its integrity check."""


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    # SQLITE_CORRUPT (11), SQLITE_NOTADB (26): the file is not a sound database; anything else is not damage.
    return isinstance(exc, DatabaseDamaged) or (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (11, 26)


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"job database schema {version} is newer than this aptserve supports ({SCHEMA_VERSION})")
    if version < SCHEMA_VERSION:
        steps = _SCHEMA if version == 0 else "".join(_UPGRADES[v] for v in range(version, SCHEMA_VERSION))
        # One transaction: the columns and the version move together.
        conn.executescript(f"BEGIN; {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")


def _check_id(job_id: str) -> None:
    if not _ID_RE.fullmatch(job_id):
        raise ValueError(f"invalid job id {job_id!r}; expected 'video_' followed by 32 hex digits")


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable (POSIX); where a directory cannot be opened there is nothing to do.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
