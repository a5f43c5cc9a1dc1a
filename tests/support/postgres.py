"""Reaching a test's PostgreSQL database with psycopg directly, beside the app's SQLAlchemy engine."""

from __future__ import annotations


def libpq_dsn(database_url: str) -> str:
    """The app's SQLAlchemy URL (`postgresql+psycopg://…`) as psycopg.connect takes it: libpq knows no `+driver`."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)
