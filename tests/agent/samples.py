"""Valid instances of every protocol message, for round-trip and mutation tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import (
    AppliedStatus,
    ArtifactRef,
    ComponentResult,
    Components,
    DesiredState,
    DriveFacts,
    Enrollment,
    EnrollmentGrant,
    ExportSpec,
    GpuFacts,
    Heartbeat,
    HostFacts,
    Inventory,
    NicFacts,
    NumaNodeFacts,
    QosSpec,
    SeriesSketch,
    SloThreshold,
    TelemetryBatch,
    TenantServing,
    ThresholdCount,
    VolumeSpec,
    WorkerSpec,
    encode_public_key,
    queue_name,
    sign_state,
)

NODE = UUID("6f1c1b8e-3a43-4c1e-9a59-0d7c2f0f4b11")
TENANT = UUID("0b7f5d55-7f37-4e9e-8b1c-2a5b0e4c6d01")
OTHER_TENANT = UUID("9a3c8f10-1d2e-4f5a-8b6c-7d8e9f0a1b2c")
DEPLOYMENT = UUID("3d2a1f00-5b6c-4d7e-8f90-a1b2c3d4e5f6")
REPLICA = UUID("c0ffee00-1234-4abc-8def-0123456789ab")
SLO = UUID("5e1f0a2b-3c4d-4e5f-9a0b-1c2d3e4f5a6b")
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SHA = "a" * 64
CONTROL_PLANE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def host() -> HostFacts:
    return HostFacts(
        hostname="gpu-node-01",
        kernel="6.8.0-45-generic",
        os="Ubuntu 24.04.1 LTS",
        cpu_model="AMD EPYC 9454 48-Core Processor",
        cpu_count=96,
        memory_bytes=1_622_000_000_000,
    )


def inventory() -> Inventory:
    return Inventory(
        host=host(),
        numa=[
            NumaNodeFacts(index=0, cpulist="0-47,96-143", memory_total_bytes=811 << 30),
            NumaNodeFacts(index=1, cpulist="48-95,144-191", memory_total_bytes=811 << 30),
        ],
        gpus=[
            GpuFacts(
                index=0,
                uuid="GPU-5b3f3d0e-8c1a-2b7e-4f61-9d0a7c3e2b18",
                name="NVIDIA H100 80GB HBM3",
                memory_total_bytes=85_520_809_984,
                mig_mode="disabled",
                pci_bus_id="0000:17:00.0",
                numa_node=0,
                driver_version="550.90.07",
                cuda_driver_version="12.4",
            )
        ],
        nics=[
            NicFacts(
                device="mlx5_0",
                port=1,
                state="active",
                speed_gbps=400.0,
                width="4X",
                link_layer="InfiniBand",
                netdev="ibp23s0",
                pci_bus_id="0000:18:00.0",
                numa_node=0,
                gid="fe80:0000:0000:0000:a088:c203:0045:6a2c",
            )
        ],
        drives=[
            DriveFacts(
                name="nvme0n1",
                model="SAMSUNG MZQL23T8HCLS-00A07",
                serial="S64HNE0T123456",
                firmware="GDC5602Q",
                capacity_bytes=3_840_755_982_336,
                logical_block_size=4096,
                pci_bus_id="0000:c1:00.0",
                numa_node=1,
            )
        ],
    )


def components() -> Components:
    return Components(
        workers=[
            WorkerSpec(
                replica_id=REPLICA,
                deployment_id=DEPLOYMENT,
                tenant_id=TENANT,
                model_name="llama-3.1-8b-instruct",
                artifact=ArtifactRef(
                    uri="s3://models/llama-3.1-8b/model.onnx", sha256=SHA, size_bytes=16 << 30
                ),
                runtime_options={"execution_provider": "tensorrt", "fp16": True, "workspace_gb": 8},
                gpu_indices=[0],
                port=8101,
                max_batch_size=64,
                max_tokens_per_step=8192,
                max_queue_delay_ms=5,
                max_queue_len=1024,
                tenants=[
                    TenantServing(tenant_id=TENANT, weight=3.0, priority=1, key_hashes=[SHA]),
                    TenantServing(tenant_id=OTHER_TENANT, weight=1.0, priority=0, key_hashes=[]),
                ],
            )
        ],
        volumes=[VolumeSpec(name="kv-cache-a", tenant_id=TENANT, pool="nvme0", size_bytes=1 << 40)],
        exports=[
            ExportSpec(
                volume="kv-cache-a",
                tenant_id=TENANT,
                nqn="nqn.2024-01.io.tailguard:kv-cache-a",
                hosts=["nqn.2014-08.org.nvmexpress:uuid:4c4c4544-0035-3310-8052-b4c04f4e3332"],
                transport="rdma",
            )
        ],
        qos=[
            QosSpec(
                volume="kv-cache-a",
                rw_ios_per_sec=200_000,
                rw_mbytes_per_sec=0,
                r_mbytes_per_sec=4000,
                w_mbytes_per_sec=1000,
            )
        ],
        slo_thresholds=[
            SloThreshold(
                slo_id=SLO,
                tenant_id=TENANT,
                deployment_id=DEPLOYMENT,
                metric="ttft",
                threshold_seconds=0.5,
            ),
            SloThreshold(
                slo_id=UUID(int=SLO.int + 1),
                tenant_id=TENANT,
                deployment_id=None,
                metric="availability",
                threshold_seconds=None,
            ),
        ],
    )


def desired_state(generation: int = 7) -> DesiredState:
    return DesiredState.build(NODE, generation, NOW, components())


def all_messages() -> list[object]:
    """One valid instance of every top-level message type."""
    key = CONTROL_PLANE_KEY
    state = desired_state()
    return [
        Enrollment(
            bootstrap_token="tgb_Zx9q2Lw8Vt4Rk1Mn",
            hostname="gpu-node-01",
            agent_version="0.1.0",
            host=host(),
        ),
        EnrollmentGrant(
            node_id=NODE,
            node_credential="tgn_8f2d3c4b5a69788796a5b4c3d2e1f0",
            control_plane_public_key=encode_public_key(key.public_key()),
            queue=queue_name(NODE),
            broker_url="redis://broker.internal:6379/0",
            heartbeat_interval_s=15.0,
        ),
        inventory(),
        Heartbeat(
            node_id=NODE,
            sent_at=NOW,
            agent_version="0.1.0",
            applied_generation=6,
            uptime_s=3600.5,
        ),
        state,
        sign_state(state, key),
        AppliedStatus(
            node_id=NODE,
            generation=7,
            content_hash=state.content_hash,
            state="failed",
            components=[
                ComponentResult(kind="worker", name=str(REPLICA), ok=True, error=None),
                ComponentResult(
                    kind="volume", name="kv-cache-a", ok=False, error="pool nvme0 is full"
                ),
            ],
            reported_at=NOW,
        ),
        AppliedStatus(
            node_id=NODE,
            generation=7,
            content_hash=state.content_hash,
            state="rejected",
            components=[],
            reported_at=NOW,
            rejection_reason="bad_signature",
        ),
        TelemetryBatch(
            node_id=NODE,
            seq=42,
            interval_start=NOW,
            interval_end=NOW + timedelta(seconds=1),
            gauges={"gpu.0.utilization": 0.93, "kv_cache_usage_ratio": 0.41},
            series=[
                SeriesSketch(
                    tenant_id=TENANT,
                    deployment_id=DEPLOYMENT,
                    metric="ttft",
                    sketch="CgQIARAB",
                    thresholds=[
                        ThresholdCount(slo_id=SLO, threshold_seconds=0.5, good=118, total=120)
                    ],
                )
            ],
            counters={"requests_total": 120, "tokens_generated_total": 48_213},
        ),
    ]
