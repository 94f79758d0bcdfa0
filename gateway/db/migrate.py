"""Schema upgrades with Alembic, run in-process so ``serve`` and ``db upgrade`` share one path."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).with_name("migrations")


def upgrade(engine: Engine, revision: str = "head", node_name: str | None = None) -> None:
    """``node_name``: the node running the upgrade, which 0012 names as the holder of the files
    already in the ledger (they are on its disk: before 0012 a ledger had one spool)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        config.attributes["node_name"] = node_name
        command.upgrade(config, revision)


def head() -> str:
    """The schema revision this code needs."""
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    found = ScriptDirectory.from_config(config).get_current_head()
    assert found is not None
    return found


def current(engine: Engine) -> str | None:
    """The database's schema revision; None when it has no gateway tables. Reads only."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
