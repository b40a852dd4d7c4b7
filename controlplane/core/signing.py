"""The control plane's Ed25519 key: agents trust only desired state signed with it.

Kept in SIGNING_KEY_FILE (PEM, mode 0600), generated on first use. Losing it means
re-enrolling every agent, so production backs it up with the database.
"""

from __future__ import annotations

import functools
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings


@functools.cache
def private_key() -> Ed25519PrivateKey:
    path = settings.SIGNING_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey), f"{path} must hold an Ed25519 private key"
    return key


def public_key() -> Ed25519PublicKey:
    return private_key().public_key()
