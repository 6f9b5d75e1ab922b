"""The catalog: what was ingested, which slices exist, what each model was trained on.

SQLite by default, PostgreSQL in production; the schema is owned by the Alembic chain in `migrations/`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from wudao.catalog.models import (  # noqa: F401  (re-exported)
    Base,
    Document,
    MinhashBand,
    QuarantineRecord,
    SeenObject,
    Shard,
    Slice,
    Source,
    Tokenizer,
    TrainingRun,
)
from wudao.errors import WudaoError

_MIGRATIONS = Path(__file__).parent / "migrations"


class CatalogError(WudaoError):
    pass


def _alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser interpolation
    return cfg


def _engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # enforce FKs; WAL lets readers run beside a writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(url: str, revision: str = "head") -> str:
    """Run the migration chain up to `revision`; returns the revision the DB is at afterwards."""
    cfg = _alembic_config(url)
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        return current_revision(engine) or "base"
    except OperationalError as e:
        raise CatalogError(f"cannot reach the catalog DB ({_safe(url)}): {e.orig}") from e
    finally:
        engine.dispose()


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def _sqlite_lock(url: str, name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An OS file lock beside a SQLite catalog file (released by the OS when its holder dies)."""
    db = url.removeprefix("sqlite:///")
    if not url.startswith("sqlite:///") or not db or db == ":memory:":
        yield  # an in-memory DB belongs to one process
        return
    import fcntl

    Path(db).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.{name}.lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Catalog:
    """A connection to the catalog DB; use `session()` for a unit of work that commits or rolls back whole."""

    def __init__(self, url: str, *, auto_upgrade: bool | None = None):
        self.url = url
        # A local SQLite catalog is upgraded in place; a shared server DB is only checked (upgrade it on purpose).
        if auto_upgrade is None:
            auto_upgrade = url.startswith("sqlite")
        if auto_upgrade:
            with _sqlite_lock(url, "migrate"):  # two processes opening a new file must not both create tables
                upgrade(url)
        self.engine = _engine(url)
        try:
            at = current_revision(self.engine)
        except OperationalError as e:
            raise CatalogError(f"cannot reach the catalog DB ({_safe(url)}): {e.orig}") from e
        if at != head_revision():
            raise CatalogError(f"catalog DB {_safe(url)} is at revision {at or 'base'}: run `wudao db upgrade`")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    @contextmanager
    def exclusive(self, name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the catalog-wide lock `name` while inside (every process that uses this catalog, any machine
        for PostgreSQL); when another holder has it, call `on_wait` once and block until it is free. The lock
        dies with its holder, so `kill -9` never leaves a stale one: a PostgreSQL advisory lock on its own
        connection, or an OS file lock beside a SQLite file."""
        if self.url.startswith("sqlite"):
            with _sqlite_lock(self.url, name, on_wait):
                yield
            return
        key = int.from_bytes(hashlib.sha256(f"wudao:{name}".encode()).digest()[:8], "big", signed=True)
        with self.engine.connect() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
                if on_wait:
                    on_wait()
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()

    def close(self) -> None:
        self.engine.dispose()
