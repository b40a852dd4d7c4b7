"""`tailguard demo`: the whole system on embedded defaults, in the foreground.

Migrates, seeds demo accounts, a bootstrap token, inference keys, acme's `chat`
deployment of a synthetic model with TTFT and TPOT SLOs, and the noisy tenant globex,
with whom `chat` is shared and whose tenant policy caps it; then starts the control plane
(ASGI), its Celery worker with beat, and a node agent for this machine, which enrolls and
starts the inference worker; once it has, a storage pool on that node and acme's volume
there under a QoS policy, kept busy by a reader (see `demo_storage`: SPDK when it is
found, with a target the demo starts before the agent, else the local engine);
`--nodes N` adds N simulated nodes. Prints where to look,
then runs the tour: both tenants' load, acme's TPOT SLO fitted to this machine (a new
revision the story is told against), globex's policy removed until that SLO pages
(through a signed webhook to a receiver in this process) and restored, the page
resolving once its windows have been calm for the hold time, then the SLO report.
Ctrl-C (or SIGTERM) stops every child cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from agent.privileges import WorkerUserError, worker_account
from controlplane import demo_storage, processes, tour
from controlplane.fleet import selectors as fleet_selectors
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Deployment, Replica
from controlplane.inventory.services import create_bootstrap_token
from controlplane.slo.choices import AlertName
from controlplane.tenancy.models import InferenceKey, Tenant
from controlplane.tenancy.services import (
    issue_inference_key,
    remove_tenant_policy,
    revoke,
    seed_demo,
    set_tenant_policy,
)

DEMO_MODEL = (
    "synthetic://demo-chat?layers=4&hidden=256&heads=4&kv_heads=4&vocab=1024&concat_kv=true"
)
"""Laid out as Optimum exports real architectures (a concatenated KV cache): every sequence
in a decode step costs its whole context, so the tour's noisy neighbour shows in acme's
TPOT as it does with those models."""
READY_REQUEST_TIMEOUT_S = 15.0
"""How long one readiness probe may take: a busy machine answers slowly, not never."""


@contextmanager
def _children() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait(
    what: str,
    ready: Callable[[], Any],
    procs: dict[str, subprocess.Popen[bytes]],
    timeout: float = 180,
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SystemExit(
                    f"the {name} process exited with code {proc.returncode}; "
                    f"see {settings.DATA_DIR / 'logs' / name}.log"
                )
        value = ready()
        if value:
            return value
        time.sleep(0.3)
    raise SystemExit(
        f"gave up after {timeout:.0f} s waiting for {what}; "
        f"the logs of the demo's processes are in {settings.DATA_DIR / 'logs'}"
    )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=READY_REQUEST_TIMEOUT_S).status_code == 200
    except httpx.TransportError:
        return False


@transaction.atomic
def _seed_fleet(tenant: Any) -> str:
    """The demo deployment (idempotent) and a fresh inference key, shown once."""
    for old in InferenceKey.objects.filter(tenant=tenant, name="demo", revoked_at__isnull=True):
        revoke(old)
    key = issue_inference_key(tenant=tenant, name="demo").secret
    if not Deployment.objects.filter(tenant=tenant, name="chat").exists():
        fleet.create_deployment(
            tenant=tenant,
            name="chat",
            model_name="demo-chat",
            artifact_uri=DEMO_MODEL,
            replicas=1,
            runtime_options={"intra_op_threads": 1},
        )
    return key


NOISY_POLICY = {"tokens_per_s": 150.0, "max_concurrency": 2, "priority_class": "low"}
"""globex's cap: enough for its batch work, few enough sequences in each decode step to
leave acme its per-token latency."""


def run_demo(
    *, host: str, ports: processes.DemoPorts, nodes: int = 0, tour_enabled: bool = True
) -> int:
    """Everything the demo starts listens on one of `ports` (checked free by the caller)."""
    data = settings.DATA_DIR
    print(f"Data directory: {data}")
    call_command("migrate", interactive=False, verbosity=0)
    accounts = seed_demo()
    key = _seed_fleet(accounts.tenant)
    receiver = tour.WebhookReceiver(_report_alert, port=ports.webhook_receiver)
    tenants = tour.seed_tour(accounts.tenant, receiver.url)
    receiver.secret = tenants.webhook_secret
    set_tenant_policy(tenants.noisy, **NOISY_POLICY)
    bootstrap = create_bootstrap_token(name="demo agent", uses=1 + nodes).secret
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: it may arrive ignored
        signal.signal(signum, _interrupt)
    storage = demo_storage.DemoStorage.choose(data)
    try:
        return _run(
            host, ports, accounts, key, bootstrap, tenants, receiver, nodes, tour_enabled, storage
        )
    except KeyboardInterrupt:
        print("Stopped.")
        return 0
    finally:
        storage.close()  # after _run stopped every child, the SPDK target among them
        receiver.close()


def _report_alert(status: str, alert: dict[str, Any]) -> None:
    labels = alert.get("labels", {})
    print(
        f"  webhook received (signature verified): {status} {labels.get('alertname', '')} "
        f"tenant={labels.get('tenant', '')} slo={labels.get('slo', '')} "
        f"{alert.get('annotations', {}).get('summary', '')}",
        flush=True,
    )


def _worker_user(state_dir: Path) -> dict[str, str]:
    """As root, the demo's agent runs its worker as an unprivileged account, as on a node;
    where that account cannot run this checkout's Python (a virtualenv in root's home, say),
    the worker runs as root and the demo says so instead of failing."""
    if os.geteuid() != 0 or os.environ.get("TAILGUARD_AGENT_WORKER_USER"):
        return {}
    logging.getLogger("agent.privileges").setLevel(logging.ERROR)  # said below, in full
    try:
        account = worker_account(None)
        if account is None:
            return {}
        state_dir.mkdir(parents=True, exist_ok=True)
        account.probe(sys.executable, state_dir)
    except WorkerUserError as exc:
        print(
            f"The inference worker runs as root in this demo: {exc.reason}. On a node it "
            "runs as tailguard-inference (docs/operations.md).",
            flush=True,
        )
        return {"TAILGUARD_AGENT_WORKER_USER": "root"}
    print(f"The inference worker runs as {account.name}, unprivileged.", flush=True)
    return {"TAILGUARD_AGENT_WORKER_USER": account.name}


def _interrupt(*_: object) -> None:
    """Ctrl-C or SIGTERM, at any stage: unwind, so every started child is stopped."""
    raise KeyboardInterrupt


def _run(
    host: str,
    ports: processes.DemoPorts,
    accounts: Any,
    key: str,
    bootstrap: str,
    tenants: tour.TourTenants,
    receiver: tour.WebhookReceiver,
    nodes: int,
    tour_enabled: bool,
    storage: demo_storage.DemoStorage,
) -> int:
    base = processes.url(host, ports.control_plane)
    data = settings.DATA_DIR
    logs = data / "logs"
    logs.mkdir(exist_ok=True)
    with _children() as procs:

        def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
            with open(logs / f"{name}.log", "ab") as log:
                procs[name] = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
                )

        spawn("web", processes.web(host, ports.control_plane))
        spawn("celery", processes.celery_worker(data / "celerybeat-schedule"))
        _wait(
            f"the control plane to answer {base}/api/schema/",
            lambda: _answers(f"{base}/api/schema/"),
            procs,
        )
        if storage.target_argv:
            spawn("spdk", storage.target_argv)
            storage.target_pid = procs["spdk"].pid
            _wait("spdk_tgt to answer on its socket", storage.target_ready, procs, 120)
        spawn(
            "agent",
            processes.agent(base, bootstrap, data / "agent", socket.gethostname()),
            env={
                "TAILGUARD_AGENT_METRICS_PORT": str(ports.agent_metrics),
                **_worker_user(data / "agent"),
                **storage.agent_env,
            },
        )
        print(
            "Control plane up; the agent is enrolling and starting the inference worker...",
            flush=True,
        )

        def serving() -> Replica | None:
            replica = (
                Replica.objects.filter(
                    deployment__tenant=accounts.tenant,
                    deployment__name="chat",
                    port__isnull=False,
                    node__hostname=socket.gethostname(),
                )
                .select_related("node", "deployment")
                .first()
            )
            ok = replica and _answers(f"http://127.0.0.1:{replica.port}/health")
            return replica if ok else None

        replica = _wait(
            f"the agent to enroll {socket.gethostname()} and start the inference worker of "
            "deployment 'chat' there",
            serving,
            procs,
            300,
        )
        worker = f"http://127.0.0.1:{replica.port}"

        def gateway() -> str | None:
            url = fleet_selectors.client_url(replica.deployment)
            return url if url and _answers(f"{url}/health") else None

        endpoint = _wait(f"the gateway of {replica.node.hostname} to answer", gateway, procs)
        volume = storage.seed(accounts.tenant, replica.node)
        storage.start_reader()
        if nodes:  # after the local workers are placed, so they stay on this machine
            spawn(
                "simulated-nodes", processes.simulated_nodes(base, bootstrap, data / "sim", nodes)
            )
        print(
            "\nTailguard is up.\n"
            f"  Live console    {base}/console/   (log in as the operator or the tenant admin)\n"
            f"  Chat dashboard  {base}/console/deployments/{replica.deployment_id}/\n"
            f"  Admin console   {base}/admin/\n"
            f"  REST API        {base}/api/v1/   (docs: {base}/api/docs/)\n"
            f"  Platform operator  {accounts.operator[0]} / {accounts.operator[1]}\n"
            f"  Tenant admin       {accounts.tenant_admin[0]} / {accounts.tenant_admin[1]}"
            f"   (tenant {accounts.tenant.slug})\n"
            f"  API token (tenant admin)  {accounts.api_token}\n"
            f"  Deployment 'chat' (model demo-chat)  {endpoint}/v1   (OpenAI endpoint: the "
            f"gateway of node {replica.node.hostname},\n"
            f"    in front of its worker at {worker}; shared by tenants "
            f"{accounts.tenant.slug} and {tenants.noisy.slug})\n"
            f"  Storage         {base}/console/storage/   ({accounts.tenant.slug}'s "
            f"{storage.describe(volume)})\n"
            f"  Inference key (tenant {accounts.tenant.slug})  {key}\n"
            f"  Try: curl -H 'Authorization: Bearer {accounts.api_token}' {base}/api/v1/nodes/\n"
            f"       curl {endpoint}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' "
            '-d \'{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}\'\n'
            f"  Logs: {logs}\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        if not tour_enabled:
            return _watch(procs)
        load = tour.LoadGenerator(
            (endpoint, tenants.quiet_key, "demo-chat"), (endpoint, tenants.noisy_key, "demo-chat")
        )
        load.start()
        try:
            _tour(base, tenants, receiver, procs)
            return _watch(procs)
        finally:
            load.stop()


def _wait_quietly(
    ready: Callable[[], Any], procs: dict[str, subprocess.Popen[bytes]], timeout: float
) -> bool:
    """Like _wait, but running out of time is an answer (False), not an error."""
    deadline = time.monotonic() + timeout
    _wait("the tour", lambda: ready() or time.monotonic() > deadline, procs, timeout + 5)
    return bool(ready())


def _hold(seconds: float, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Let the demo run for `seconds`, stopping early if a child died."""
    deadline = time.monotonic() + seconds
    _wait("a child to exit", lambda: time.monotonic() > deadline, procs, seconds + 5)


