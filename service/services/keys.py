"""API keys: random high-entropy tokens, stored as SHA-256 hashes, each bound to a tenant."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Tenant, utcnow
from service.errors import InvalidRequestError, NotFoundError, UnauthenticatedError

logger = logging.getLogger(__name__)
PREFIX = "sk-rlhf-"
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass
class Caller:
    tenant_id: str
    key_id: str
    operator: bool


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    *, session: Session, tenant: str, name: str = "", operator: bool = False
) -> tuple[ApiKey, str]:
    """A new key for `tenant` (created if new). The plain key is returned once and never stored."""
    if not TENANT_RE.fullmatch(tenant):
        raise InvalidRequestError("tenant: use 1-63 lowercase letters, digits, '-' or '_'", param="tenant")
    if session.get(Tenant, tenant) is None:
        session.add(Tenant(id=tenant))
        session.flush()
    plain = PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=tenant,
        key_hash=hash_key(plain),
        prefix=plain[: len(PREFIX) + 4],
        name=name,
        operator=operator,
    )
    session.add(key)
    session.flush()
    return key, plain


def list_keys(*, session: Session, tenant: str | None = None) -> list[ApiKey]:
    q = select(ApiKey).order_by(ApiKey.created_at)
    if tenant:
        q = q.where(ApiKey.tenant_id == tenant)
    return list(session.scalars(q))


def revoke_key(*, session: Session, key_id: str) -> ApiKey:
    """Mark the key revoked (the caller commits, then calls `announce_revoked`)."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFoundError(f"no API key {key_id}", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    _VERIFIED.pop(key.key_hash, None)
    return key


# A revocation reaches every API process within a second: it is published on Redis, and each process
# that caches keys listens (`listen_for_revocations`) and forgets the key; without Redis the cache's
# `auth_cache_s` bounds how long a revoked key keeps working.
REVOKED_CHANNEL = "rlhf:keys:revoked"
_LISTENING: set[str] = set()
_LISTEN_LOCK = threading.Lock()


def announce_revoked(key: ApiKey, redis_url: str) -> bool:
    """Tell every API process to forget `key` now (after the revocation is committed); False if
    Redis could not be reached (then the caches expire within auth_cache_s)."""
    if not redis_url:
        return False
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        client.publish(REVOKED_CHANNEL, key.key_hash)
        client.close()
    except redis.RedisError as e:
        logger.warning("revocation of %s not announced (%s); caches expire within auth_cache_s", key.id, e)
        return False
    return True


def listen_for_revocations(redis_url: str) -> None:
    """Start (once per process and Redis) a thread that forgets revoked keys as they are announced."""
    if not redis_url:
        return
    with _LISTEN_LOCK:
        if redis_url in _LISTENING:
            return
        _LISTENING.add(redis_url)
    threading.Thread(target=_listen, args=(redis_url,), daemon=True, name="key-revocations").start()


def _listen(redis_url: str) -> None:
    import redis

    while True:  # bounded: a daemon thread, listening for the life of the process
        try:
            client = redis.Redis.from_url(redis_url, socket_keepalive=True, health_check_interval=30)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(REVOKED_CHANNEL)
            _VERIFIED.clear()  # (re)subscribed: a revocation may have been missed meanwhile
            for message in pubsub.listen():
                data = message.get("data")
                if isinstance(data, bytes):
                    _VERIFIED.pop(data.decode(), None)
        except Exception as e:  # Redis away: retry; the cache's expiry is the fallback
            logger.info("listening for key revocations: %s; retrying", e)
            time.sleep(2)


# Verified keys, by hash, until a deadline: a request whose key was checked within
# `Settings.auth_cache_s` skips the database (a revoked key stops working within that time).
_VERIFIED: dict[str, tuple[Caller, float]] = {}
_VERIFIED_MAX = 10_000


def token_hash(authorization: str | None) -> str:
    if not authorization:
        raise UnauthenticatedError(
            "no API key: send 'Authorization: Bearer <key>' (create one with `rlhf keys create`)",
            code="missing_api_key",
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError("the Authorization header must be 'Bearer <key>'", code="invalid_api_key")
    return hash_key(token.strip())


def cached_caller(authorization: str | None, cache_s: float) -> Caller | None:
    """The caller of a key verified within the last `cache_s` (> 0), without touching the database;
    else None (then `authenticate`)."""
    if cache_s <= 0 or not authorization:
        return None
    try:
        hit = _VERIFIED.get(token_hash(authorization))
    except UnauthenticatedError:
        return None
    return hit[0] if hit is not None and hit[1] > time.monotonic() else None


def authenticate(*, session: Session, authorization: str | None, cache_s: float = 0.0) -> Caller:
    """The caller of an `Authorization: Bearer <key>` header (asking the database), or UnauthenticatedError.
    With `cache_s` > 0 a verified key is remembered for that long, for `cached_caller` (unknown and
    revoked keys are never remembered)."""
    digest = token_hash(authorization)
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if key is None or key.revoked_at is not None:
        _VERIFIED.pop(digest, None)
        raise UnauthenticatedError("the API key is not valid (unknown or revoked)", code="invalid_api_key")
    caller = Caller(tenant_id=key.tenant_id, key_id=key.id, operator=key.operator)
    if cache_s > 0:
        if len(_VERIFIED) >= _VERIFIED_MAX:  # many keys in use: start over rather than grow without bound
            _VERIFIED.clear()
        _VERIFIED[digest] = (caller, time.monotonic() + cache_s)
    return caller
