"""`tailguard-agent`: run the node agent, simulate many, stage a model, or print discovery."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pynvml
from tqdm import tqdm

from agent.client import ControlPlaneClient, ControlPlaneError, http_client
from agent.discovery import discover
from agent.enroll import EnrollmentError, Identity, load_or_enroll
from agent.gauges import AppliedComponents, GpuGauges, HostGauges, StorageGauges, WorkerStats
from agent.metrics import AgentCollector, MetricsServer
from agent.privileges import gateway_account, worker_account
from agent.probes import ReadProbes
from agent.protocol import EXPORT_NQN_PREFIX, ArtifactRef, Inventory, decode_public_key
from agent.reconciler import Reconciler
from agent.runner import NodeAgent, RootTaskFailed
from agent.settings import AgentSettings
from agent.shipper import open_shipper
from agent.simulate import simulate
from agent.staging import ModelStager, credential_headers, stage_model
from agent.storage import StorageDriver
from agent.supervisor import (
    GatewaySettings,
    GatewaySupervisor,
    SupervisorSettings,
    WorkerSupervisor,
)
from agent.tasks import Consumer
from dataplane.storage.artifacts import DirectoryVolumes
from dataplane.storage.engine import StorageError
from dataplane.storage.local import LocalEngine
from dataplane.storage.spdk import SpdkEngine

log = logging.getLogger("agent")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def open_storage(settings: AgentSettings, inventory: Inventory) -> StorageDriver:
    """SPDK when the agent knows spdk_tgt's socket, else the local engine in the state dir.

    Exports use RDMA when discovery found an active RDMA port, TCP otherwise.
    """
    if settings.spdk_rpc_socket:
        rdma = any(nic.state == "active" for nic in inventory.nics)
        engine = SpdkEngine(
            settings.spdk_rpc_socket, rdma_port_active=rdma, nqn_prefix=EXPORT_NQN_PREFIX
        )
        return StorageDriver(
            engine,
            "spdk",
            listen_address=settings.nvmf_listen_address,
            listen_port=settings.nvmf_listen_port,
            config_path=settings.state_dir / "spdk-config.json",
        )
    return StorageDriver(LocalEngine(settings.state_dir / "storage"), "local")


async def run_agent(settings: AgentSettings) -> None:
    def inventory() -> Inventory:
        found = discover(settings.sysfs_root)
        return found.model_copy(
            update={"host": found.host.model_copy(update={"hostname": settings.hostname})}
        )

    stop = _stop_on_signals()
    account = worker_account(settings.worker_user)
    if account is not None:
        # What the agent writes is root's alone (0600, 0700) unless opened to the worker on
        # purpose, under systemd's UMask=0077 or not.
        os.umask(0o077)
    facts = await asyncio.to_thread(inventory)
    async with http_client() as http:
        anon = ControlPlaneClient(http, settings.control_plane_url)
        identity = await load_or_enroll(
            anon, settings.state_dir, settings.hostname, facts.host, settings.bootstrap_token, stop
        )
        log.info("node %s (%s) consuming %s", identity.node_id, settings.hostname, identity.queue)
        client = anon.with_credential(identity.credential)
        supervisor = SupervisorSettings(
            work_dir=settings.state_dir,
            host=settings.worker_host,
            advertise=settings.worker_advertise,
            keep_workers=settings.keep_workers,
            account=account,
        )
        if account is not None:
            log.info("inference workers run as %s", account.name)
            await asyncio.to_thread(account.probe, supervisor.python, settings.state_dir)
        storage = open_storage(settings, facts)
        stager = ModelStager(storage.file_volumes, settings.control_plane_url, identity.credential)
        workers = WorkerSupervisor(supervisor, stager)
        gateway_user = gateway_account(settings.gateway_user, account)
        if gateway_user is not None and (account is None or gateway_user.uid != account.uid):
            log.info("the gateway runs as %s", gateway_user.name)
            await asyncio.to_thread(gateway_user.probe, supervisor.python, settings.state_dir)
        gateway = GatewaySupervisor(
            replace(supervisor, account=gateway_user),
            GatewaySettings(
                gateway_id=str(identity.node_id),
                host=settings.gateway_host,
                advertise=settings.gateway_advertise,
                counters_url=settings.gateway_counters_url,
            ),
            workers,
        )
        probes = ReadProbes(storage.probe_volumes)
        applied = AppliedComponents(settings.state_dir / "applied-components.json")
        # Storage first: probes read, and workers' models are staged into, its volumes.
        reconciler = Reconciler(
            identity.node_id,
            decode_public_key(identity.control_plane_public_key),
            [storage, probes, workers, gateway, applied],
            settings.state_dir,
        )
        telemetry = open_shipper(
            identity.node_id,
            settings.state_dir,
            client,
            [
                GpuGauges(pynvml),
                HostGauges(),
                StorageGauges(storage, identity.node_id),
                probes,
                WorkerStats(workers, applied, http, gateway),
            ],
            interval_s=settings.telemetry_interval_s,
            buffer_batches=settings.telemetry_buffer_batches,
        )
        agent = NodeAgent(
            identity,
            client,
            reconciler,
            inventory,
            inventory_interval_s=settings.inventory_interval_s,
            resync_interval_s=settings.resync_interval_s,
            telemetry=telemetry,
        )
        metrics = serve_metrics(
            settings, AgentCollector(telemetry, lambda: reconciler.applied.generation)
        )
        consumer = Consumer(
            identity.broker_url, {identity.queue: agent.receive}, name=f"agent@{settings.hostname}"
        )
        consumer.start()
        report_storage = functools.partial(
            storage.report_forever,
            client,
            identity.node_id,
            interval_s=settings.storage_report_interval_s,
        )
        try:
            await agent.run(stop, {"storage": report_storage})
        finally:
            if metrics is not None:
                metrics.stop()
            await gateway.close()
            await workers.close()
            await probes.close()
            await asyncio.to_thread(consumer.stop)


def stage(settings: AgentSettings, args: argparse.Namespace) -> Path:
    """Stage an artifact into a directory as a worker's volume gets it, with a progress bar.

    The node's saved credential (in the state dir) is sent when the URL is the control plane's.
    """
    identity = Identity.load(settings.state_dir)
    headers = credential_headers(
        args.artifact_url, settings.control_plane_url, identity.credential if identity else None
    )
    artifact = ArtifactRef(uri=args.artifact_url, sha256=args.sha256, size_bytes=args.size)
    args.dest.mkdir(parents=True, exist_ok=True)
    with tqdm(total=args.size, unit="B", unit_scale=True, unit_divisor=1024, desc="staging") as bar:
        return stage_model(
            DirectoryVolumes(args.dest),
            "",
            artifact,
            headers=headers,
            on_progress=lambda done, _total: bar.update(done - bar.n),
        )


def serve_metrics(settings: AgentSettings, collector: AgentCollector) -> MetricsServer | None:
    """The agent's /metrics; a port already taken costs the endpoint, never the agent."""
    if not settings.metrics_port:
        return None
    try:
        return MetricsServer(collector, settings.metrics_port, settings.metrics_bind_address)
    except OSError as exc:
        log.error(
            "agent /metrics not served on %s:%d: %s (set metrics_port)",
            settings.metrics_bind_address,
            settings.metrics_port,
            exc,
        )
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailguard-agent", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--config", type=Path, help="TOML settings file")
        cmd.add_argument("--control-plane", dest="control_plane_url")
        cmd.add_argument("--bootstrap-token")
        cmd.add_argument("--state-dir", type=Path)

    run = sub.add_parser("run", help="run the agent for this node")
    common(run)
    run.add_argument("--hostname")
    sim = sub.add_parser("simulate", help="run N simulated agents in this process")
    common(sim)
    sim.add_argument("--count", type=int, required=True)
    sim.add_argument("--prefix", default="sim", help="simulated hostnames are PREFIX-0000, ...")
    sim.add_argument(
        "--telemetry-interval",
        type=float,
        help="seconds between each simulated node's telemetry batches (0: none; "
        "default: the telemetry_interval_s setting)",
    )
    sub.add_parser("discover", help="print this machine's inventory as JSON")
    stg = sub.add_parser("stage", help="download and unpack a model artifact into a directory")
    common(stg)
    stg.add_argument("--artifact-url", required=True)
    stg.add_argument("--sha256", required=True, help="the artifact's sha256 (hex)")
    stg.add_argument("--size", type=int, required=True, help="the artifact's size in bytes")
    stg.add_argument("--dest", type=Path, required=True, help="directory to stage into")
    return parser


