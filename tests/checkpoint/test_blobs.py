from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

import pytest

from cellnode.checkpoint.blobs import BlobStore
from cellnode.exceptions import CorruptBlobError, InvalidArgument

DATA = b"interpreter state"
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_put_bytes_layout_and_modes(store: BlobStore) -> None:
    assert store.put_bytes(DATA) == DIGEST
    path = store.root / "sha256" / DIGEST[:2] / DIGEST
    assert store.path(DIGEST) == path
    assert path.read_bytes() == DATA
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert _mode(store.root / "sha256") == 0o700
    assert os.listdir(path.parent) == [DIGEST]  # no temporary files left behind


def test_put_bytes_is_idempotent(store: BlobStore) -> None:
    store.put_bytes(DATA)
    before = store.path(DIGEST).stat().st_mtime_ns
    assert store.put_bytes(DATA) == DIGEST
    assert store.path(DIGEST).stat().st_mtime_ns == before
    assert store.read(DIGEST) == DATA


def test_exists_read_verify_delete(store: BlobStore) -> None:
    assert not store.exists(DIGEST)
    store.put_bytes(DATA)
    assert store.exists(DIGEST)
    assert store.read(DIGEST) == DATA
    store.verify(DIGEST)
    store.delete(DIGEST)
    assert not store.exists(DIGEST)
    store.delete(DIGEST)  # deleting a missing blob is fine


def test_put_file_moves_the_file(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "staged"
    src.write_bytes(DATA)
    store.put_file(src, DIGEST)
    assert not src.exists()
    assert store.read(DIGEST) == DATA
    assert _mode(store.path(DIGEST)) == 0o600


def test_put_file_streams_large_files(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "large"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    store.put_file(src, digest)
    store.verify(digest)
    assert store.read(digest) == data


def test_put_file_refuses_a_mismatch(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "staged"
    src.write_bytes(b"something else")
    with pytest.raises(CorruptBlobError) as info:
        store.put_file(src, DIGEST)
    message = str(info.value)
    assert str(src) in message and DIGEST in message and hashlib.sha256(b"something else").hexdigest() in message
    assert src.exists()
    assert not store.exists(DIGEST)


def test_put_file_across_filesystems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the temporary directory")
    store = BlobStore(tmp_path / "blobs")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        src = Path(other) / "staged"
        src.write_bytes(DATA)
        store.put_file(src, DIGEST)
        assert not src.exists()
    assert store.read(DIGEST) == DATA
    assert _mode(store.path(DIGEST)) == 0o600
    assert os.listdir(store.path(DIGEST).parent) == [DIGEST]


def test_read_detects_corruption(store: BlobStore) -> None:
    store.put_bytes(DATA)
    path = store.path(DIGEST)
    path.write_bytes(b"flipped bits")
    found = hashlib.sha256(b"flipped bits").hexdigest()
    for check in (store.read, store.verify):
        with pytest.raises(CorruptBlobError) as info:
            check(DIGEST)
        message = str(info.value)
        assert str(path) in message and DIGEST in message and found in message
        assert message.endswith("Delete the checkpoint and capture it again.")


def test_missing_blob_is_corrupt(store: BlobStore) -> None:
    for check in (store.read, store.verify):
        with pytest.raises(CorruptBlobError) as info:
            check(DIGEST)
        message = str(info.value)
        assert str(store.path(DIGEST)) in message and DIGEST in message and "is missing" in message
        assert message.endswith("Delete the checkpoint and capture it again.")


@pytest.mark.parametrize("name", ["", "abc", DIGEST.upper(), DIGEST + "0", "../" + DIGEST[3:], "g" * 64])
def test_path_validates_the_name(store: BlobStore, name: str) -> None:
    for call in (store.path, store.exists, store.read, store.verify, store.delete):
        with pytest.raises(InvalidArgument) as info:
            call(name)
        assert repr(name) in str(info.value)
        assert "64 lowercase hexadecimal characters" in str(info.value)


def test_many_blobs_share_the_tree(store: BlobStore) -> None:
    blobs = {store.put_bytes(bytes([n])): bytes([n]) for n in range(40)}
    assert len(blobs) == 40
    for digest, data in blobs.items():
        assert store.read(digest) == data
    assert sum(1 for _ in (store.root / "sha256").rglob("*") if _.is_file()) == 40


def test_a_directory_in_the_blobs_place(store: BlobStore, tmp_path: Path) -> None:
    # A failed rename must not leave temporary files behind.
    store.path(DIGEST).mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        store.put_bytes(DATA)
    src = tmp_path / "staged"
    src.write_bytes(DATA)
    with pytest.raises(IsADirectoryError):
        store.put_file(src, DIGEST)
    assert src.exists()
    assert os.listdir(store.path(DIGEST).parent) == [DIGEST]


def test_a_directory_in_the_blobs_place_across_filesystems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the temporary directory")
    store = BlobStore(tmp_path / "blobs")
    store.path(DIGEST).mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=shm) as other:
        src = Path(other) / "staged"
        src.write_bytes(DATA)
        with pytest.raises(IsADirectoryError):
            store.put_file(src, DIGEST)
        assert src.exists()
    assert os.listdir(store.path(DIGEST).parent) == [DIGEST]
