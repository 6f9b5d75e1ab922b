"""dedup history (documents, minhash_bands) and per-slice language and image counts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "documents",
        sa.Column("hash", sa.String(length=32), nullable=False),
        sa.Column("slice_id", sa.String(length=64), nullable=False),
        sa.Column("lang", sa.String(length=8), nullable=False),
        sa.PrimaryKeyConstraint("hash"),
    )
    op.create_index("ix_documents_slice_id", "documents", ["slice_id"])
    op.create_table(
        "minhash_bands",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("band_key", sa.BigInteger(), nullable=False),
        sa.Column("slice_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_minhash_bands_band_key", "minhash_bands", ["band_key"])
    op.create_index("ix_minhash_bands_slice_id", "minhash_bands", ["slice_id"])
    with op.batch_alter_table("slices") as batch:
        batch.add_column(sa.Column("n_images", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("languages", sa.Text(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("slices") as batch:
        batch.drop_column("languages")
        batch.drop_column("n_images")
    op.drop_table("minhash_bands")
    op.drop_table("documents")
