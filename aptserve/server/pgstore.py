"""The job store of several replicas: job rows in PostgreSQL (`APTSERVE_DATABASE_URL`), MP4s on the shared data dir.

The same store as `store.JobStore` (its queries run here through a `?` -> `%s` adapter), plus a shared queue: every
replica claims queued jobs with `SELECT ... FOR UPDATE SKIP LOCKED` and holds each under a lease it renews while the
job is queued or running locally. A job whose lease expired (its replica died) is claimed again by another replica,
or failed once it has started `max_attempts` times. Every transition of a running job requires the lease, so a job
is never completed twice; a job deleted or taken over elsewhere is cancelled at its replica's next heartbeat.
Imported only when a database URL is set, so the server runs without psycopg.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import psycopg.errors

from aptserve.server.store import FAILED, IN_PROGRESS, QUEUED, DatabaseUnavailable, JobStore, VideoJob

log = logging.getLogger("aptserve.store")

_LOCK_KEY = 0x61707473  # advisory lock: replicas starting together create the schema once
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, progress INTEGER NOT NULL,
    created_at BIGINT NOT NULL, completed_at BIGINT, expires_at BIGINT,
    model TEXT NOT NULL, prompt TEXT NOT NULL, size TEXT NOT NULL, seconds TEXT NOT NULL,
    seed BIGINT NOT NULL, steps INTEGER NOT NULL, fps INTEGER NOT NULL,
    error_code TEXT, error_message TEXT, attempts INTEGER NOT NULL, bytes BIGINT NOT NULL,
    revised_prompt TEXT, owner TEXT,
    lease_owner TEXT, lease_expires_at TIMESTAMPTZ  -- the replica holding the job, until when
);
CREATE INDEX IF NOT EXISTS jobs_created_at ON jobs (created_at, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created_at, seq);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (created_at, seq) WHERE status IN ('queued', 'in_progress');
CREATE TABLE IF NOT EXISTS aptserve_meta (name TEXT PRIMARY KEY, value BYTEA NOT NULL);
"""
_UNHELD = "(lease_owner IS NULL OR lease_expires_at < now())"
_LEASE = "now() + make_interval(secs => ?)"


