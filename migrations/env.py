"""Alembic environment: batchrun always hands over an open connection (see runner.store)."""

from __future__ import annotations

from alembic import context

from runner.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only for `alembic` run by hand
    raise SystemExit("run migrations through batchrun: it opens the database and calls upgrade")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
