"""Deployments, their replicas' placement, and the desired-state revisions sent to nodes."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from controlplane.core.models import BaseModel, TenantOwnedModel
from controlplane.fleet.choices import PlacementStrategy, RevisionStatus
from controlplane.inventory.validators import validate_labels
from controlplane.storage.models import wire_name
from controlplane.tenancy.models import slug_validator

MIB = 1 << 20


class Deployment(TenantOwnedModel):
    """A model served for its tenant, and for the tenants it is shared with: what to run,
    how many, on what hardware, how batched.

    A shared deployment's workers serve every one of those tenants, each under its own
    tenant policy (fair-share weight, priority, limits), so one tenant's load shows in
    the others' latency unless its policy holds it back.
    """

    name = models.CharField(max_length=63, validators=[slug_validator])
    model_name = models.CharField(
        max_length=128, help_text="The name clients pass as `model` to the OpenAI-compatible API."
    )
    artifact_uri = models.CharField(
        max_length=2048,
        blank=True,
        help_text="Where the model comes from: an artifact URL, or synthetic://NAME?layers=..&hidden=..; "
        "empty when `artifact` names an uploaded one.",
    )
    artifact = models.ForeignKey(
        "storage.Artifact",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="deployments",
        help_text="An uploaded model archive of the same tenant.",
    )
    model_volume_bytes = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="With an artifact: the size of each replica's model volume (the archive, its "
        "files and the TensorRT cache). Default: the archive plus twice its files.",
    )
    artifact_sha256 = models.CharField(max_length=64, blank=True)
    artifact_size_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    runtime_options = models.JSONField(default=dict, blank=True)
    replicas = models.PositiveSmallIntegerField(default=1, validators=[MaxValueValidator(256)])
    gpus_per_replica = models.PositiveSmallIntegerField(
        default=0, validators=[MaxValueValidator(16)]
    )
    gpu_model = models.CharField(
        max_length=100, blank=True, help_text="Only GPUs whose name contains this (e.g. H100)."
    )
    min_gpu_memory_bytes = models.PositiveBigIntegerField(default=0)
    node_selector = models.JSONField(
        default=dict,
        blank=True,
        validators=[validate_labels],
        help_text='Labels a node must carry, e.g. {"zone": "eu-1"}.',
    )
    placement_strategy = models.CharField(
        max_length=8,
        choices=PlacementStrategy.choices,
        default=PlacementStrategy.SPREAD,
        help_text="Among nodes equally well wired: spread replicas (availability) or pack them "
        "(keep whole nodes free).",
    )
    max_batch_size = models.PositiveIntegerField(default=32, validators=[MinValueValidator(1)])
    max_tokens_per_step = models.PositiveIntegerField(
        default=512, validators=[MinValueValidator(1)]
    )
    max_queue_delay_ms = models.PositiveIntegerField(default=0)
    max_queue_len = models.PositiveIntegerField(default=128, validators=[MinValueValidator(1)])
    tpot_steps = models.BooleanField(
        default=False,
        help_text="Size each decode step to the tightest TPOT objective of the tenants it "
        "serves: rows beyond what keeps their time per output token wait, so throughput is "
        "given up for it.",
    )
    shared_with = models.ManyToManyField(
        "tenancy.Tenant",
        blank=True,
        related_name="shared_deployments",
        help_text="Other tenants this deployment's workers also serve (platform admins set it); "
        "they use it with their own inference keys and see only their own traffic.",
    )

    class Meta:
        ordering = ["tenant__slug", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="deployment_name_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.name}"

    def clean(self) -> None:
        """Exactly one model source; an uploaded one gets a volume that can hold it."""
        if (self.artifact_id is None) == (not self.artifact_uri):
            raise ValidationError(
                {
                    "artifact": [
                        "Name exactly one of artifact (an uploaded archive) and artifact_uri "
                        "(synthetic:// or a URL)."
                    ]
                }
            )
        if self.artifact is None:
            if self.model_volume_bytes is not None:
                raise ValidationError(
                    {
                        "model_volume_bytes": [
                            "Only deployments of an uploaded artifact stage their model into a volume."
                        ]
                    }
                )
            return
        if self.artifact.tenant_id != self.tenant_id:
            raise ValidationError({"artifact": ["The artifact belongs to another tenant."]})
        needed = self.artifact.size_bytes + self.artifact.unpacked_bytes
        if self.model_volume_bytes is None:
            self.model_volume_bytes = -(-(needed + self.artifact.unpacked_bytes) // MIB) * MIB
        elif self.model_volume_bytes < needed:
            raise ValidationError(
                {
                    "model_volume_bytes": [
                        f"Too small for the artifact: it needs {needed} bytes (the archive and its files)."
                    ]
                }
            )


class Replica(BaseModel):
    """One copy of a deployment: where placement put it, or why it could not."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="instances")
    index = models.PositiveSmallIntegerField()
    node = models.ForeignKey(
        "inventory.Node", on_delete=models.SET_NULL, null=True, blank=True, related_name="replicas"
    )
    gpu_indices = models.JSONField(default=list, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    url = models.CharField(
        max_length=2048,
        blank=True,
        help_text="Where other nodes' gateways reach the worker, as its node's agent reported "
        "it; empty: the worker serves its own node's gateway alone.",
    )
    pool = models.ForeignKey(
        "storage.Pool",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="model_volumes",
        help_text="The pool on the replica's node holding its model volume.",
    )
    reason = models.TextField(blank=True, help_text="Why here, or why not placed.")
    explanation = models.JSONField(
        default=dict,
        blank=True,
        help_text="The reason as data: chosen GPUs and their NUMA neighbours, the strategy's "
        "count, nodes that fit and why the others were ruled out.",
    )

    class Meta:
        ordering = ["deployment", "index"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "index"], name="replica_index_per_deployment"
            )
        ]

    def __str__(self) -> str:
        return f"{self.deployment.name}#{self.index}"

    @property
    def volume_name(self) -> str:
        """The model volume's name on the node."""
        return wire_name("m", self.pk)


class Revision(BaseModel):
    """One signed desired state for one node. Generations only grow; a rollback is a new one."""

    node = models.ForeignKey("inventory.Node", on_delete=models.CASCADE, related_name="revisions")
    generation = models.PositiveBigIntegerField()
    content_hash = models.CharField(max_length=64)
    document = models.JSONField(help_text="The SignedDesiredState exactly as sent.")
    cause = models.CharField(max_length=200, blank=True)
    status = models.CharField(
        max_length=16, choices=RevisionStatus.choices, default=RevisionStatus.PENDING
    )
    results = models.JSONField(default=list, blank=True, help_text="Per-component outcome.")
    rejection_reason = models.CharField(max_length=32, blank=True)
    reported_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["node", "-generation"]
        constraints = [
            models.UniqueConstraint(fields=["node", "generation"], name="generation_per_node")
        ]
        indexes = [models.Index(fields=["node", "-generation"])]

    def __str__(self) -> str:
        return f"{self.node_id}@{self.generation}"
