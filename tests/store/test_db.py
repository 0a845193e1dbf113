"""The store: migrations from an empty file, transactions that commit or roll back whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from cellnode.exceptions import AlreadyExists
from cellnode.store.db import Database
from cellnode.store.models import Folder, new_id


def test_migrations_create_every_table_and_are_idempotent(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.migrate()
    db.migrate()
    tables = set(inspect(db.engine).get_table_names())
    assert {"folders", "principals", "access_bindings", "api_keys", "iam_tokens", "checkpoints", "nodes"} <= tables
    assert "alembic_version" in tables
    db.close()


def test_conflict_rolls_back_the_whole_transaction(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.migrate()
    with db.session() as session:
        session.add(Folder(name="team"))
    with pytest.raises(AlreadyExists, match="conflicts with an existing resource"), db.session() as session:
        session.add(Folder(name="other"))
        session.flush()
        session.add(Folder(name="team"))
    with db.session() as session:
        assert list(session.scalars(select(Folder.name))) == ["team"], "'other' was rolled back with the conflict"
    db.close()


def test_ids_are_twenty_lowercase_letters_and_digits() -> None:
    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 20 and i.isalnum() and i == i.lower() for i in ids)


def test_migrations_match_the_models(tmp_path: Path) -> None:
    """A model change without its migration (or the reverse) fails here, not on a user's upgrade."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from cellnode.store.models import Base

    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.migrate()
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"render_as_batch": True})
        assert compare_metadata(context, Base.metadata) == []
    db.close()
