"""Secret values, encrypted at rest under the server's master key, and decrypted only to start an instance.

Encryption is AES-256-GCM (`cryptography`'s `AESGCM`) with a fresh 96-bit random nonce per encryption, kept beside
the ciphertext in the `secrets` row. The associated data is the secret's ID and folder, so that a ciphertext copied
into another row (another secret, or the same name in another folder) fails to decrypt rather than hand out one
secret's value under another's name; GCM's tag also catches a ciphertext changed in place.

The master key is `CELLNODE_MASTER_KEY` (base64 of 32 bytes) or else `DATA_DIR/master.key`, which the first start
makes: 32 random bytes in base64, mode 0600, written to a temporary file and linked into place, so that a reader
never sees half a key and two servers starting at once cannot each make their own. Lose the key and every secret is
lost with it; servers that share a database need the same key, so set `CELLNODE_MASTER_KEY` on each.

Where a value goes: the API encrypts it before the row is written and never returns it (it shows `***`). The
supervisor decrypts a node's secrets each time it starts an instance, into `InstanceSpec.env`, which the local
backend hands to the zygote or instance process as its environment: never into the launch spec file of the runtime
directory, never into a log. No message built here holds a value, and `SecretBox` keeps its key out of `repr`.

What this protects: a copy of the database (a backup, a disk image) without the key. It does not protect against code
running as the server's user, which on the local backend includes every node's cell: such code can read the key file,
and the environment of the instances of every node, through /proc.

    box = SecretBox.load(settings)
    nonce, ciphertext = box.encrypt(secret_id, folder_id, "s3cr3t")
    box.decrypt(row)  # ConfigError naming the secret and the fix, if the key is not the one it was encrypted with
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellnode.config import Settings
from cellnode.exceptions import ConfigError
from cellnode.store.db import Database
from cellnode.store.models import Secret

logger = logging.getLogger("cellnode.secrets")

MASTER_KEY_VARIABLE = "CELLNODE_MASTER_KEY"
KEY_FILE = "master.key"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96 bits, GCM's native nonce size
ASSOCIATED_DATA = "cellnode-secret-v1:{folder_id}:{secret_id}"
MAKE_KEY = "python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'"
UNREADABLE = (
    "Secret {name!r} ({secret_id}) of folder {folder_id!r} cannot be decrypted with the master key in force (from "
    "{source}): it was encrypted under another master key, or its stored ciphertext was changed or copied from "
    "another secret. Start the server with the master key it was made with (" + MASTER_KEY_VARIABLE + ", or the "
    "data directory's " + KEY_FILE + "), or set its value again: 'cellnode secret update {name} --folder "
    "{folder_id} --value-file FILE'."
)


class SecretBox:
    """Encrypts and decrypts secret values under one master key.

    Parameters:
        key: the 32-byte master key.
        source: where the key came from (`CELLNODE_MASTER_KEY` or the key file's path), for messages.
    """

    def __init__(self, key: bytes, *, source: str) -> None:
        assert len(key) == KEY_BYTES, f"the master key must be {KEY_BYTES} bytes"
        self._aead = AESGCM(key)
        self.source = source

    @classmethod
    def load(cls, settings: Settings) -> SecretBox:
        """The box of `settings`' master key: `CELLNODE_MASTER_KEY`, or the data directory's key file, made now if
        there is none. ConfigError naming the variable or the file (never the key) if it is not a 32-byte key."""
        if settings.master_key is not None:
            return cls(
                decode_key(settings.master_key.get_secret_value(), MASTER_KEY_VARIABLE), source=MASTER_KEY_VARIABLE
            )
        path = settings.data_dir / KEY_FILE
        return cls(read_or_make_key(path), source=str(path))

    def encrypt(self, secret_id: str, folder_id: str, value: str) -> tuple[bytes, bytes]:
        """`(nonce, ciphertext)` of `value` for the secret with this ID in this folder."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce, self._aead.encrypt(nonce, value.encode(), _associated(secret_id, folder_id))

    def decrypt(self, secret: Secret) -> str:
        """The value of a stored secret; ConfigError naming it and the fix if it does not decrypt."""
        try:
            plain = self._aead.decrypt(secret.nonce, secret.ciphertext, _associated(secret.id, secret.folder_id))
        except (InvalidTag, ValueError) as exc:  # ValueError: a nonce of the wrong length
            raise ConfigError(
                UNREADABLE.format(name=secret.name, secret_id=secret.id, folder_id=secret.folder_id, source=self.source)
            ) from exc
        return plain.decode()

    def environment(self, session: Session, secret_ids: Sequence[str], node_id: str) -> dict[str, str]:
        """The variables a node's secrets give its instances, by secret name; ConfigError if one is gone or does not
        decrypt (the message names it, never a value)."""
        env: dict[str, str] = {}
        for secret_id in secret_ids:
            secret = session.get(Secret, secret_id)
            if secret is None:
                raise ConfigError(
                    f"Secret {secret_id!r} of node {node_id!r} no longer exists. Give the node the secrets it should "
                    f"have: 'cellnode node update {node_id} --secret NAME ...' (or --no-secrets)."
                )
            env[secret.name] = self.decrypt(secret)
        return env

    def check(self, db: Database) -> None:
        """Log a warning naming the stored secrets that do not decrypt under this key (at start: a wrong key shows
        at once, not only when an instance that needs one fails to start)."""
        with db.session() as session:
            unreadable = []
            for secret in session.scalars(select(Secret).order_by(Secret.created_at)):
                try:
                    self.decrypt(secret)
                except ConfigError:
                    unreadable.append(f"{secret.name!r} ({secret.id}) of folder {secret.folder_id!r}")
        if unreadable:
            shown = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
            logger.warning(
                "%d secret(s) cannot be decrypted with the master key in force (from %s): %s. Nodes that use them "
                "will fail to start. Start the server with the master key they were made with (%s, or the data "
                "directory's %s), or set their values again with 'cellnode secret update'.",
                len(unreadable),
                self.source,
                shown,
                MASTER_KEY_VARIABLE,
                KEY_FILE,
            )

    def __repr__(self) -> str:
        return f"<SecretBox key from {self.source}>"


def _associated(secret_id: str, folder_id: str) -> bytes:
    return ASSOCIATED_DATA.format(folder_id=folder_id, secret_id=secret_id).encode()


def decode_key(text: str, where: str, fix: str = f"Make one with: {MAKE_KEY}") -> bytes:
    """A master key from its base64 text (standard or URL-safe alphabet); ConfigError naming `where`, never the text."""
    text = text.strip()
    try:
        key = base64.b64decode(text, altchars=b"-_" if "-" in text or "_" in text else None, validate=True)
    except (binascii.Error, ValueError):
        # Not `from exc`: the decoder's message may quote the text.
        raise ConfigError(
            f"{where} is not valid base64; it must be the base64 of a {KEY_BYTES}-byte key. {fix}"
        ) from None
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"{where} decodes to {len(key)} bytes; the master key must be {KEY_BYTES} bytes (AES-256), in base64. {fix}"
        )
    return key


def read_or_make_key(path: Path) -> bytes:
    """The key in `path`, made (0600) if the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _make_key_file(path)
    except OSError as exc:
        raise ConfigError(
            f"Cannot read the master key file {str(path)!r}: {exc.strerror}. Make it readable by the server's user, "
            f"or set {MASTER_KEY_VARIABLE}."
        ) from exc
    if path.stat().st_mode & 0o077:
        logger.warning("The master key file %s can be read by other users; make it private: chmod 600 %s", path, path)
    return decode_key(
        text,
        f"The master key file {str(path)!r}",
        "Restore it from a backup of the data directory; or, if no secret was ever stored, delete it and the next "
        "start makes a new one.",
    )


def _make_key_file(path: Path) -> bytes:
    key = os.urandom(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(base64.b64encode(key) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(staging, path)  # unlike a rename, never replaces a key another server made meanwhile
        except FileExistsError:
            return read_or_make_key(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
    logger.info("Made the master key that encrypts secrets: %s (mode 0600). Back it up with the database.", path)
    return key
