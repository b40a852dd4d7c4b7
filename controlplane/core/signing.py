"""The control plane's Ed25519 key: agents trust only desired state signed with it.

Kept in SIGNING_KEY_FILE (PEM, mode 0600), generated on first use. Losing it means
re-enrolling every agent, so production backs it up with the database.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings


@functools.cache
def private_key() -> Ed25519PrivateKey:
    path = settings.SIGNING_KEY_FILE
    if not path.exists():
        _generate(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey), f"{path} must hold an Ed25519 private key"
    return key


def _generate(path: Path) -> None:
    """Write a new key whole under a temporary name, then link it into place: of several
    processes starting at once, exactly one key wins and none ever reads a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process's key won: use it
            os.link(temporary, path)
    finally:
        os.unlink(temporary)


def public_key() -> Ed25519PublicKey:
    return private_key().public_key()
