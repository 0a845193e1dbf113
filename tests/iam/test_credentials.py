"""Credentials against a real database: hashes only, expiry, revocation, malformed headers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from cellnode.exceptions import Unauthenticated
from cellnode.iam.bootstrap import bootstrap
from cellnode.iam.credentials import Authenticator, Caller, digest, mint_iam_token
from cellnode.store.db import Database
from cellnode.store.models import ApiKey, IamToken


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'cellnode.db'}")
    database.migrate()
    return database


def test_bootstrap_once_and_only_hashes_stored(db: Database, tmp_path: Path) -> None:
    first = bootstrap(db, tmp_path / "admin.key")
    assert first.new_key is not None and first.new_key.startswith("cnk_")
    assert (tmp_path / "admin.key").read_text().strip() == first.new_key
    again = bootstrap(db, tmp_path / "admin.key")
    assert again.new_key is None and again.folder_id == first.folder_id
    with db.session() as session:
        stored = session.scalar(select(ApiKey.secret_hash))
        dump = "\n".join(str(row) for row in session.execute(text("SELECT * FROM api_keys")))
    assert stored == digest(first.new_key)
    assert first.new_key not in dump


def test_api_key_and_token(db: Database, tmp_path: Path) -> None:
    key = bootstrap(db, tmp_path / "admin.key").new_key
    auth = Authenticator(db)
    caller = asyncio.run(auth.authenticate(f"Api-Key {key}"))
    assert caller.kind == "serviceAccount" and caller.api_key_id is not None
    token, expires_at = mint_iam_token(db, caller)
    assert timedelta(hours=11, minutes=59) < expires_at - datetime.now(UTC) <= timedelta(hours=12)
    assert auth.authenticate_sync(f"Bearer {token}").principal_id == caller.principal_id
    with db.session() as session:
        assert session.scalar(select(IamToken.token_hash)) == digest(token)


def test_expired_token(db: Database, tmp_path: Path) -> None:
    key = bootstrap(db, tmp_path / "admin.key").new_key
    auth = Authenticator(db)
    caller: Caller = auth.authenticate_sync(f"Api-Key {key}")
    token, _ = mint_iam_token(db, caller)
    with db.session() as session:
        row = session.scalar(select(IamToken))
        assert row is not None
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    with pytest.raises(Unauthenticated, match="IAM token expired at"):
        Authenticator(db).authenticate_sync(f"Bearer {token}")


def test_revoked_key_revokes_its_tokens(db: Database, tmp_path: Path) -> None:
    key = bootstrap(db, tmp_path / "admin.key").new_key
    auth = Authenticator(db)
    caller = auth.authenticate_sync(f"Api-Key {key}")
    token, _ = mint_iam_token(db, caller)
    with db.session() as session:
        row = session.scalar(select(ApiKey))
        assert row is not None
        row.revoked_at = datetime.now(UTC)
    auth.forget()
    with pytest.raises(Unauthenticated, match="API key was revoked"):
        auth.authenticate_sync(f"Api-Key {key}")
    with pytest.raises(Unauthenticated, match="revoked with the API key"):
        auth.authenticate_sync(f"Bearer {token}")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "no credential"),
        ("", "no credential"),
        ("Token abc", "must be 'Bearer <IAM token>' or 'Api-Key <key>'"),
        ("Bearer a b", "no single credential"),
        ("Bearer t1.unknown", "IAM token is not valid"),
    ],
)
def test_malformed(db: Database, header: str | None, fragment: str) -> None:
    with pytest.raises(Unauthenticated, match=fragment):
        Authenticator(db).authenticate_sync(header)


def test_a_credential_without_its_scheme_is_not_echoed(db: Database, tmp_path: Path) -> None:
    key = bootstrap(db, tmp_path / "admin.key").new_key
    assert key is not None
    with pytest.raises(Unauthenticated) as caught:
        Authenticator(db).authenticate_sync(key)
    assert key.lower() not in caught.value.message.lower()


def test_the_cache_keeps_schemes_apart(db: Database, tmp_path: Path) -> None:
    key = bootstrap(db, tmp_path / "admin.key").new_key
    auth = Authenticator(db)
    auth.authenticate_sync(f"Api-Key {key}")
    with pytest.raises(Unauthenticated, match="IAM token is not valid"):
        auth.authenticate_sync(f"Bearer {key}")


def test_a_token_minted_with_a_token_ends_no_later(db: Database, tmp_path: Path) -> None:
    key = bootstrap(db, tmp_path / "admin.key").new_key
    auth = Authenticator(db)
    first, first_expiry = mint_iam_token(db, auth.authenticate_sync(f"Api-Key {key}"))
    second, second_expiry = mint_iam_token(db, auth.authenticate_sync(f"Bearer {first}"))
    assert second_expiry == first_expiry
    assert auth.authenticate_sync(f"Bearer {second}").expires_at == first_expiry


def test_failed_authentications_are_limited_per_client(db: Database, tmp_path: Path) -> None:
    from cellnode.exceptions import TooManyFailures
    from cellnode.iam.credentials import MAX_FAILURES

    key = bootstrap(db, tmp_path / "admin.key").new_key
    auth = Authenticator(db)
    assert auth.authenticate_sync(f"Api-Key {key}", "127.0.0.9").principal_id  # cached from now on
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            auth.authenticate_sync(None, "127.0.0.9")  # a forgotten header is not a guess
    for _ in range(MAX_FAILURES):
        with pytest.raises(Unauthenticated):
            auth.authenticate_sync("Api-Key cnk_guess", "127.0.0.9")
    with pytest.raises(TooManyFailures, match=r"Too many failed authentications from 127.0.0.9: 20 in the last") as e:
        auth.authenticate_sync("Api-Key cnk_guess-again", "127.0.0.9")
    assert 1 <= e.value.retry_after <= 61
    with pytest.raises(TooManyFailures):
        asyncio.run(auth.authenticate("Bearer t1.guess", "127.0.0.9"))
    with pytest.raises(TooManyFailures):
        auth.authenticate_sync("NotAScheme x", "127.0.0.9")
    assert auth.authenticate_sync(f"Api-Key {key}", "127.0.0.9").principal_id, "a known key still works"
    with pytest.raises(Unauthenticated):
        auth.authenticate_sync("Api-Key cnk_guess", "127.0.0.10")  # another address is not affected
