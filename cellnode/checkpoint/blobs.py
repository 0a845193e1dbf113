"""Content-addressed blob store: `root/sha256/<first 2 hex>/<64 hex>`, written atomically, verified on read."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from pathlib import Path

from cellnode._files import atomic_file, fsync_file
from cellnode.exceptions import CorruptBlobError, InvalidArgument

CHUNK_SIZE = 1024 * 1024
FILE_MODE = 0o600
DIR_MODE = 0o700
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

INVALID_SHA256_MSG = "Blob name {sha256!r} is not a sha256 digest; pass 64 lowercase hexadecimal characters."
MISSING_BLOB_MSG = (
    "Blob {path} is missing: expected sha256 {sha256}, found no file. Delete the checkpoint and capture it again."
)
CORRUPT_BLOB_MSG = (
    "Blob {path} is corrupt: expected sha256 {expected}, found {found}. Delete the checkpoint and capture it again."
)
MISMATCH_MSG = (
    "File {path} does not match its declared sha256: expected {expected}, found {found}. Capture the checkpoint again."
)


class BlobStore:
    """Immutable blobs named by the sha256 of their content."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        """The path of the blob named `sha256`, after checking that the name is a sha256 hex digest."""
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise InvalidArgument(INVALID_SHA256_MSG.format(sha256=sha256))
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """Whether the blob is present (its content is not checked)."""
        return self.path(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store `data` and return its sha256; storing the same bytes twice is a no-op."""
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if target.is_file():
            return sha256
        self._make_dirs(target)
        with atomic_file(target, FILE_MODE) as tmp:
            tmp.write(data)
        return sha256

    def put_file(self, src: Path, sha256: str) -> None:
        """Move the file `src` into the store under `sha256`, refusing it when its content does not match."""
        target = self.path(sha256)
        found = _hash_file(src)
        if found != sha256:
            raise CorruptBlobError(MISMATCH_MSG.format(path=src, expected=sha256, found=found))
        self._make_dirs(target)
        os.chmod(src, FILE_MODE)
        fsync_file(src)
        try:
            os.replace(src, target)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # `src` lives on another filesystem: copy next to the target, then rename atomically.
        with atomic_file(target, FILE_MODE) as tmp, open(src, "rb") as source:
            shutil.copyfileobj(source, tmp, CHUNK_SIZE)
        _unlink_quietly(Path(src))

    def read(self, sha256: str) -> bytes:
        """The content of the blob, after checking it against its sha256."""
        target = self.path(sha256)
        try:
            data = target.read_bytes()
        except FileNotFoundError as exc:
            raise CorruptBlobError(MISSING_BLOB_MSG.format(path=target, sha256=sha256)) from exc
        found = hashlib.sha256(data).hexdigest()
        if found != sha256:
            raise CorruptBlobError(CORRUPT_BLOB_MSG.format(path=target, expected=sha256, found=found))
        return data

    def verify(self, sha256: str) -> None:
        """Check the blob against its sha256 without loading it whole; raise CorruptBlobError if it fails."""
        target = self.path(sha256)
        try:
            found = _hash_file(target)
        except FileNotFoundError as exc:
            raise CorruptBlobError(MISSING_BLOB_MSG.format(path=target, sha256=sha256)) from exc
        if found != sha256:
            raise CorruptBlobError(CORRUPT_BLOB_MSG.format(path=target, expected=sha256, found=found))

    def delete(self, sha256: str) -> None:
        """Remove the blob; a blob that is already gone is fine."""
        _unlink_quietly(self.path(sha256))

    def _make_dirs(self, target: Path) -> Path:
        directory = target.parent
        for part in (self.root, self.root / "sha256", directory):
            if not part.is_dir():
                part.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        return directory


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
