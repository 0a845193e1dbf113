"""API keys and IAM tokens: minted here, stored only as sha256 hashes, checked through an in-memory cache.

Failed authentications are counted per client address: past `failure_limit` (`MAX_FAILURES` by default) within
`FAILURE_WINDOW` seconds, that
address gets 429 (with Retry-After) for its next attempts with unknown credentials until the window has passed, so
guessing keys costs the guesser, not the database. A credential already known good (cached) is never refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from cellnode.exceptions import TooManyFailures, Unauthenticated
from cellnode.iam.formats import API_KEY_PREFIX, IAM_TOKEN_PREFIX
from cellnode.store.db import Database
from cellnode.store.models import ApiKey, IamToken, Principal

TOKEN_LIFETIME = timedelta(hours=12)
# A cached credential is looked up again after this long, so that a revocation made by another server reaches us.
CACHE_SECONDS = 60.0
MAX_CACHED = 100_000
MAX_FAILURES = 20
FAILURE_WINDOW = 60.0
MAX_TRACKED = 10_000
NO_CREDENTIAL = (
    "The request has no credential. Send 'Authorization: Bearer <IAM token>' or 'Authorization: Api-Key <key>'; "
    "'cellnode iam create-token' prints a token."
)


@dataclass(frozen=True)
class Caller:
    """The authenticated principal behind a request."""

    principal_id: str
    kind: str  # "serviceAccount" or "user"
    folder_id: str | None  # a service account's home folder
    api_key_id: str | None
    expires_at: datetime | None = None  # when the credential used ends (an IAM token's expiry)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(30)


def new_iam_token() -> str:
    return IAM_TOKEN_PREFIX + secrets.token_urlsafe(48)


class Authenticator:
    """Turns an Authorization header into a Caller; the hot path hits only the cache."""

    def __init__(self, db: Database, *, failure_limit: int = MAX_FAILURES) -> None:
        self._db = db
        self._failure_limit = failure_limit  # per client address per FAILURE_WINDOW; 0: no limit
        # sha256 of the credential -> (caller, monotonic time until which the entry may be used)
        self._cache: dict[str, tuple[Caller, float]] = {}
        # client address -> monotonic times of its recent failures
        self._failures: dict[str, list[float]] = {}

    async def authenticate(self, authorization: str | None, client: str = "") -> Caller:
        """The caller for a header value; Unauthenticated naming what is wrong, never which part matched."""
        scheme, secret = self._split(authorization, client)
        key = f"{scheme}:{digest(secret)}"
        cached = self._cache.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        self._check_failures(client)
        try:
            return await asyncio.to_thread(self._lookup, scheme, secret, key)
        except Unauthenticated:
            self._failed(client)
            raise

    def authenticate_sync(self, authorization: str | None, client: str = "") -> Caller:
        scheme, secret = self._split(authorization, client)
        key = f"{scheme}:{digest(secret)}"
        cached = self._cache.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        self._check_failures(client)
        try:
            return self._lookup(scheme, secret, key)
        except Unauthenticated:
            self._failed(client)
            raise

    def _split(self, authorization: str | None, client: str) -> tuple[str, str]:
        try:
            return _split(authorization)
        except Unauthenticated:
            if authorization:  # A malformed credential counts; a missing one is a client that forgot it.
                self._check_failures(client)
                self._failed(client)
            raise

    def _check_failures(self, client: str) -> None:
        failures = self._failures.get(client)
        if not client or not failures or not self._failure_limit:
            return
        now = time.monotonic()
        recent = [t for t in failures if now - t < FAILURE_WINDOW]
        self._failures[client] = recent
        if len(recent) >= self._failure_limit:
            wait = max(1, int(FAILURE_WINDOW - (now - recent[0])) + 1)
            raise TooManyFailures(
                f"Too many failed authentications from {client}: {len(recent)} in the last {FAILURE_WINDOW:g} s. "
                f"Wait {wait} s, and check the credential you send.",
                retry_after=wait,
            )

    def _failed(self, client: str) -> None:
        if not client:
            return
        if len(self._failures) >= MAX_TRACKED and client not in self._failures:
            self._failures.clear()  # rare; a flood from many addresses resets the count rather than the memory
        self._failures.setdefault(client, []).append(time.monotonic())

    def forget(self) -> None:
        """Drop every cached credential (after a revocation)."""
        self._cache.clear()

    def _lookup(self, scheme: str, secret: str, key: str) -> Caller:
        now = datetime.now(UTC)
        hashed = digest(secret)
        with self._db.session() as session:
            if scheme == "api-key":
                api_key = session.scalar(select(ApiKey).where(ApiKey.secret_hash == hashed))
                if api_key is None or not secrets.compare_digest(api_key.secret_hash, hashed):
                    raise Unauthenticated("The API key is not valid. Check the key, or create a new one.")
                if api_key.revoked_at is not None:
                    raise Unauthenticated("The API key was revoked. Use another key.")
                principal_id, valid_for = api_key.principal_id, CACHE_SECONDS
                api_key_id: str | None = api_key.id
                expires_at: datetime | None = None
            else:
                token = session.scalar(select(IamToken).where(IamToken.token_hash == hashed))
                if token is None or not secrets.compare_digest(token.token_hash, hashed):
                    raise Unauthenticated("The IAM token is not valid. Create one with 'cellnode iam create-token'.")
                if token.expires_at <= now:
                    raise Unauthenticated(
                        f"The IAM token expired at {token.expires_at.isoformat()}. "
                        "Create a new one with 'cellnode iam create-token'."
                    )
                if token.api_key_id is not None:
                    parent = session.get(ApiKey, token.api_key_id)
                    if parent is None or parent.revoked_at is not None:
                        raise Unauthenticated("The IAM token was revoked with the API key it was created from.")
                principal_id, api_key_id, expires_at = token.principal_id, token.api_key_id, token.expires_at
                valid_for = min(CACHE_SECONDS, (token.expires_at - now).total_seconds())
            principal = session.get(Principal, principal_id)
            assert principal is not None, "a credential always belongs to a principal (foreign key)"
            caller = Caller(principal.id, principal.kind, principal.folder_id, api_key_id, expires_at)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()  # rare; cheaper than tracking use, and every entry is one lookup away
        self._cache[key] = (caller, time.monotonic() + valid_for)
        return caller


def mint_iam_token(db: Database, caller: Caller) -> tuple[str, datetime]:
    """A new IAM token for the caller, tied to its API key: 12 hours, but no longer than the token it presented."""
    token = new_iam_token()
    expires_at = datetime.now(UTC) + TOKEN_LIFETIME
    if caller.expires_at is not None:
        expires_at = min(expires_at, caller.expires_at)
    with db.session() as session:
        session.add(
            IamToken(
                principal_id=caller.principal_id,
                api_key_id=caller.api_key_id,
                token_hash=digest(token),
                expires_at=expires_at,
            )
        )
    return token, expires_at


def _split(authorization: str | None) -> tuple[str, str]:
    if not authorization or not authorization.strip():
        raise Unauthenticated(NO_CREDENTIAL)
    scheme, _, secret = authorization.strip().partition(" ")
    scheme = scheme.lower()
    secret = secret.strip()
    if scheme not in ("bearer", "api-key"):
        # Never echo the value: a key sent without its scheme would come back in the error.
        raise Unauthenticated(
            "The Authorization header must be 'Bearer <IAM token>' or 'Api-Key <key>': the scheme, a space, "
            "then the credential."
        )
    if not secret or " " in secret:
        raise Unauthenticated(f"The Authorization header has the scheme {scheme!r} but no single credential after it.")
    return scheme, secret
