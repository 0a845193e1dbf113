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


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.org"])
def test_listening_beyond_loopback_needs_tls_or_insecure(host: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is not a loopback address.*--tls-cert and --tls-key, or --insecure"):
        load_settings(host=host, data_dir=tmp_path)
    assert load_settings(host=host, data_dir=tmp_path, insecure=True).insecure
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    assert load_settings(host=host, data_dir=tmp_path, tls_cert=cert, tls_key=key).tls_cert == cert
    with pytest.raises(ConfigError, match="give both tls_cert"):
        load_settings(host=host, data_dir=tmp_path, tls_cert=cert)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_needs_nothing_more(host: str, tmp_path: Path) -> None:
    assert load_settings(host=host, data_dir=tmp_path).host == host


def test_a_cross_setting_error_never_prints_the_master_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLNODE_MASTER_KEY", "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYg==")
    with pytest.raises(ConfigError) as caught:
        load_settings(host="0.0.0.0", data_dir=tmp_path)
    assert "c2VjcmV0" not in str(caught.value)


def test_grpc_port(tmp_path: Path) -> None:
    assert load_settings(data_dir=tmp_path).grpc_port is None  # no gRPC unless asked
    assert load_settings(data_dir=tmp_path, grpc_port="0").grpc_port == 0
    with pytest.raises(ConfigError, match=r"grpc_port .* is 9000, the same as the HTTP port"):
        load_settings(data_dir=tmp_path, port=9000, grpc_port=9000)
    with pytest.raises(ConfigError, match=r"grpc_port \(CELLNODE_GRPC_PORT\) has value 'fast'"):
        load_settings(data_dir=tmp_path, grpc_port="fast")
