"""The SDK's connection settings: where the URL and the credential come from."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from cellnode.client import _cellnode_error, resolve_connection
from cellnode.exceptions import NotFound


@pytest.fixture
def profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    key_file = tmp_path / "admin.key"
    key_file.write_text("cnk_local\n")
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"url": "http://127.0.0.1:8123", "key_file": str(key_file)}))
    monkeypatch.setenv("CELLNODE_PROFILE", str(path))
    return path


def test_the_profile_gives_url_and_key(profile: Path) -> None:
    assert resolve_connection() == ("http://127.0.0.1:8123", "cnk_local")


def test_the_profile_key_never_goes_to_another_server(profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_connection("http://127.0.0.1:9999") == ("http://127.0.0.1:9999", None)
    monkeypatch.setenv("CELLNODE_URL", "http://127.0.0.1:7777")
    assert resolve_connection() == ("http://127.0.0.1:7777", None)


def test_arguments_and_environment_win(profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLNODE_TOKEN", "t1.env")
    assert resolve_connection() == ("http://127.0.0.1:8123", "t1.env")
    assert resolve_connection("http://127.0.0.1:1/", "t1.arg") == ("http://127.0.0.1:1", "t1.arg")


def test_a_pass_through_answer_is_an_error_only_when_cellnode_gave_it() -> None:
    error = NotFound("Node 'x' not found.")
    ours = httpx.Response(404, json=error.to_status(), headers={"x-cellnode-error": error.reason})
    assert isinstance(_cellnode_error(ours), NotFound)
    theirs = [
        httpx.Response(404, json={"code": 5, "message": "no such user", "details": []}),  # the service's own
        httpx.Response(404, json=error.to_status()),  # cellnode's very shape, from a service: no header
        httpx.Response(500, text="boom"),
        httpx.Response(200, json=NotFound("not an error: a 200").to_status()),
    ]
    assert [_cellnode_error(response) for response in theirs] == [None] * 4