def settings_from(args: argparse.Namespace) -> AgentSettings:
    flags = {
        name: getattr(args, name)
        for name in ("control_plane_url", "bootstrap_token", "state_dir", "hostname")
        if getattr(args, name, None) is not None
    }
    return AgentSettings.load(args.config, **flags)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "discover":
        print(discover().model_dump_json(indent=2))
        return 0
    try:
        settings = settings_from(args)
        if args.command == "run":
            asyncio.run(run_agent(settings))
        elif args.command == "stage":
            print(stage(settings, args))
        else:
            if args.count < 1:
                raise ValueError("--count must be at least 1")

            async def go() -> None:
                await simulate(
                    count=args.count,
                    control_plane_url=settings.control_plane_url,
                    bootstrap_token=settings.bootstrap_token,
                    state_dir=settings.state_dir / "simulated",
                    prefix=args.prefix,
                    stop=_stop_on_signals(),
                    inventory_interval_s=settings.inventory_interval_s,
                    resync_interval_s=settings.resync_interval_s,
                    telemetry_interval_s=(
                        settings.telemetry_interval_s
                        if args.telemetry_interval is None
                        else args.telemetry_interval
                    ),
                    telemetry_buffer_batches=settings.telemetry_buffer_batches,
                )

            asyncio.run(go())
    except RootTaskFailed as exc:
        log.critical("%s; exiting", exc, exc_info=exc.__cause__)
        return 1
    except (EnrollmentError, ControlPlaneError, StorageError, ValueError, OSError) as exc:
        print(f"tailguard-agent: {exc}", file=sys.stderr)
        return 2
    return 0
