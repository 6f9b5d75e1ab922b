"""The catalog's migration chain on a fresh SQLite file and on a real PostgreSQL server."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from wudao.catalog import Catalog, CatalogError, Source, head_revision, upgrade

TABLES = {"sources", "objects", "tokenizers", "slices", "shards", "quarantine", "training_runs"}


def _check_fresh_upgrade(url: str) -> None:
    assert upgrade(url) == head_revision()
    assert upgrade(url) == head_revision(), "upgrading twice is a no-op"
    engine = create_engine(url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    cat = Catalog(url)
    with cat.session() as s:
        s.add(Source(uri="/data/raw"))
    with cat.session() as s:
        assert s.query(Source).one().uri == "/data/raw"
    cat.close()


def test_migrations_on_fresh_sqlite(tmp_path):
    _check_fresh_upgrade(f"sqlite:///{tmp_path / 'catalog.db'}")


def test_migrations_on_postgresql(postgres_url):
    _check_fresh_upgrade(postgres_url)


def test_server_db_is_checked_not_silently_upgraded(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with pytest.raises(CatalogError, match="wudao db upgrade"):
        Catalog(url, auto_upgrade=False)


def test_unreachable_db_is_one_clear_error():
    with pytest.raises(CatalogError, match="cannot reach the catalog DB"):
        upgrade("postgresql+psycopg://nobody:secret@127.0.0.1:9/none")


def test_models_and_migrations_agree(tmp_path):
    """A model change without its migration (or the reverse) fails here, not on a user's database."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from wudao.catalog import Base

    url = f"sqlite:///{tmp_path / 'sync.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
