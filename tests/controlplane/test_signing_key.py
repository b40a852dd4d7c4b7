"""The signing key is generated once even when several control-plane processes start at
the same moment: one key wins, every process reads it whole, none fails."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from controlplane.core import signing


def test_processes_starting_at_once_all_get_the_one_key(tmp_path: Path, settings: Any) -> None:
    path = tmp_path / "keys" / "signing_key.pem"
    settings.SIGNING_KEY_FILE = path
    start = threading.Barrier(8)

    def first_use() -> bytes:
        start.wait()
        if not path.exists():
            signing._generate(path)  # noqa: SLF001  (what each process's first use does)
        return path.read_bytes()

    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(lambda _: first_use(), range(8)))
    assert len(set(seen)) == 1
    assert [p.name for p in path.parent.iterdir()] == ["signing_key.pem"]  # no leftovers
    assert path.stat().st_mode & 0o777 == 0o600
    serialization.load_pem_private_key(seen[0], password=None)

    signing.private_key.cache_clear()
    try:
        assert (
            signing.private_key().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            == seen[0]
        )
    finally:
        signing.private_key.cache_clear()
