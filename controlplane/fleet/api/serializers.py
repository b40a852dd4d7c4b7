"""Serializers for deployments, replicas and revisions, and for nodes with their rollout."""

from __future__ import annotations

import copy
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from django.db.models.manager import BaseManager
from drf_spectacular.utils import extend_schema_field
from pydantic import ValidationError as PydanticValidationError
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied

from agent.protocol import ArtifactRef
from controlplane.core.api import StrictSerializer, WritableTenantObjectField
from controlplane.core.scoping import is_platform_admin, writable_tenant_ids
from controlplane.fleet import selectors
from controlplane.fleet.choices import RolloutState
from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.fleet.services import rollout_state
from controlplane.inventory.api.serializers import (
    DriveSerializer,
    GpuSerializer,
    NicSerializer,
    NumaNodeSerializer,
)
from controlplane.inventory.models import Node
from controlplane.inventory.validators import validate_labels
from controlplane.storage.models import Artifact
from controlplane.tenancy.api.fields import WritableTenantField
from controlplane.tenancy.models import Tenant


class ServingDeploymentField(serializers.PrimaryKeyRelatedField):
    """A deployment serving a tenant the caller administers: its own or one shared with it.
    Any other reads as unknown."""

    def get_queryset(self) -> QuerySet[Deployment]:
        request = self.context.get("request")
        tenant_ids = writable_tenant_ids(request.user if request else None)
        queryset = Deployment.objects.all()
        return queryset if tenant_ids is None else queryset.filter(selectors.serving(tenant_ids))


class _AddressedList(serializers.ListSerializer):
    """Reads a page's deployments' addresses in one query."""

    def to_representation(self, data: Any) -> list[Any]:
        page = list(data.all() if isinstance(data, QuerySet | BaseManager) else data)
        selectors.attach_addresses(page)
        return super().to_representation(page)


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
    url = serializers.SerializerMethodField(
        help_text="The deployment's one OpenAI address: a gateway that reaches every replica "
        "(all on its node, or the others' workers reachable across nodes); null while none does."
    )
    endpoints = serializers.SerializerMethodField(
        help_text="Every gateway in front of it: the one of each node it runs on (with no "
        "gateway answering yet, none)."
    )
    shared_with = serializers.PrimaryKeyRelatedField(
        many=True,
        queryset=Tenant.objects.filter(is_active=True),
        required=False,
        help_text="Other tenants this deployment's workers also serve, each under its own "
        "tenant policy. Platform admins set it, and only they see it.",
    )

    class Meta:
        model = Deployment
        list_serializer_class = _AddressedList
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
            "tpot_steps",
            "url",
            "endpoints",
            "shared_with",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    def _by_platform_admin(self) -> bool:
        request = self.context.get("request")
        return is_platform_admin(request.user if request else None)

    def to_representation(self, instance: Deployment) -> dict[str, Any]:
        """Who else a deployment serves is the platform's business, not its tenants'."""
        data = super().to_representation(instance)
        if not self._by_platform_admin():
            data.pop("shared_with", None)
        return data

    def get_url(self, deployment: Deployment) -> str | None:
        return selectors.client_url(deployment)

    def get_endpoints(self, deployment: Deployment) -> list[str]:
        return selectors.endpoints(deployment)

    def validate_shared_with(self, value: list[Tenant]) -> list[Tenant]:
        if not self._by_platform_admin():
            raise PermissionDenied("Only platform admins share deployments with other tenants.")
        return value

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


REDACTED = "(shown to platform admins only)"


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
    """With the signed document, exactly as the agent received it; its deployments' peer
    keys (which let a caller past their gateways) shown to platform admins only."""

    class Meta(RevisionSummarySerializer.Meta):
        fields = [*RevisionSummarySerializer.Meta.fields, "document"]
        read_only_fields = fields

    def to_representation(self, instance: Revision) -> dict[str, Any]:
        data = super().to_representation(instance)
        request = self.context.get("request")
        if not is_platform_admin(request.user if request else None):
            data["document"] = copy.deepcopy(data["document"])
            gateway = data["document"]["state"]["components"].get("gateway") or {}
            for peer in gateway.get("peers", []):
                peer["key"] = REDACTED
        return data


class RolloutSerializer(serializers.Serializer):
    desired_generation = serializers.IntegerField(allow_null=True)
    applied_generation = serializers.IntegerField()
    state = serializers.ChoiceField(choices=RolloutState.choices)
    pinned = serializers.BooleanField(help_text="Held at a rolled-back revision.")
    last_rejection_reason = serializers.CharField()
    last_rejection_detail = serializers.CharField()
    last_rejection_at = serializers.DateTimeField(allow_null=True)


class NodeSerializer(StrictSerializer):
    tenant = WritableTenantField(allow_null=True, required=False)
    labels = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
    gpus = GpuSerializer(many=True, read_only=True)
    nics = NicSerializer(many=True, read_only=True)
    drives = DriveSerializer(many=True, read_only=True)
    numa_nodes = NumaNodeSerializer(many=True, read_only=True)
    rollout = serializers.SerializerMethodField()
    last_heartbeat_at = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="When its agent was last heard."
    )

    class Meta:
        model = Node
        fields = [
            "id",
            "hostname",
            "tenant",
            "labels",
            "status",
            "maintenance",
            "maintenance_reason",
            "gateway",
            "agent_version",
            "last_heartbeat_at",
            "kernel",
            "os",
            "cpu_model",
            "cpu_count",
            "memory_total_bytes",
            "numa_nodes",
            "gpus",
            "nics",
            "drives",
            "rollout",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "hostname",
            "status",
            "agent_version",
            "last_heartbeat_at",
            "kernel",
            "os",
            "cpu_model",
            "cpu_count",
            "memory_total_bytes",
            "created_at",
            "updated_at",
        ]

    @extend_schema_field(RolloutSerializer)
    def get_rollout(self, node: Node) -> dict[str, Any]:
        desired = getattr(node, "desired_generation", None)
        return {
            "desired_generation": desired,
            "applied_generation": node.applied_generation,
            "state": rollout_state(
                desired, node.applied_generation, getattr(node, "head_status", None)
            ),
            "pinned": node.pinned,
            "last_rejection_reason": node.last_rejection_reason,
            "last_rejection_detail": node.last_rejection_detail,
            "last_rejection_at": node.last_rejection_at,
        }

    def validate_labels(self, value: Any) -> Any:
        try:
            validate_labels(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from exc
        return value
