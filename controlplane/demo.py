"""`tailguard demo`: the whole system on embedded defaults, in the foreground.

Migrates, seeds demo accounts, starts the processes and prints where to look.
Ctrl-C (or SIGTERM) stops every child cleanly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from django.conf import settings
from django.core.management import call_command

from controlplane.tenancy.services import seed_demo


@contextmanager
def _children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the control plane exited with code {proc.returncode} on start")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"the control plane did not answer at {url} within {timeout:.0f} s")


def run_demo(*, host: str, port: int) -> int:
    print(f"Data directory: {settings.DATA_DIR}")
    call_command("migrate", interactive=False, verbosity=0)
    accounts = seed_demo()
    base = f"http://{host}:{port}"
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    with _children() as procs:
        web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "controlplane.asgi:application",
             "--host", host, "--port", str(port), "--log-level", "warning"]
        )
        procs.append(web)
        _wait_http(f"{base}/api/schema/", web)
        print(
            "\nTailguard control plane is up.\n"
            f"  Admin console  {base}/admin/\n"
            f"  REST API       {base}/api/v1/   (docs: {base}/api/docs/)\n"
            f"  Platform operator  {accounts.operator[0]} / {accounts.operator[1]}\n"
            f"  Tenant admin       {accounts.tenant_admin[0]} / {accounts.tenant_admin[1]}"
            f"   (tenant {accounts.tenant.slug})\n"
            f"  API token (tenant admin)  {accounts.api_token}\n"
            f"  Try: curl -H 'Authorization: Bearer {accounts.api_token}' {base}/api/v1/me/\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        try:
            while not stop:
                for proc in procs:
                    if proc.poll() is not None:
                        print(f"a demo process exited with code {proc.returncode}; stopping")
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    print("Stopped.")
    return 0