class _QmarkConnection:
    """A psycopg connection (autocommit) that takes the `?` placeholders of the SQLite store's queries.

    A connection the server closed (a restart, a failover, an idle timeout in a proxy) fails the operation that finds
    it so, as DatabaseUnavailable; the next operation opens a new one. A transaction never spans two connections."""

    def __init__(self, url: str, connect_timeout_s: int = 10):
        self.url, self.connect_timeout_s = url, connect_timeout_s
        self.raw = self._connect()
        self._in_transaction = False

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"cannot connect to the job database: {exc}") from exc

    def _reopen_if_lost(self) -> None:
        if (self.raw.closed or self.raw.broken) and not self._in_transaction:
            self.raw.close()
            self.raw = self._connect()
            log.warning("the job database connection was lost: reconnected")

    def execute(self, sql: str, params: tuple | list = ()) -> psycopg.Cursor:
        self._reopen_if_lost()
        try:
            return self.raw.execute(sql.replace("?", "%s"), params)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise DatabaseUnavailable(f"job database: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_QmarkConnection]:
        self._reopen_if_lost()
        self._in_transaction = True
        try:
            with self.raw.transaction():
                yield self
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:  # the commit, or a rollback after a loss
            raise DatabaseUnavailable(f"job database: {exc}") from exc
        finally:
            self._in_transaction = False

    def close(self) -> None:
        self.raw.close()


class PgJobStore(JobStore):
    """Job rows in PostgreSQL shared by replicas; MP4s in `data_dir/videos/`, which every replica mounts."""

    shared_queue = True
    _duplicate = psycopg.errors.UniqueViolation

    def __init__(
        self,
        url: str,
        data_dir: str | Path,
        ttl_seconds: float = 86400,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self._open_data_dir(data_dir, ttl_seconds, clock)
        self.lease_s = lease_s
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._conn = _QmarkConnection(url)
        with self._write() as conn:
            conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
            conn.raw.execute(_SCHEMA)

    @contextlib.contextmanager
    def _write(self) -> Iterator[_QmarkConnection]:
        with self._lock, self._conn.transaction() as conn:
            yield conn

    def shared_secret(self, candidate: bytes) -> bytes:
        """The owner-hash secret every replica uses: the first one stored (`candidate` if none is yet)."""
        with self._write() as conn:
            conn.execute("INSERT INTO aptserve_meta VALUES ('owner_secret', ?) ON CONFLICT DO NOTHING", (candidate,))
            return bytes(conn.execute("SELECT value FROM aptserve_meta WHERE name = 'owner_secret'").fetchone()[0])

    def partial_path(self, job_id: str) -> Path:
        # One per replica: a replica that lost its lease unnoticed never writes into its successor's file.
        return self.video_path(job_id).with_name(f"{job_id}.{self.replica.replace(':', '-')}.mp4.part")

    def _transition(
        self, job_id: str, sources: tuple[str, ...], assignments: str, params: tuple, drop_files: bool = False
    ) -> VideoJob | None:
        """A transition of a job this replica holds; None if it is gone, elsewhere, or not in a source state."""
        with self._write() as conn:
            sql = f"UPDATE jobs SET {assignments} WHERE id = ? AND status = ANY(?) AND lease_owner = ?"
            if conn.execute(sql, (*params, job_id, list(sources), self.replica)).rowcount == 0:
                return None
            if drop_files:
                self._remove_files(job_id)
            return self._select("WHERE id = ?", (job_id,))[0]

    def mark_completed(self, job_id: str, size_bytes: int) -> VideoJob | None:
        job = super().mark_completed(job_id, size_bytes)
        if job is None and self.get(job_id) is None:  # deleted while it ran: its video must not outlive it
            self._remove_files(job_id)
        return job

    def requeue(self, job_id: str) -> VideoJob | None:
        """Give a job this replica holds back to the shared queue (attempts kept); its partial output is discarded."""
        sets = "status = ?, progress = 0, lease_owner = NULL, lease_expires_at = NULL"
        return self._transition(job_id, (QUEUED, IN_PROGRESS), sets, (QUEUED,), drop_files=True)

    def recover(self, max_attempts: int = 3) -> tuple[list[VideoJob], list[VideoJob]]:
        """Nothing to do at start: jobs of a replica that stopped are claimed again once their lease expires."""
        return [], []

    def claim(self, limit: int, max_attempts: int) -> tuple[list[VideoJob], list[VideoJob]]:
        """Take up to `limit` jobs nobody holds (queued, or their replica's lease expired), oldest first, skipping rows
        other replicas are claiming; returns (claimed, failed_now): a job that started `max_attempts` times fails."""
        now = self._now()
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT id, status, attempts FROM jobs WHERE status = ANY(?) AND {_UNHELD} "
                "ORDER BY created_at, seq LIMIT ? FOR UPDATE SKIP LOCKED",
                ([QUEUED, IN_PROGRESS], limit),
            ).fetchall()
            exhausted = [
                job_id for job_id, status, attempts in rows if status == IN_PROGRESS and attempts >= max_attempts
            ]
            taken = [row[0] for row in rows if row[0] not in exhausted]
            conn.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, expires_at = ?, error_code = ?, "
                "error_message = 'its replica stopped during generation too many times (' || attempts || "
                "' attempts); giving up', lease_owner = NULL WHERE id = ANY(?)",
                (FAILED, now, self._expiry(now), "interrupted", exhausted),
            )
            conn.execute(
                f"UPDATE jobs SET status = ?, progress = 0, lease_owner = ?, lease_expires_at = {_LEASE} "
                "WHERE id = ANY(?)",
                (QUEUED, self.replica, self.lease_s, taken),
            )
            claimed = self._select("WHERE id = ANY(?) ORDER BY created_at, seq", (taken,))
            failed = self._select("WHERE id = ANY(?)", (exhausted,))
        for job_id in taken + exhausted:  # what a replica that stopped left behind
            for path in self.videos_dir.glob(f"{job_id}.*.mp4.part"):
                path.unlink(missing_ok=True)
        return claimed, failed

    def backlog(self) -> int:
        """Jobs waiting that no replica holds: the shared queue's depth, what autoscaling adds replicas for."""
        with self._lock:
            row = self._conn.execute(f"SELECT count(*) FROM jobs WHERE status = ? AND {_UNHELD}", (QUEUED,)).fetchone()
        return int(row[0])

    def renew(self, job_ids: list[str]) -> set[str]:
        """Extend this replica's leases on `job_ids`; returns those it still holds (not deleted, not taken over)."""
        with self._write() as conn:
            rows = conn.execute(
                f"UPDATE jobs SET lease_expires_at = {_LEASE} WHERE id = ANY(?) AND lease_owner = ? AND status = ANY(?) "
                "RETURNING id",
                (self.lease_s, job_ids, self.replica, [QUEUED, IN_PROGRESS]),
            ).fetchall()
        return {row[0] for row in rows}
