"""The README's main command, run as a user would, on embedded defaults, tour included."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from openai import OpenAI

from tests.agent.unprivileged import worker_interpreter


def read_until(proc: subprocess.Popen[str], output: list[str], marker: str, seconds: float) -> str:
    """The demo's output up to the first line containing `marker`."""
    assert proc.stdout is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "demo exited early:\n" + "".join(output)
        output.append(line)
        if marker in line:
            return "".join(output)
    raise AssertionError(f"no {marker!r} within {seconds:.0f} s:\n" + "".join(output))


@contextlib.contextmanager
def running_demo(data: Path, port: int, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`tailguard demo --port PORT ARGS` with its own data folder; whatever happens, nothing
    it started outlives the block."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["TAILGUARD_DATA_DIR"] = str(data)
    interpreter = worker_interpreter()  # its agents' workers run unprivileged
    env.update(interpreter.env)
    proc = subprocess.Popen(
        [interpreter.python, "-m", "controlplane.cli", "demo", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_demo_serves_tours_the_noisy_neighbour_and_stops_cleanly(tmp_path: Path) -> None:
    free_port = free_ports(3)
    with running_demo(tmp_path, free_port, "--nodes", "2") as proc:
        output: list[str] = []
        text = read_until(proc, output, "Press Ctrl-C", 300)
        token = re.search(r"API token \(tenant admin\)\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        operator = re.search(r"Platform operator\s+(\S+) / (\S+)", text)
        assert operator and operator.group(1) == "operator"
        assert (tmp_path / "tailguard.sqlite3").exists()

        base = f"http://127.0.0.1:{free_port}"
        me = httpx.get(f"{base}/api/v1/me/", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200
        assert me.json()["memberships"][0]["tenant_slug"] == "acme"
        assert httpx.get(f"{base}/admin/login/").status_code == 200
        assert httpx.get(f"{base}/api/docs/").status_code == 200

        # the agent enrolled this machine and runs the demo worker behind the printed key
        key = re.search(r"Inference key \(tenant acme\)\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        endpoint = printed_endpoint(text)
        client = OpenAI(base_url=f"{endpoint}/v1", api_key=key)
        # the synthetic model may sample its end token early; ignore_eos makes the length exact
        reply = client.chat.completions.create(
            model="demo-chat",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
            extra_body={"ignore_eos": True},
        )
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        nodes = httpx.get(f"{base}/api/v1/nodes/", headers={"Authorization": f"Bearer {token}"})
        assert nodes.status_code == 200
        # the endpoint printed is the node's gateway, as the deployment's API object says
        deployments = httpx.get(
            f"{base}/api/v1/deployments/", headers={"Authorization": f"Bearer {token}"}
        ).json()["results"]
        assert [d["endpoints"] for d in deployments] == [[endpoint]]
        (fronted,) = httpx.get(f"{endpoint}/health").json()["deployments"]
        assert fronted["deployment_id"] == deployments[0]["id"]
        assert [r["up"] for r in fronted["replicas"]] == [True]
        # acme's volume on this node under its QoS policy: in an SPDK pool on a file, read
        # over NVMe/TCP by spdk_nvme_perf, when the demo finds SPDK (SPDK_TGT_BIN, as the
        # storage tests do), else in a local pool read by the agent's probe; the storage
        # page's figures come from those reads either way
        if os.environ.get("SPDK_TGT_BIN"):
            assert "in SPDK pool 'demo' (a file; spdk_tgt at nice 19): spdk_nvme_perf" in text
        else:
            assert "volume 'datasets' in local pool 'demo': 200 probe reads/s" in text
        assert volume_reads(base, token, "datasets") > 0
        # the tour's pieces are seeded: acme's TPOT and TTFT SLOs, and the console and its live page
        slos = httpx.get(f"{base}/api/v1/slos/", headers={"Authorization": f"Bearer {token}"})
        assert [s["name"] for s in slos.json()["results"]] == ["chat-tpot", "chat-ttft"]
        assert "Live console" in text and httpx.get(f"{base}/console/login/").status_code == 200
        dashboard = re.search(r"Chat dashboard\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        assert httpx.get(dashboard, follow_redirects=False).status_code == 302  # login first

        # the tour: chat-tpot fitted to this machine in a new revision, globex's policy
        # removed, acme paged through a verified webhook about an alert that fired after
        # that, chat's steps sized to acme's TPOT objective with the throughput beside it,
        # the policy restored, the page resolved (or the tour says what it waits for:
        # every page window calm for the hold time), and a report of it all
        tour = read_until(proc, output, "The demo keeps running", 720)[len(text) :]
        steps = [
            "in a new revision that counts from now",
            "removing globex's policy",
            "webhook received (signature verified): firing SLOBurnRatePage tenant=acme",
            "TPOT SLO is burning its error budget fast: paged",
            "now size each decode step to acme's TPOT objective",
            "with steps sized to acme's objective: acme's TPOT p90",
            "restoring globex's policy",
        ]
        if "the page resolved" in tour:
            steps += ["the page resolved"]
            # steps sized to acme's objective may calm the page before globex is capped
            resolved = "webhook received (signature verified): resolved SLOBurnRatePage"
            assert tour.find(steps[2]) < tour.find(resolved) < tour.find(steps[-1]), tour
        else:
            steps += ["the page still fires: before it resolves, every page window must be calm"]
        found = [tour.find(step) for step in steps]
        assert -1 not in found and found == sorted(found), tour
        # the deployment kept serving with its steps sized (a worker whose admission had
        # stopped printed 0 tokens/s here)
        sized = re.search(r"chat's output (\d+) tokens/s \((\d+) before\)", tour)
        assert sized is not None and int(sized.group(1)) > 0, tour
        assert "too slow for the story" not in tour, tour
        assert "unverified" not in tour
        report = re.search(r"(\S+/api/v1/slo-reports/\S+format=pdf)", tour).group(1)  # type: ignore[union-attr]
        pdf = httpx.get(report, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Stopped." in proc.stdout.read()
        # nothing it started outlives it: no child, SPDK target, reader or socket
        export = re.search(r"over NVMe/TCP at (\S+):(\d+)", text)
        markers = [str(tmp_path), *([f"trsvcid:{export.group(2)}"] if export else [])]
        assert not running_with(markers), running_with(markers)
        assert not list(tmp_path.glob("spdk/*.sock"))


def running_with(markers: list[str]) -> list[str]:
    """Command lines of live processes with any of `markers` in an argument."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
            if any(marker in arg for marker in markers for arg in argv):
                found.append(" ".join(argv))
    return found


def printed_endpoint(text: str) -> str:
    """The demo deployment's OpenAI endpoint as the demo prints it: its node's gateway."""
    found = re.search(r"Deployment 'chat' \(model demo-chat\)\s+(\S+)/v1", text)
    assert found, text
    return found.group(1)


def volume_reads(base: str, token: str, name: str) -> float:
    """The highest read IOPS the storage page has for volume `name`, once it has any."""
    deadline = time.monotonic() + 180  # a guard against a volume never read, not a timing check
    while True:
        snapshot = httpx.get(
            f"{base}/api/v1/telemetry/storage/", headers={"Authorization": f"Bearer {token}"}
        ).json()
        keys = {v["key"] for n in snapshot["nodes"] for v in n["volumes"] if v["name"] == name}
        reads = [
            point["gauges"].get(f"storage.{key}.read_iops", 0.0)
            for n in snapshot["nodes"]
            for point in n["points"]
            for key in keys
        ]
        if max(reads, default=0.0) > 0:
            return max(reads)
        assert time.monotonic() < deadline, f"volume {name} shows no reads: {snapshot}"
        time.sleep(1)


def free_ports(count: int) -> int:
    """A port with the `count` - 1 ports after it free too (a demo takes P to P + 2)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65536:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise AssertionError(f"no {count} free ports in a row")


def test_two_demos_side_by_side_each_serve_their_own_keys(tmp_path: Path) -> None:
    """Two installations on one host: every port they take is their own, and each one's
    worker answers its own key and refuses the other's."""
    first_port = free_ports(3)
    second_port = free_ports(3)
    while abs(second_port - first_port) < 3:
        second_port = free_ports(3)
    with (
        running_demo(tmp_path / "one", first_port, "--no-tour") as one,
        running_demo(tmp_path / "two", second_port, "--no-tour") as two,
    ):
        found = {}
        for name, proc in (("one", one), ("two", two)):
            text = read_until(proc, [], "Press Ctrl-C", 300)
            key = re.search(r"Inference key \(tenant acme\)\s+(\S+)", text).group(1)  # type: ignore[union-attr]
            found[name] = (key, printed_endpoint(text))
        (key_one, endpoint_one), (key_two, endpoint_two) = found["one"], found["two"]
        assert endpoint_one != endpoint_two
        for endpoint, own, other in (
            (endpoint_one, key_one, key_two),
            (endpoint_two, key_two, key_one),
        ):
            body = {"model": "demo-chat", "prompt": "hi", "max_tokens": 2}
            mine = httpx.post(
                f"{endpoint}/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {own}"},
                timeout=60,
            )
            theirs = httpx.post(
                f"{endpoint}/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {other}"},
                timeout=60,
            )
            assert (mine.status_code, theirs.status_code) == (200, 401), (endpoint, mine.text)
        for proc in (one, two):
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
