"""Nodes and their discovered hardware.

Hardware rows are written by the agent's inventory reports and are read-only to
people; operators change only labels, maintenance and tenant dedication.
"""

from __future__ import annotations

from django.db import models

from controlplane.core.models import BaseModel, HashedSecret
from controlplane.inventory.choices import LinkLayer, MigMode, NodeStatus
from controlplane.inventory.validators import validate_labels


class Node(BaseModel):
    hostname = models.CharField(max_length=253, unique=True)
    tenant = models.ForeignKey(
        "tenancy.Tenant",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="dedicated_nodes",
        help_text="Set to dedicate the node to one tenant; empty means the shared fleet.",
    )
    labels = models.JSONField(default=dict, blank=True, validators=[validate_labels])
    status = models.CharField(max_length=16, choices=NodeStatus.choices, default=NodeStatus.PENDING)
    maintenance = models.BooleanField(
        default=False, help_text="Drained: placement puts nothing new here."
    )
    maintenance_reason = models.CharField(max_length=200, blank=True)
    agent_version = models.CharField(max_length=64, blank=True)
    kernel = models.CharField(max_length=200, blank=True)
    os = models.CharField(max_length=200, blank=True)
    cpu_model = models.CharField(max_length=200, blank=True)
    cpu_count = models.PositiveIntegerField(default=0)
    memory_total_bytes = models.PositiveBigIntegerField(default=0)
    credential_digest = models.CharField(  # noqa: DJ001  (NULL, unlike "", may repeat under UNIQUE)
        max_length=64, unique=True, null=True, editable=False
    )
    last_rejection_reason = models.CharField(max_length=32, blank=True)
    last_rejection_detail = models.TextField(blank=True)
    last_rejection_at = models.DateTimeField(null=True, blank=True)
    pinned = models.BooleanField(
        default=False,
        help_text="Held at a rolled-back revision: fleet changes skip it until released.",
    )
    gateway = models.BooleanField(
        default=True,
        help_text="Runs the OpenAI gateway in front of the deployments placed on it, their "
        "clients' one address on this node.",
    )

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname


class AgentReport(models.Model):
    """What a node's agent reports every few seconds: when it was last heard and the newest
    generation it applied.

    Kept apart from the node's row, which planners lock while they place and render: a
    heartbeat is one upsert here and a status report one update, so neither ever waits
    behind planning (a node row is written only when its status or agent version changes).
    """

    node = models.OneToOneField(
        Node, on_delete=models.CASCADE, primary_key=True, related_name="report"
    )
    last_heartbeat_at = models.DateTimeField(null=True, blank=True, db_index=True)
    applied_generation = models.PositiveBigIntegerField(
        default=0, help_text="The newest desired-state generation the agent reports applied."
    )
    gateway_url = models.CharField(
        max_length=2048,
        blank=True,
        default="",
        db_default="",
        help_text="Where clients reach the node's gateway, as its agent last reported it "
        "answering; empty while it runs none.",
    )

    def __str__(self) -> str:
        return f"report of {self.node_id}"


class NodePart(models.Model):
    """A piece of discovered hardware; the agent replaces the set on every report."""

    id = models.BigAutoField(primary_key=True)
    numa_node = models.IntegerField(null=True, blank=True)

    class Meta:
        abstract = True


class NumaNode(NodePart):
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="numa_nodes")
    index = models.PositiveIntegerField()
    cpulist = models.CharField(max_length=1000, help_text="Kernel cpulist, e.g. 0-15,32-47.")
    memory_total_bytes = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["node", "index"]
        verbose_name = "NUMA node"
        constraints = [
            models.UniqueConstraint(fields=["node", "index"], name="numa_index_per_node")
        ]

    def __str__(self) -> str:
        return f"node{self.index}"


class Gpu(NodePart):
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveIntegerField()
    uuid = models.CharField(max_length=64)
    name = models.CharField(max_length=200, help_text="Model, as NVML names it.")
    memory_total_bytes = models.PositiveBigIntegerField()
    mig_mode = models.CharField(max_length=16, choices=MigMode.choices, default=MigMode.UNSUPPORTED)
    pci_bus_id = models.CharField(max_length=32)
    pci_root = models.CharField(
        max_length=32, blank=True, help_text="PCIe root port above it; empty where unknown."
    )
    driver_version = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["node", "index"]
        verbose_name = "GPU"
        constraints = [
            models.UniqueConstraint(fields=["node", "index"], name="gpu_index_per_node"),
            models.UniqueConstraint(fields=["uuid"], name="gpu_uuid_unique"),
        ]

    def __str__(self) -> str:
        return f"GPU {self.index}: {self.name}"


class Nic(NodePart):
    """An RDMA-capable port (one row per device and port)."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="nics")
    device = models.CharField(max_length=64)
    port = models.PositiveIntegerField(default=1)
    state = models.CharField(max_length=32)
    speed_gbps = models.FloatField(default=0)
    width = models.CharField(max_length=8, blank=True)
    link_layer = models.CharField(max_length=16, choices=LinkLayer.choices)
    netdev = models.CharField(max_length=64, blank=True)
    pci_bus_id = models.CharField(max_length=32, blank=True)
    pci_root = models.CharField(
        max_length=32, blank=True, help_text="PCIe root port above it; empty where unknown."
    )

    class Meta:
        ordering = ["node", "device", "port"]
        verbose_name = "RDMA NIC port"
        constraints = [
            models.UniqueConstraint(fields=["node", "device", "port"], name="nic_port_per_node")
        ]

    def __str__(self) -> str:
        return f"{self.device}/{self.port}"


class Drive(NodePart):
    """An NVMe namespace."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="drives")
    name = models.CharField(max_length=64)
    model = models.CharField(max_length=200, blank=True)
    serial = models.CharField(max_length=100, blank=True)
    firmware = models.CharField(max_length=64, blank=True)
    capacity_bytes = models.PositiveBigIntegerField()
    logical_block_size = models.PositiveIntegerField(default=512)
    pci_bus_id = models.CharField(max_length=32, blank=True)
    pci_root = models.CharField(
        max_length=32, blank=True, help_text="PCIe root port above it; empty where unknown."
    )

    class Meta:
        ordering = ["node", "name"]
        verbose_name = "NVMe drive"
        constraints = [models.UniqueConstraint(fields=["node", "name"], name="drive_name_per_node")]

    def __str__(self) -> str:
        return self.name


class BootstrapToken(HashedSecret):
    """A one-time token an agent trades for its node identity on first start."""

    tenant = models.ForeignKey(
        "tenancy.Tenant",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="+",
        help_text="Dedicate the enrolling node to this tenant; empty joins the shared fleet.",
    )
    expires_at = models.DateTimeField()
    uses_left = models.PositiveIntegerField(
        default=1, help_text="1 for one node; more to enroll a batch of nodes with one token."
    )
    used_at = models.DateTimeField(null=True, blank=True, editable=False)
    node = models.ForeignKey(Node, on_delete=models.SET_NULL, null=True, blank=True, editable=False)
    created_by = models.ForeignKey(
        "auth.User", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
