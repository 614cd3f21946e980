"""Limits and quotas: requests and streamed chat tokens per API key and minute (`RateLimit`, an ASGI
middleware, and `check_chat_tokens`/`count_chat_tokens`), a tenant's live jobs and queued GPU-hours
(`check_job_quota`). Over a limit → 429 `rate_limit_error` with `Retry-After`; every limit is 0 (off)
by default (service/settings.py).

Counts are per fixed window of `rate_window_s` seconds (a minute unless a test sets another), by the
clock `Counter` is given (service/clock.py: the system clock unless a test passes its own), in Redis
when REDIS_URL is set (INCRBY + EXPIRE: every API process shares them) or else in the database
(`rate_counters`, one upsert). A key is counted by the SHA-256 of the key as presented (what `api_keys`
stores), so counting needs no lookup, and one key's traffic never touches another's count.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.api.answers import error_response
from service.clock import Clock, system_clock
from service.db.models import Job, RateCounter
from service.errors import RateLimitedError, UnauthenticatedError
from service.jobs.states import ACTIVE
from service.services.keys import token_hash
from service.settings import Settings

logger = logging.getLogger(__name__)


def window(now: float, length_s: int) -> tuple[int, int]:
    """(the number of the window `now` falls in, seconds until it ends, at least 1): windows of
    `length_s` seconds, the first starting at the epoch."""
    return int(now // length_s), max(1, math.ceil(length_s - now % length_s))


def rate_key(authorization: str | None) -> str | None:
    """Who a request is counted as: the stored hash of its bearer key (None without a well-formed one:
    the route answers 401)."""
    try:
        return token_hash(authorization)[:40]
    except UnauthenticatedError:
        return None


class Counter:
    """Per-window counts shared by every API process: Redis when configured, else the database."""

    def __init__(self, settings: Settings, *, clock: Clock = system_clock) -> None:
        self.settings, self.clock = settings, clock
        self.window_s = settings.rate_window_s
        self._redis: Any = None

    async def add(self, name: str, n: int) -> tuple[int, int]:
        """Add `n` to `name`'s count of this window; returns (the count, seconds left in the window)."""
        number, left = window(self.clock(), self.window_s)
        if self.settings.redis_url:
            if self._redis is None:
                import redis.asyncio as aioredis

                self._redis = aioredis.Redis.from_url(self.settings.redis_url)
            key = f"rlhf:rate:{name}:{number}"
            async with self._redis.pipeline(transaction=True) as pipe:
                count, _ = await pipe.incrby(key, n).expire(key, 2 * self.window_s).execute()
            return int(count), left
        return await asyncio.to_thread(_db_add, self.settings.db_url, name, number, n), left


def _db_add(db_url: str, name: str, window: int, n: int) -> int:
    from service.db.session import session_scope

    with session_scope(db_url) as s:
        if s.get_bind().dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        stmt = insert(RateCounter).values(name=name, window=window, count=n)
        stmt = stmt.on_conflict_do_update(
            index_elements=["name", "window"], set_={"count": RateCounter.count + n}
        )
        count = int(s.execute(stmt.returning(RateCounter.count)).scalar_one())
        if random.random() < 0.01:  # old minutes are never read again
            s.execute(delete(RateCounter).where(RateCounter.window < window - 1))
    return count


def _too_many(what: str, limit: int, setting: str, left: int) -> RateLimitedError:
    return RateLimitedError(
        f"this API key has used its {limit} {what} per minute ({setting}); retry after {left} s",
        code="rate_limit_exceeded",
        retry_after=left,
    )


class RateLimit:
    """Requests per minute per key on every /v1 route (pure ASGI, before routing); answers carry
    OpenAI's `x-ratelimit-limit-requests` / `x-ratelimit-remaining-requests` headers."""

    def __init__(self, app: Any, *, counter: Counter, per_minute: int) -> None:
        self.app, self.counter, self.per_minute = app, counter, per_minute

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        who = rate_key(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
        if who is None:  # no key: the route answers 401
            await self.app(scope, receive, send)
            return
        try:
            count, left = await self.counter.add(f"req:{who}", 1)
        except Exception as e:  # the count's store is down: serve rather than refuse everyone
            logger.warning("rate limit not counted (%s: %s); request let through", type(e).__name__, e)
            await self.app(scope, receive, send)
            return
        if count > self.per_minute:
            over = _too_many("requests", self.per_minute, "RLHF_RATE_LIMIT_PER_MINUTE", left)
            response = error_response(
                over,
                headers={
                    "x-ratelimit-limit-requests": str(self.per_minute),
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": f"{left}s",
                },
            )
            await response(scope, receive, send)
            return
        extra = [
            (b"x-ratelimit-limit-requests", str(self.per_minute).encode()),
            (b"x-ratelimit-remaining-requests", str(self.per_minute - count).encode()),
            (b"x-ratelimit-reset-requests", f"{left}s".encode()),
        ]

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = message | {"headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, with_headers)


async def check_requests(counter: Counter, per_minute: int, authorization: str | None) -> None:
    """Count one request of this key (gRPC; the REST API counts in `RateLimit`)."""
    who = rate_key(authorization)
    if who is None:
        return
    count, left = await counter.add(f"req:{who}", 1)
    if count > per_minute:
        raise _too_many("requests", per_minute, "RLHF_RATE_LIMIT_PER_MINUTE", left)


async def check_chat_tokens(counter: Counter, settings: Settings, authorization: str | None) -> None:
    """Refuse a chat request once its key has streamed its tokens of this minute."""
    limit = settings.chat_tokens_per_minute
    if not limit or (who := rate_key(authorization)) is None:
        return
    used, left = await counter.add(f"tok:{who}", 0)
    if used >= limit:
        raise _too_many("streamed tokens", limit, "RLHF_CHAT_TOKENS_PER_MINUTE", left)


async def count_chat_tokens(
    counter: Counter, settings: Settings, authorization: str | None, tokens: int
) -> None:
    """Add a finished reply's completion tokens to its key's count of this minute."""
    if settings.chat_tokens_per_minute and tokens and (who := rate_key(authorization)) is not None:
        await counter.add(f"tok:{who}", tokens)


def check_job_quota(*, session: Session, tenant: str, settings: Settings, gpu_hours: float) -> None:
    """A tenant's live jobs and their estimated GPU-hours (the new job's `gpu_hours` included)."""
    if not settings.max_active_jobs and not settings.max_queued_gpu_hours:
        return
    live = select(func.count(), func.coalesce(func.sum(Job.estimated_seconds * Job.num_gpus), 0.0)).where(
        Job.tenant_id == tenant, Job.status.in_(ACTIVE)
    )
    count, gpu_seconds = session.execute(live).one()
    hours = float(gpu_seconds) / 3600
    if settings.max_active_jobs and count >= settings.max_active_jobs:
        raise RateLimitedError(
            f"this tenant has {count} live jobs, the limit of RLHF_MAX_ACTIVE_JOBS; retry once one "
            "has ended (or cancel one)",
            code="quota_active_jobs",
            retry_after=60,
        )
    if settings.max_queued_gpu_hours and hours + gpu_hours > settings.max_queued_gpu_hours:
        raise RateLimitedError(
            f"this job's estimated {gpu_hours:.2f} GPU-hours and the {hours:.2f} of this tenant's live "
            f"jobs exceed RLHF_MAX_QUEUED_GPU_HOURS ({settings.max_queued_gpu_hours:g}); retry once "
            "jobs have ended",
            code="quota_gpu_hours",
            retry_after=60,
        )
