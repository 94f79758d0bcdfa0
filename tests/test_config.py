"""Configuration: one TOML file, environment overrides, every error named with its fix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.config import load
from gateway.errors import ConfigError
from tests.conftest import GATEWAY_BIN

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_default_and_example_are_valid() -> None:
    default = load(ROOT / "config" / "gateway.toml", environ={})
    assert default.dicom.port == 11112
    assert default.database.url.startswith("sqlite:///")
    assert set(default.security.unknown_callers) == {"echo", "store"}
    example = load(ROOT / "config" / "gateway.example.toml", environ={})
    assert example.security.unknown_callers == ()
    assert {p.ae_title for p in example.security.peers} >= {"CT_ROOM1", "MR_3T"}


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[dicom]\nport = 104\n')
    config = load(path, environ={
        "GATEWAY_DICOM__PORT": "11113",
        "GATEWAY_STORAGE__DUPLICATE_POLICY": "replace",
        "GATEWAY_SECURITY__UNKNOWN_CALLERS": '["echo"]',
        "GATEWAY_SECURITY__PEERS": '[{ae_title = "CT1", host = "10.0.0.1"}]',
        "UNRELATED": "x",
    })
    assert config.dicom.port == 11113
    assert config.storage.duplicate_policy == "replace"
    assert config.security.unknown_callers == ("echo",)
    assert config.security.peers[0].host == "10.0.0.1"
    assert config.storage.spool_dir.is_absolute()


def test_every_error_is_listed_with_key_value_and_source(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[dicom]\nport = 70000\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n'
        '[storage]\nspool = "typo"\n'
        '[database]\nurl = "mysql://secret:pw@db/x"\n'
    )
    with pytest.raises(ConfigError) as error:
        load(path, environ={"GATEWAY_STORAGE__MIN_FREE_MB": "lots"})
    problems = error.value.problems
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    assert "dicom.port = 70000" in text and "less than or equal to 65535" in text
    assert "dicom.ae_title" in text
    assert "storage.spool: unknown key" in text and "did you mean spool_dir?" in text
    assert "environment variable GATEWAY_STORAGE__MIN_FREE_MB" in text
    assert "database.url" in text and "postgresql+psycopg://" in text
    assert "secret" not in text  # a database URL may hold a password


def test_check_config_and_serve_refuse_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    good = subprocess.run([str(GATEWAY_BIN), "check-config", "--config",
                           str(ROOT / "config" / "gateway.toml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (good.returncode, good.stdout.strip()) == (0, "ok")
    bad = tmp_path / "bad.toml"
    bad.write_text('[dicom]\nport = "eleven"\n[unknown]\nx = 1\n')
    for command in ("check-config", "serve"):
        result = subprocess.run([str(GATEWAY_BIN), command, "--config", str(bad)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2
        assert "dicom.port = 'eleven'" in result.stderr
        assert "unknown: unknown key" in result.stderr
    missing = subprocess.run([str(GATEWAY_BIN), "check-config", "--config",
                              str(tmp_path / "nope.toml")], capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    db = tmp_path / "sub" / "gateway.db"
    path.write_text(f'[database]\nurl = "sqlite:///{db}"\n')
    result = subprocess.run([str(GATEWAY_BIN), "db", "upgrade", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    import sqlite3
    with sqlite3.connect(db) as c:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        journal = c.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"instances", "instance_versions", "associations", "alembic_version"} <= tables
    assert journal == "wal"


def test_help_lists_every_command() -> None:
    result = subprocess.run([str(GATEWAY_BIN), "--help"], capture_output=True, text=True, check=False)
    for command in ("serve", "check-config", "status", "db"):
        assert command in result.stdout


@pytest.mark.parametrize(("toml", "expected"), [
    ("[security]\nmax_associations_per_peer = 0\n",
     ["security.max_associations_per_peer = 0", "at least 1", "leave the key out"]),
    ('[[security.peers]]\nae_title = "CT1"\nmax_associations = -2\n',
     ["security.peers.0.max_associations = -2", "at least 1"]),
    ("[dicom]\nmax_associations = 10\n[security]\nmax_associations_per_peer = 11\n",
     ["security.max_associations_per_peer = 11 is above dicom.max_associations = 10",
      "lower it to at most 10, or raise dicom.max_associations"]),
    (('[dicom]\nmax_associations = 10\n[[security.peers]]\nae_title = "MR_3T"\n'
      'max_associations = 12\n'),
     ["security.peers.0 (MR_3T).max_associations = 12 is above dicom.max_associations = 10",
      "lower it to at most 10"]),
])
def test_a_bad_peer_limit_is_named_with_its_fix(
        tmp_path: Path, toml: str, expected: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load(path, environ={})
    text = "\n".join(error.value.problems)
    assert all(part in text for part in expected), text


def test_peer_limits_at_most_the_node_limit_are_taken(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[dicom]\nmax_associations = 10\n[security]\nmax_associations_per_peer = 2\n'
                    '[[security.peers]]\nae_title = "PACS"\nmax_associations = 10\n')
    config = load(path, environ={"GATEWAY_SECURITY__MAX_ASSOCIATIONS_PER_PEER": "3"})
    assert config.security.max_associations_per_peer == 3
    assert config.security.peers[0].max_associations == 10  # equal: exempt from the default
