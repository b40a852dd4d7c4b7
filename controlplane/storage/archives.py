"""What a model archive must hold: the files the inference worker loads, and nothing unsafe."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REQUIRED_FILES = ("model.onnx", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class ArchiveContents:
    files: list[dict[str, object]]
    unpacked_bytes: int


def inspect_archive(path: Path) -> ArchiveContents:
    """List a tar archive (plain or compressed); raises ValueError saying what is wrong."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"Not a readable tar archive ({exc}).") from None
    files: list[dict[str, object]] = []
    total = 0
    for member in members:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise ValueError(f"Archive member {member.name!r} points outside the archive.")
        if member.isdir():
            continue
        if not member.isreg():
            raise ValueError(f"Archive member {member.name!r} is not a regular file.")
        files.append({"name": str(name), "size_bytes": member.size})
        total += member.size
    missing = sorted(set(REQUIRED_FILES) - {f["name"] for f in files})
    if missing:
        raise ValueError(
            f"The archive lacks {', '.join(missing)} at its top level; a model archive holds "
            f"{', '.join(REQUIRED_FILES)} (an Optimum ONNX export)."
        )
    return ArchiveContents(files=files, unpacked_bytes=total)