def _hold_until(moment: datetime, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    _hold(max(0.0, (moment - timezone.now()).total_seconds()), procs)


def _watch(procs: dict[str, subprocess.Popen[bytes]]) -> int:
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"the {name} process exited with code {proc.returncode}; stopping")
                return 1
        time.sleep(0.5)


def _size_steps(
    quiet: Tenant, uncapped: datetime, procs: dict[str, subprocess.Popen[bytes]]
) -> None:
    """The engine's own answer to the noisy neighbour: chat's decode steps sized to acme's
    TPOT objective while globex is still uncapped (since ``uncapped``), and the
    throughput beside it: over the last span before the change (all of it uncapped) and
    the first that starts ten seconds after it, when the workers have the change."""
    before = max(tour.last_settled_span(timezone.now()), tour.span_at_or_after(uncapped))
    _hold_until(tour.settled(before), procs)
    before_p90, before_rate = tour.tpot_and_throughput(quiet, before)
    after = tour.span_at_or_after(timezone.now() + timedelta(seconds=10))
    threshold = tour.size_steps_to_tpot(quiet)
    print(
        "Tour: globex still uncapped, chat's workers now size each decode step to acme's "
        f"TPOT objective ({threshold * 1000:.1f} ms): rows beyond it wait, globex's first...",
        flush=True,
    )
    _hold_until(tour.settled(after), procs)
    after_p90, after_rate = tour.tpot_and_throughput(quiet, after)

    def ms(p90: float | None) -> str:
        return "too few requests" if p90 is None else f"{p90 * 1000:.1f} ms"

    print(
        f"Tour: with steps sized to acme's objective: acme's TPOT p90 {ms(after_p90)} "
        f"({ms(before_p90)} before), chat's output {after_rate:.0f} tokens/s "
        f"({before_rate:.0f} before).",
        flush=True,
    )


