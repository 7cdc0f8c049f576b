"""Bearer-key authentication, job ownership and per-key rate limits. No keys configured means an open server (the app
warns at startup): every caller sees every job and nothing is rate-limited.

A job records its owner as HMAC-SHA256(server secret, key), never the key: the secret lives in the data dir
(`owner.key`, made once), so owners survive restarts while the database alone reveals no key."""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from aptserve.server.errors import APIError

SECRET_FILE = "owner.key"
SECRET_BYTES = 32


@dataclass(frozen=True)
class Caller:
    """Who is calling: `owner` is recorded on the jobs it creates (None on an open server); an admin sees them all."""

    owner: str | None = None
    admin: bool = False

    def sees(self, job_owner: str | None) -> bool:
        return self.admin or self.owner is None or job_owner == self.owner

    @property
    def scope(self) -> str | None:
        """The owner whose jobs a list shows; None: every job."""
        return None if self.admin else self.owner


@dataclass
class TokenBucket:
    """`rate` tokens a second, holding at most `capacity`."""

    rate: float
    capacity: float
    tokens: float
    at: float

    def take(self, now: float) -> float:
        """Take one token: 0 when granted, else the seconds until one is there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class KeyRing:
    """The configured keys, the owner each stands for, and one rate-limit bucket per key."""

    def __init__(
        self,
        api_keys: list[str],
        admin_keys: list[str],
        secret: bytes,
        per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._secret, self.per_minute, self._clock = secret, per_minute, clock
        admins = {self.owner_of(key): True for key in admin_keys}
        self._owners = {self.owner_of(key): False for key in api_keys} | admins  # owner hash -> admin
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def open(self) -> bool:
        return not self._owners

    def owner_of(self, key: str) -> str:
        """The keyed hash a job created with `key` records as its owner."""
        return hmac.new(self._secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def identify(self, presented: str | None) -> Caller | None:
        """The caller a key stands for; None for a missing or unknown key on a keyed server. Any text is compared
        (as its hash, in constant time), so no key, however odd, raises."""
        if self.open:
            return Caller()
        if presented is None:
            return None
        digest = self.owner_of(presented)
        for owner, admin in self._owners.items():
            if hmac.compare_digest(owner, digest):
                return Caller(owner, admin)
        return None

    def wait_s(self, caller: Caller) -> float:
        """Charge one request to the caller's key: 0 when within its rate, else the seconds to wait."""
        if caller.owner is None or self.per_minute == 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.setdefault(
            caller.owner, TokenBucket(self.per_minute / 60, self.per_minute, self.per_minute, now)
        )
        return bucket.take(now)


def owner_secret(data_dir: Path) -> bytes:
    """The server's secret for owner hashes: read from the data dir, or made there once (mode 0600)."""
    path = data_dir / SECRET_FILE
    if path.exists() and len(secret := path.read_bytes()) == SECRET_BYTES:
        return secret
    secret = secrets.token_bytes(SECRET_BYTES)
    partial = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)  # a crash never leaves a short secret behind
    return secret


def bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


def key_is_valid(keys: list[str], presented: str | None) -> bool:
    """Whether `presented` is one of `keys` (any when there are none); never raises, whatever the text."""
    if not keys:
        return True
    if presented is None:
        return False
    given = presented.encode("utf-8", "surrogatepass")
    return any(hmac.compare_digest(given, key.encode("utf-8", "surrogatepass")) for key in keys)


async def require_api_key(request: Request) -> Caller:
    """FastAPI dependency for every /v1 HTTP route: who is calling, charged to its key's rate limit."""
    services = request.app.state.services
    caller = services.keys.identify(bearer(request.headers.get("authorization")))
    if caller is None:
        services.metrics.error("auth")
        raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.", "invalid_api_key")
    if wait := services.keys.wait_s(caller):
        seconds = math.ceil(wait)
        raise APIError(
            429,
            f"Rate limit exceeded: this API key may make {services.keys.per_minute} requests per minute. "
            f"Retry in {seconds} s.",
            "rate_limit_exceeded",
            headers={"Retry-After": str(seconds)},
        )
    return caller
