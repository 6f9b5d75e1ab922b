"""Catalog tables (SQLAlchemy 2.0 typed models). Schema changes go through a new Alembic migration."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Source(Base):
    """A place users drop raw data: a local folder or an s3:// prefix."""

    __tablename__ = "sources"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uri: Mapped[str] = mapped_column(String(1024), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SeenObject(Base):
    """One version (key + etag) of a raw object that an ingest committed; a rerun skips it."""

    __tablename__ = "objects"
    __table_args__ = (UniqueConstraint("source_id", "key", "etag", name="uq_objects_source_key_etag"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"), index=True)
    key: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    etag: Mapped[str] = mapped_column(String(128))
    slice_id: Mapped[str | None] = mapped_column(ForeignKey("slices.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(32))
    """`ingested` or `quarantined` (a whole object that could not be read)."""
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Tokenizer(Base):
    """A frozen tokenizer version; every slice and model names the one it was made with."""

    __tablename__ = "tokenizers"
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    uri: Mapped[str] = mapped_column(String(1024))
    vocab_size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Slice(Base):
    """The committed output of one ingest: shards of new documents, in order of arrival."""

    __tablename__ = "slices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    tokenizer_version: Mapped[str] = mapped_column(ForeignKey("tokenizers.version"))
    manifest_uri: Mapped[str] = mapped_column(String(1024))
    n_documents: Mapped[int] = mapped_column(Integer)
    n_heldout_documents: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    languages: Mapped[str] = mapped_column(Text, default="{}")
    """JSON object: language -> accepted documents."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Document(Base):
    """Exact-dedup key of every kept document (and image), across all slices."""

    __tablename__ = "documents"
    hash: Mapped[str] = mapped_column(String(32), primary_key=True)
    slice_id: Mapped[str] = mapped_column(String(64), index=True)
    lang: Mapped[str] = mapped_column(String(8))


class MinhashBand(Base):
    """One LSH band key of a kept document's MinHash signature; near-duplicates share a key."""

    __tablename__ = "minhash_bands"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    band_key: Mapped[int] = mapped_column(BigInteger, index=True)
    slice_id: Mapped[str] = mapped_column(String(64), index=True)


class Shard(Base):
    __tablename__ = "shards"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slice_id: Mapped[str] = mapped_column(ForeignKey("slices.id"), index=True)
    split: Mapped[str] = mapped_column(String(16))
    """`train`, `heldout` or `images`."""
    key: Mapped[str] = mapped_column(String(1024))
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    n_documents: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))


class QuarantineRecord(Base):
    """A rejected object or record, kept with a named reason (bad input is never silently dropped)."""

    __tablename__ = "quarantine"
    __table_args__ = (Index("ix_quarantine_reason", "reason"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    slice_id: Mapped[str | None] = mapped_column(ForeignKey("slices.id"), nullable=True)
    object_key: Mapped[str] = mapped_column(String(1024))
    record: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Line number inside the object (None: the whole object)."""
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainingRun(Base):
    """One continual pre-training run and the checkpoint it produced."""

    __tablename__ = "training_runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(32))
    """`running`, `finished` or `failed`."""
    parent_checkpoint_uri: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    checkpoint_uri: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    slice_ids: Mapped[str] = mapped_column(Text)
    """JSON list of the slices the run trained on (new slice last)."""
    tokenizer_version: Mapped[str] = mapped_column(String(64))
    steps: Mapped[int] = mapped_column(Integer, default=0)
    final_loss: Mapped[float | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
