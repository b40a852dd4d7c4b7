"""Storage pools per node, tenants' volumes with QoS and NVMe-oF exports, and model artifacts.

Volumes are placed into pools by the control plane (see `services`); nodes' agents make the
engine hold them and report pool capacity, per-volume I/O and export endpoints back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from uuid import UUID

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from pydantic import Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from agent.protocol import Nqn, PoolSpec, export_nqn
from controlplane.core.models import BaseModel, TenantOwnedModel
from controlplane.storage.choices import PoolKind
from controlplane.tenancy.models import slug_validator

pool_name_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9_-]{0,47}$",
    "Use 1-48 lowercase letters, digits, '-' or '_', starting with a letter or digit.",
)


MAX_READ_PROBE_PER_S = 10_000


def wire_name(prefix: str, pk: UUID) -> str:
    """A volume's name on its node: unique there and short enough for SPDK lvol names."""
    return f"{prefix}-{pk.hex[:24]}"


class Pool(BaseModel):
    """Where a node's volumes are carved from: a directory (local engine), or an NVMe drive
    or a file (SPDK)."""

    node = models.ForeignKey(
        "inventory.Node", on_delete=models.CASCADE, related_name="storage_pools"
    )
    name = models.CharField(max_length=48, validators=[pool_name_validator])
    kind = models.CharField(max_length=8, choices=PoolKind.choices, default=PoolKind.LOCAL)
    directory = models.CharField(
        max_length=1024,
        blank=True,
        help_text="local: an absolute directory on the node; empty puts it under the agent's "
        "state directory.",
    )
    device = models.CharField(
        max_length=32,
        blank=True,
        help_text="spdk: the PCI address of the NVMe drive, e.g. 0000:5e:00.0.",
    )
    aio_path = models.CharField(
        max_length=1024,
        blank=True,
        help_text="spdk, instead of device: an absolute path to a file or block device on the "
        "node (for machines without a spare NVMe drive); a missing file is created at "
        "capacity_bytes. Whatever it holds is replaced by the pool.",
    )
    capacity_bytes = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="local: a cap on what volumes may take; empty means the filesystem's size. "
        "spdk on aio_path: the size its file is created at, a multiple of 4096.",
    )
    reported_capacity_bytes = models.PositiveBigIntegerField(null=True, blank=True, editable=False)
    reported_free_bytes = models.PositiveBigIntegerField(null=True, blank=True, editable=False)
    volume_io = models.JSONField(
        default=dict,
        blank=True,
        editable=False,
        help_text="The latest per-volume I/O rates the agent reported, by volume name on the node.",
    )
    reported_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["node__hostname", "name"]
        constraints = [models.UniqueConstraint(fields=["node", "name"], name="pool_name_per_node")]

    def __str__(self) -> str:
        return f"{self.node}/{self.name}"

    @property
    def known_capacity_bytes(self) -> int | None:
        """What volumes may take: as the engine reported it, else the configured cap."""
        reported = self.reported_capacity_bytes
        return reported if reported is not None else self.capacity_bytes

    def spec(self) -> PoolSpec:
        return PoolSpec(
            name=self.name,
            kind=self.kind,
            directory=self.directory or None,
            device=self.device or None,
            aio_path=self.aio_path or None,
            capacity_bytes=self.capacity_bytes,
        )

    def clean(self) -> None:
        """The agent protocol decides what a valid pool is; its messages name the fields."""
        try:
            self.spec()
        except PydanticValidationError as exc:
            errors: dict[str, list[str]] = {}
            for error in exc.errors():
                field = str(error["loc"][0]) if error["loc"] else "kind"
                errors.setdefault(field, []).append(error["msg"].removeprefix("Value error, "))
            raise ValidationError(errors) from None


