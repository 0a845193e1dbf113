from __future__ import annotations

from pathlib import Path

import pytest

from cellnode.config import load_settings
from cellnode.exceptions import ConfigError


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CELLNODE_PORT", "9001")
    monkeypatch.setenv("CELLNODE_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.port == 9001
    assert settings.host == "127.0.0.1"
    assert settings.db_url == f"sqlite:///{tmp_path / 'cellnode.db'}"
    assert load_settings(port=9002, host=None).port == 9002


def test_bad_value_names_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLNODE_PORT", "eighty")
    with pytest.raises(ConfigError, match=r"port \(CELLNODE_PORT\) has value 'eighty'"):
        load_settings()
    with pytest.raises(ConfigError, match="unknown backend 'mars'"):
        load_settings(port=1, backend="mars")


def test_a_relative_data_dir_is_made_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(data_dir=Path("data")).data_dir == tmp_path / "data"
