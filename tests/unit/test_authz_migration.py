"""Migration 0003 moves existing grants to the role:<name> layout and back."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, text

from core import migrate


def _rows(url: str, ptype: str) -> set[tuple[str, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT v0, v1, v2 FROM casbin_rule WHERE ptype = :p"), {"p": ptype}).all()
        return {tuple(v for v in row if v is not None) for row in rows}
    finally:
        engine.dispose()


def test_grants_get_role_prefix_and_lose_it_on_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'authz.db'}"
    migrate.upgrade(url, "0002")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO casbin_rule (ptype, v0, v1, v2) VALUES ('g', 'alice', 'reader', 'hr'),"
                          " ('g', 'group:ops', 'editor', 'ops'), ('p', 'reader', 'read', NULL)"))
    engine.dispose()
    migrate.upgrade(url)
    assert _rows(url, "g") == {("alice", "role:reader", "hr"), ("group:ops", "role:editor", "ops")}
    assert ("read", "role:reader") in _rows(url, "p") and ("reveal", "role:privacy_officer") in _rows(url, "p")
    migrate.downgrade(url, "0002")
    assert _rows(url, "g") == {("alice", "reader", "hr"), ("group:ops", "editor", "ops")}
    assert ("reader", "read") in _rows(url, "p") and ("read", "role:reader") not in _rows(url, "p")
