"""Random secrets that are shown once and stored only as a digest."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from django.utils.crypto import salted_hmac


def digest(secret: str) -> str:
    """SHA-256 hex; secrets are 256-bit random, so a fast hash is enough."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def derived_secret(purpose: str, subject: str) -> str:
    """A secret the control plane recomputes (an HMAC under its SECRET_KEY) instead of
    keeping one of its own; rotating SECRET_KEY rotates every one of them."""
    return salted_hmac(f"tailguard.{purpose}", subject, algorithm="sha256").hexdigest()


@dataclass(frozen=True)
class Issued:
    """A freshly created secret-bearing object with its plaintext, which is never stored."""

    obj: Any
    secret: str
