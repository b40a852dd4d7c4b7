"""Serializers for deployments, replicas and revisions."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from pydantic import ValidationError as PydanticValidationError
from rest_framework import serializers

from agent.protocol import ArtifactRef
from controlplane.core.api import StrictSerializer, WritableTenantField, WritableTenantObjectField
from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.inventory.validators import validate_labels
from controlplane.storage.models import Artifact


class DeploymentSerializer(StrictSerializer):
    tenant = WritableTenantField()
    node_selector = serializers.DictField(
        child=serializers.CharField(allow_blank=True), required=False
    )
    runtime_options = serializers.DictField(required=False)
    placed_replicas = serializers.IntegerField(read_only=True, required=False)
    artifact = WritableTenantObjectField(
        queryset=Artifact.objects.all(),
        allow_null=True,
        required=False,
        help_text="An uploaded model archive of the same tenant; instead of artifact_uri.",
    )

    class Meta:
        model = Deployment
        fields = [
            "id",
            "tenant",
            "name",
            "model_name",
            "artifact",
            "model_volume_bytes",
            "artifact_uri",
            "artifact_sha256",
            "artifact_size_bytes",
            "runtime_options",
            "replicas",
            "placed_replicas",
            "gpus_per_replica",
            "gpu_model",
            "min_gpu_memory_bytes",
            "node_selector",
            "placement_strategy",
            "max_batch_size",
            "max_tokens_per_step",
            "max_queue_delay_ms",
            "max_queue_len",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    def validate_node_selector(self, value: Any) -> Any:
        try:
            validate_labels(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from exc
        return value

    def validate_runtime_options(self, value: dict[str, Any]) -> dict[str, Any]:
        for key, item in value.items():
            if not isinstance(item, str | int | float | bool):
                raise serializers.ValidationError(
                    f"{key!r}: values are strings, numbers or booleans."
                )
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """An artifact_uri must make a reference the agent protocol accepts (the model checks
        that exactly one of artifact and artifact_uri is given)."""
        current = (
            {
                f: getattr(self.instance, f)
                for f in ("artifact_uri", "artifact_sha256", "artifact_size_bytes")
            }
            if self.instance
            else {}
        )
        merged = {**current, **attrs}
        if not merged.get("artifact_uri"):
            return attrs
        try:
            ArtifactRef(
                uri=merged.get("artifact_uri", ""),
                sha256=merged.get("artifact_sha256") or None,
                size_bytes=merged.get("artifact_size_bytes"),
            )
        except PydanticValidationError as exc:
            messages = [error["msg"].removeprefix("Value error, ") for error in exc.errors()]
            raise serializers.ValidationError({"artifact_uri": messages}) from None
        return attrs


class ReplicaSerializer(serializers.ModelSerializer):
    hostname = serializers.CharField(source="node.hostname", read_only=True, default=None)
    volume = serializers.SerializerMethodField(help_text="The model volume's name on the node.")

    class Meta:
        model = Replica
        fields = [
            "id",
            "deployment",
            "index",
            "node",
            "hostname",
            "gpu_indices",
            "port",
            "pool",
            "volume",
            "reason",
            "explanation",
            "updated_at",
        ]
        read_only_fields = fields

    def get_volume(self, replica: Replica) -> str | None:
        return replica.volume_name if replica.pool_id else None


class RevisionSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = Revision
        fields = [
            "id",
            "node",
            "generation",
            "content_hash",
            "cause",
            "status",
            "results",
            "rejection_reason",
            "reported_at",
            "created_at",
        ]
        read_only_fields = fields


class RevisionSerializer(RevisionSummarySerializer):
    """With the signed document, exactly as the agent received it."""

    class Meta(RevisionSummarySerializer.Meta):
        fields = [*RevisionSummarySerializer.Meta.fields, "document"]
        read_only_fields = fields