def _tour(
    base: str,
    tenants: tour.TourTenants,
    receiver: tour.WebhookReceiver,
    procs: dict[str, subprocess.Popen[bytes]],
) -> None:
    """The noisy-neighbour story, step by step, each step waiting on what it shows: a
    step about a page waits for its webhook to reach the receiver."""
    started = timezone.now()
    quiet = tenants.quiet

    print(
        "\nTour: acme chats while globex runs batch jobs on the same deployment, capped by "
        f"its tenant policy {NOISY_POLICY}. Watch {base}/console/tenants/{quiet.pk}/",
        flush=True,
    )
    _hold(60, procs)
    # the last half minute only: the worker's warm-up is no measure of this machine
    fitted = tour.calibrate_tpot_slo(quiet, timezone.now() - timedelta(seconds=30))
    if fitted:
        print(
            f"Tour: with globex capped, acme's TPOT p90 on this machine is "
            f"{fitted[0] * 1000:.1f} ms; chat-tpot now counts requests slower than "
            f"{fitted[1] * 1000:.1f} ms per token ({tour.TPOT_HEADROOM:g}x) as bad, in a new "
            "revision that counts from now.",
            flush=True,
        )
    else:
        print(
            "Tour: too few of acme's requests were measured to fit chat-tpot to this "
            "machine; it keeps its seeded threshold, in a new revision that counts from now.",
            flush=True,
        )
    _hold(20, procs)
    capped_burn, factor = tour.tpot_burn(quiet)
    too_slow = capped_burn >= factor
    if too_slow:
        print(
            f"Tour: this machine is too slow for the story: with globex still capped, acme's "
            f"TPOT SLO already burns at {capped_burn:.1f}x (a page needs {factor:g}x), so a "
            "page from here on would not be globex's doing alone.",
            flush=True,
        )
    print(
        "Tour: removing globex's policy: its batch jobs now fill the shared worker's batches...",
        flush=True,
    )
    removed, heard = timezone.now(), len(receiver.received)
    remove_tenant_policy(tenants.noisy)
    paged = _wait_quietly(
        lambda: receiver.got(
            "firing", AlertName.BURN_RATE_PAGE, since=heard, started_after=removed
        ),
        procs,
        timeout=240,
    )
    if paged and not too_slow:
        print(
            "Tour: acme's first tokens still come fast (fair queuing), but every decode step "
            "now carries globex's sequences: acme's TPOT SLO is burning its error budget "
            "fast: paged.",
            flush=True,
        )
    elif paged:
        print(
            "Tour: acme's TPOT SLO paged after globex's policy was removed, but it was "
            "burning before: on this machine the page is not globex's doing alone.",
            flush=True,
        )
    else:
        burn, factor = tour.tpot_burn(quiet)
        print(
            f"Tour: acme's SLOs held without globex's policy (TPOT burn rate {burn:.1f}x; "
            f"a page needs {factor:g}x): this machine is fast enough to serve both.",
            flush=True,
        )
    # The page may resolve from here on: steps sized to acme's objective can calm it
    # before globex is capped again.
    after_page = len(receiver.received)
    _size_steps(quiet, removed, procs)
    print("Tour: restoring globex's policy...", flush=True)
    set_tenant_policy(tenants.noisy, **NOISY_POLICY)
    if paged:
        resolved = _wait_quietly(
            lambda: receiver.got("resolved", AlertName.BURN_RATE_PAGE, since=after_page),
            procs,
            timeout=240,
        )
        if resolved:
            print("Tour: the page resolved.", flush=True)
        else:
            print(
                f"Tour: the page still fires: before it resolves, "
                f"{tour.page_resolves_after(quiet)}. The receiver prints the resolved "
                "webhook when it comes.",
                flush=True,
            )
    end = timezone.now()
    period = f"from={started:%Y-%m-%dT%H:%M:%SZ}&to={end:%Y-%m-%dT%H:%M:%SZ}"
    print(
        "Tour: acme's SLO report for the tour:\n"
        f"  {base}/console/tenants/{quiet.pk}/slo-report/?{period}\n"
        f"  {base}/api/v1/slo-reports/?tenant={quiet.pk}&{period}&format=pdf\n"
        "The demo keeps running; Ctrl-C stops it.",
        flush=True,
    )
