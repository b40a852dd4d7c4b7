"""Staging a model archive into a volume: the worker supervisor's path and `tailguard-agent stage`.

The archive is downloaded with HTTP Range requests (resumable, sha256-verified, refetched
when corrupt) into `model.tar` of the volume, then unpacked into `model/` beside it; the
worker's TensorRT engine cache goes to `trt-cache/` on the same volume, so a model and
what was built from it live and die together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.protocol import ArtifactRef
from dataplane.storage.artifacts import (
    ArtifactSource,
    ProgressCallback,
    stage_artifact,
    unpack_archive,
)
from dataplane.storage.engine import FileVolumes

ARCHIVE = "model.tar"
MODEL_DIR = "model"
CACHE_DIR = "trt-cache"


def credential_headers(url: str, control_plane_url: str, credential: str | None) -> dict[str, str]:
    """The node credential goes to the control plane only, never to another artifact host."""
    if credential and url.startswith(control_plane_url.rstrip("/") + "/"):
        return {"Authorization": f"Node {credential}"}
    return {}


def stage_model(
    volumes: FileVolumes,
    volume: str,
    artifact: ArtifactRef,
    *,
    headers: dict[str, str],
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Download and unpack `artifact` into the volume; returns the model directory."""
    if artifact.sha256 is None or artifact.size_bytes is None:
        raise ValueError(f"artifact {artifact.uri} has no sha256 and size to verify against")
    source = ArtifactSource(
        url=artifact.uri, sha256=artifact.sha256, size_bytes=artifact.size_bytes
    )
    stage_artifact(volumes, volume, ARCHIVE, source, headers=headers, on_progress=on_progress)
    return unpack_archive(volumes, volume, ARCHIVE, MODEL_DIR, artifact.sha256)


@dataclass(frozen=True)
class ModelStager:
    """How this node stages models: into its engine's file volumes, with its credential."""

    volumes: FileVolumes | None
    """None when the engine's volumes are block devices (SPDK lvols), not directories."""
    control_plane_url: str
    credential: str

    def stage(self, artifact: ArtifactRef, volume: str) -> tuple[Path, Path]:
        """(model directory, TensorRT cache directory), both on `volume`."""
        if self.volumes is None:
            raise ValueError(
                f"volume {volume} is an SPDK block device; staging a model needs a directory "
                "volume, so run this node's storage on the local engine"
            )
        headers = credential_headers(artifact.uri, self.control_plane_url, self.credential)
        model_dir = stage_model(self.volumes, volume, artifact, headers=headers)
        return model_dir, self.volumes.volume_path(volume) / CACHE_DIR

    def pool_directory(self, volume: str) -> Path:
        """The directory of the pool `volume` lies in (the local engine keeps each volume as a
        directory of its pool's): as far up as a worker is let through to its model."""
        if self.volumes is None:
            raise ValueError(f"volume {volume} is an SPDK block device, not a directory")
        return self.volumes.volume_path(volume).parent
