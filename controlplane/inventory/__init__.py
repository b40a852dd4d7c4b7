"""Nodes and what the agent discovered on them: GPUs, RDMA NICs, NVMe drives, NUMA."""