class QosPolicy(TenantOwnedModel):
    """Rate limits a tenant attaches to volumes (SPDK bdev QoS units; 0 means unlimited)."""

    name = models.CharField(max_length=63, validators=[slug_validator])
    rw_ios_per_sec = models.PositiveBigIntegerField(
        default=0, help_text="Read+write IO/s; SPDK rounds up to a multiple of 1000."
    )
    rw_mbytes_per_sec = models.PositiveBigIntegerField(default=0, help_text="Read+write MiB/s.")
    r_mbytes_per_sec = models.PositiveBigIntegerField(default=0, help_text="Read MiB/s.")
    w_mbytes_per_sec = models.PositiveBigIntegerField(default=0, help_text="Write MiB/s.")

    class Meta:
        ordering = ["tenant__slug", "name"]
        verbose_name = "storage QoS policy"
        verbose_name_plural = "storage QoS policies"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="qos_name_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.name}"


class Volume(TenantOwnedModel):
    """A tenant's volume; placement chose its pool (and so its node) when it was created."""

    name = models.CharField(max_length=63, validators=[slug_validator])
    size_bytes = models.PositiveBigIntegerField(validators=[MinValueValidator(1)])
    pool = models.ForeignKey(Pool, on_delete=models.PROTECT, related_name="volumes")
    qos_policy = models.ForeignKey(
        QosPolicy,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="volumes",
    )
    read_probe_per_s = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(MAX_READ_PROBE_PER_S)],
        help_text="Random 4 KiB reads per second the node's agent makes to measure read "
        "latency as a reader sees it, QoS included (storage-read SLOs count them); 0: none. "
        "Local pools only: an SPDK volume's reads are measured where they are issued.",
    )

    class Meta:
        ordering = ["tenant__slug", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="volume_name_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.name}"

    @property
    def wire_name(self) -> str:
        return wire_name("v", self.pk)

    def clean(self) -> None:
        if self.qos_policy is not None and self.qos_policy.tenant_id != self.tenant_id:
            raise ValidationError({"qos_policy": ["The policy belongs to another tenant."]})
        if self.read_probe_per_s and self.pool_id and self.pool.kind != PoolKind.LOCAL:
            raise ValidationError(
                {
                    "read_probe_per_s": [
                        f"Pool {self.pool.name} is an {self.pool.kind} pool: read probes run on "
                        "local pools; measure an SPDK volume's reads at its initiator."
                    ]
                }
            )


class Export(TenantOwnedModel):
    """The tenant's NVMe-oF subsystem on every SPDK node holding its volumes.

    Only the listed host NQNs may connect. Each node's agent picks the transport (RDMA when
    it has an active RDMA port, else TCP) and reports where it listens in `endpoints`.
    """

    hosts = models.JSONField(help_text="Host NQNs allowed to connect.")
    endpoints = models.JSONField(default=list, blank=True, editable=False)

    class Meta:
        ordering = ["tenant__slug"]
        constraints = [models.UniqueConstraint(fields=["tenant"], name="one_export_per_tenant")]

    def __str__(self) -> str:
        return self.nqn

    @property
    def nqn(self) -> str:
        return export_nqn(self.tenant_id)

    def clean(self) -> None:
        try:
            _HOSTS.validate_python(self.hosts)
        except PydanticValidationError as exc:
            messages = [
                f"{'.'.join(map(str, e['loc'])) or 'hosts'}: {e['msg']}" for e in exc.errors()
            ]
            raise ValidationError({"hosts": messages}) from None


_HOSTS = TypeAdapter(Annotated[list[Nqn], Field(min_length=1, max_length=64)])


class Artifact(TenantOwnedModel):
    """A model archive a tenant uploaded: a tar of model.onnx, config.json and tokenizer.json.

    `sha256` and the sizes are the server's own, computed while the upload streamed to disk.
    """

    name = models.CharField(max_length=63, validators=[slug_validator])
    sha256 = models.CharField(max_length=64, editable=False)
    size_bytes = models.PositiveBigIntegerField(editable=False)
    unpacked_bytes = models.PositiveBigIntegerField(editable=False)
    files = models.JSONField(
        default=list, editable=False, help_text="[{name, size_bytes}] in the archive."
    )

    class Meta:
        ordering = ["tenant__slug", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="artifact_name_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.name}"

    @property
    def path(self) -> Path:
        return artifact_dir() / f"{self.pk}.tar"


def artifact_dir() -> Path:
    return Path(settings.DATA_DIR) / "artifacts"
