"""The test command: start throwaway PostgreSQL and Redis servers, then run pytest.

`./tailguard test [pytest args]` runs this. Missing server packages are installed
from Debian when running as root. DATABASE_URL / REDIS_URL already set in the
environment are used as they are instead. SPDK_TGT_BIN, when set, names the spdk_tgt
that the storage tests start for themselves (see tests/dataplane/storage/conftest.py).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PACKAGES = {
    "postgres": "postgresql",
    "redis-server": "redis-server",
    "chromium": "chromium",
    "systemd-analyze": "systemd",  # checks the deploy/ units
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_postgres_bindir() -> Path | None:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4])
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("postgres")
    return Path(found).parent if found else None


def ensure_packages() -> None:
    """Install what is missing from Debian, once, when we may."""
    missing = []
    if find_postgres_bindir() is None and not os.environ.get("DATABASE_URL"):
        missing.append(DEBIAN_PACKAGES["postgres"])
    for binary in ("redis-server", "chromium", "systemd-analyze"):
        if shutil.which(binary) is None and not (
            binary == "redis-server" and os.environ.get("REDIS_URL")
        ):
            missing.append(DEBIAN_PACKAGES[binary])
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"The tests need these Debian packages: {' '.join(missing)}. Install them "
            "(sudo apt-get install ...) or run the tests as root."
        )
    print(f"Installing Debian packages: {' '.join(missing)}", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # apt's progress goes to stderr: a bench's --json output is stdout, whole.
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=sys.stderr)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=sys.stderr,
    )


def wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with code {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise SystemExit(f"{name} did not listen on port {port} within {timeout:.0f} s")


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A throwaway cluster tuned for tests (no fsync: data need not survive a crash)."""
    bindir = find_postgres_bindir()
    assert bindir is not None, "ensure_packages() installs PostgreSQL first"
    datadir = workdir / "pg"
    datadir.mkdir()
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = "postgres"
        shutil.chown(workdir, user)
        shutil.chown(datadir, user)
    subprocess.run(
        [
            bindir / "initdb",
            "-D",
            datadir,
            "-U",
            "tailguard",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        user=user,
        stdout=subprocess.DEVNULL,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            bindir / "postgres",
            "-D",
            datadir,
            "-p",
            str(port),
            "-k",
            datadir,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ],
        user=user,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "postgres.log", "wb"),
    )
    try:
        wait_port(port, proc, "PostgreSQL")
        for _ in range(100):  # accepting TCP precedes accepting logins by a moment
            done = subprocess.run(
                [
                    bindir / "createdb",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "tailguard",
                    "tailguard",
                ],
                user=user,
                capture_output=True,
            )
            if done.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"createdb failed: {done.stderr.decode()}")
        yield f"postgres://tailguard@127.0.0.1:{port}/tailguard"
    finally:
        proc.send_signal(signal.SIGINT)  # "fast" shutdown: do not wait for clients to leave
        proc.wait(timeout=30)


@contextlib.contextmanager
def redis(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc, "Redis")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str]) -> int:
    os.chdir(REPO_ROOT)
    ensure_packages()
    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tailguard-test-")))
        if not env.get("DATABASE_URL"):
            env["DATABASE_URL"] = stack.enter_context(postgres(workdir))
        if not env.get("REDIS_URL"):
            env["REDIS_URL"] = stack.enter_context(redis(workdir))
        env.setdefault("TAILGUARD_DATA_DIR", str(workdir / "data"))
        print(f"PostgreSQL: {env['DATABASE_URL']}  Redis: {env['REDIS_URL']}", flush=True)
        spdk = env.get("SPDK_TGT_BIN") or "the emulator (SPDK_TGT_BIN names a spdk_tgt to use)"
        print(f"SPDK target: {spdk}", flush=True)
        return subprocess.run([sys.executable, "-m", "pytest", *argv], env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
