"""Per-caller rate limiting of the endpoints that do work (``/predict``, ``/predict/batch``,
``/feedback``): past its allowance a caller gets 429 with ``Retry-After``.

The allowance is a token bucket of ``rate_limit_burst`` requests refilled at
``rate_limit_per_minute``, kept as GCRA (the generic cell rate algorithm): one "theoretical arrival
time" per caller, moved on by one interval per request only while it stays within the burst.
Callers are the presented API key (a short hash of it: keys are never stored or logged) or, without
keys, the client address.

A server of one process (the default) keeps the arrival times in a dict (:class:`LocalRateLimiter`).
With several worker processes they live in a SQLite file (WAL mode) that every worker opens, so a
pod's workers share one limit (:class:`RateLimiter`; each replica counts on its own,
docs/serving.md): a request is one ``INSERT … ON CONFLICT DO UPDATE … WHERE`` statement, without
fsync (``synchronous=OFF``: counts do not need to survive a crash). Measured on the 2-core
development host, that statement with the key's hash: p50 10 µs, p99 25 µs, mean 27 µs per request
(two processes on one file: 40 µs); under load, with the GIL handed back and forth around it, it
cost the event loop 0.1–0.15 ms per request, which is why one process does without it
(docs/experiments.md). The ``limits`` package was the library to prefer, but its storages are
per-process memory or a server (Redis, Memcached, MongoDB): sharing between a pod's workers would
have meant writing this storage for it anyway.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, Request

from catsdogs.serve.errors import ApiError
from catsdogs.serve.schemas import ErrorBody
from catsdogs.serve.security import presented_key, require_api_key
from catsdogs.settings import Settings

logger = logging.getLogger(__name__)

_SCHEMA = "CREATE TABLE IF NOT EXISTS buckets (caller TEXT PRIMARY KEY, tat REAL NOT NULL) WITHOUT ROWID"
# Allowed: the arrival time moves on by one interval and the row comes back. Refused: the WHERE
# fails, nothing changes and no row comes back.
_TAKE = (
    "INSERT INTO buckets (caller, tat) VALUES (:caller, :now + :interval) "
    "ON CONFLICT (caller) DO UPDATE SET tat = max(tat, :now) + :interval "
    "WHERE max(tat, :now) + :interval - :now <= :window RETURNING tat"
)
#: The OpenAPI description of the refusal, for the routers the limit applies to.
RATE_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorBody, "description": "too many requests from this caller (see `Retry-After`)"}
}
#: Forget callers idle for longer than a full bucket's refill, every this many requests.
_SWEEP_EVERY = 10_000


class _Gcra:
    """The allowance's arithmetic, whatever keeps the arrival times."""

    def __init__(self, *, per_minute: int, burst: int) -> None:
        self.interval = 60.0 / per_minute
        self.window = burst * self.interval

    def _wait(self, refused_tat: float, now: float) -> float:
        """Seconds until a request refused at ``now`` (it would have moved the time to
        ``refused_tat``) would pass."""
        return max(refused_tat - self.window - now, 0.001)


class RateLimiter(_Gcra):
    """A token bucket per caller, shared through a SQLite file by every process that opens it."""

    def __init__(self, path: Path | str, *, per_minute: int, burst: int) -> None:
        super().__init__(per_minute=per_minute, burst=burst)
        self._lock = threading.Lock()  # one connection per process, used from any thread
        self._db = sqlite3.connect(str(path), timeout=1.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(_SCHEMA)
        self._calls = 0

    def retry_after(self, caller: str, *, now: float | None = None) -> float:
        """0 when ``caller`` may go ahead (its request is counted); else the seconds to wait."""
        now = time.time() if now is None else now
        params = {"caller": caller, "now": now, "interval": self.interval, "window": self.window}
        try:
            with self._lock:
                self._calls += 1
                if self._calls % _SWEEP_EVERY == 0:
                    self._db.execute("DELETE FROM buckets WHERE tat < ?", (now,))
                if self._db.execute(_TAKE, params).fetchone() is not None:
                    return 0.0
                (tat,) = self._db.execute("SELECT tat FROM buckets WHERE caller = ?", (caller,)).fetchone()
        except sqlite3.Error as exc:  # a limiter that fails must not take the service down with it
            logger.warning("rate limit store unavailable, request let through: %s", exc)
            return 0.0
        return self._wait(tat + self.interval, now)

    def close(self) -> None:
        self._db.close()


class LocalRateLimiter(_Gcra):
    """The same buckets as :class:`RateLimiter` for a server of one process: a dict of arrival times.

    Called from the event loop only. Memory stays bounded: a caller idle for a full refill is
    forgotten at the next sweep (every ``_SWEEP_EVERY`` requests, or at once past ``max_callers``).
    """

    def __init__(self, *, per_minute: int, burst: int, max_callers: int = 100_000) -> None:
        super().__init__(per_minute=per_minute, burst=burst)
        self.max_callers = max_callers
        self._tat: dict[str, float] = {}
        self._calls = 0

    def retry_after(self, caller: str, *, now: float | None = None) -> float:
        """0 when ``caller`` may go ahead (its request is counted); else the seconds to wait."""
        now = time.time() if now is None else now
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0 or len(self._tat) >= self.max_callers:
            self._tat = {key: tat for key, tat in self._tat.items() if tat >= now}
        tat = max(self._tat.get(caller, now), now) + self.interval
        if tat - now <= self.window:
            self._tat[caller] = tat
            return 0.0
        return self._wait(tat, now)

    def close(self) -> None:
        self._tat.clear()


def build_rate_limiter(settings: Settings) -> RateLimiter | LocalRateLimiter | None:
    """The limiter the settings ask for; None when limiting is off.

    On by default (``rate_limit_per_minute``) for a service that others can reach: one with API keys
    or bound to a non-loopback address. A developer's loopback service without keys is not limited.
    """
    if not settings.rate_limit_per_minute or (settings.loopback_only and not settings.api_keys):
        return None
    per_minute, burst = settings.rate_limit_per_minute, settings.rate_limit_burst
    if settings.rate_limit_store is None:  # one server process: nobody to share the counts with
        return LocalRateLimiter(per_minute=per_minute, burst=burst)
    return RateLimiter(settings.rate_limit_store, per_minute=per_minute, burst=burst)


def caller_id(request: Request) -> str:
    """Who is counted: a short hash of the presented API key, else the client's address."""
    key = presented_key(request, "x-api-key")
    if key and request.app.state.service.api_keys:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "ip:" + (request.client.host if request.client else "unknown")


async def enforce_rate_limit(request: Request, _: None = Depends(require_api_key)) -> None:
    """429 with ``Retry-After`` once the caller is past its allowance (after authentication, so a
    wrong key is a 403 and only valid keys are counted)."""
    limiter: RateLimiter | LocalRateLimiter | None = request.app.state.rate_limiter
    if limiter is None:
        return
    caller = caller_id(request)
    wait = limiter.retry_after(caller)
    if wait > 0:
        logger.info("rate limited %s for %.1f s", caller, wait)
        seconds = str(math.ceil(wait))
        raise ApiError(
            429, "rate_limited", f"too many requests: retry in {seconds} s", headers={"Retry-After": seconds}
        )
