"""Who inference workers and the gateway run as, and what of the agent's state they reach.

An agent running as root (it opens GPUs, RDMA and NVMe devices) starts its workers as an
unprivileged account (setting `worker_user`), so a worker that serves untrusted prompts
never holds root; the node's gateway, which sees every tenant's keys and holds the Redis
credential of the fleet's counters, runs as another (`gateway_user`), so a worker can
neither read its config nor signal or trace it. The agent's state directory is then searchable by all but listable by
none (0711); a worker may read its own config and its model, write its own run directory
and its TensorRT cache, and nothing else: the node credential, the other replicas'
records and the storage engine's state stay root's own (0600). What a worker can write is
handled by root through descriptors that never follow a symlink, so a link planted there
cannot turn a chown or a chmod onto another file.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from agent.settings import ENV_PREFIX

log = logging.getLogger(__name__)

DEFAULT_WORKER_USER = "tailguard-inference"
"""Created by deploy/systemd/tailguard-agent.sysusers.conf and by the agent's image."""
DEFAULT_GATEWAY_USER = "tailguard-gateway"
"""Likewise."""
FALLBACK_WORKER_USER = "nobody"

_PROBE = (
    "import os, sys, dataplane.inference.server\n"
    "if not os.access(sys.argv[1], os.X_OK):\n"
    "    sys.exit(f'cannot enter {sys.argv[1]}: a directory on the way is closed to it')\n"
)
"""Run as the account: the worker's code imports and the state directory is reachable."""

_READ_PROBE = "import sys\nopen(sys.argv[1], 'rb').close()\n"
"""Run as the account: a file it must read (a model's config.json) opens."""

_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""Never through a symlink, never waiting on a FIFO."""


class WorkerUserError(ValueError):
    """The account named by `worker_user` does not exist or cannot run a worker; `reason`
    says what failed without the advice, for callers that give their own."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class WorkerAccount:
    """The unprivileged account workers (or the gateway) run as: its ids and supplementary
    groups (e.g. `video`, `render` where GPU devices are not open to all)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    role: str = "inference workers"
    setting: str = "worker_user"

    def probe(self, python: str, state_dir: Path) -> None:
        """Raise WorkerUserError unless this account can run `python` with the worker's code
        and reach `state_dir` (which this opens to it first)."""
        self.may_pass(state_dir, state_dir)
        problem = self._run(python, _PROBE, state_dir)
        if problem:
            raise WorkerUserError(
                f"{self.role} run as {self.name} (setting {self.setting}), which cannot "
                f"run {python}: {problem}; install Tailguard and keep the state directory "
                f"where that account can reach them, or name another account in {self.setting}",
                reason=f"{self.name} cannot run {python} ({problem})",
            )

    def can_read(self, python: str, path: Path) -> None:
        """Raise WorkerUserError unless this account can open `path`: checked before a worker
        starts, so a model it cannot read is an error naming the setting, not a crash loop."""
        problem = self._run(python, _READ_PROBE, path)
        if problem:
            raise WorkerUserError(
                f"{self.role} run as {self.name} (setting {self.setting}), which cannot "
                f"read {path}: {problem}; keep the storage pool where that account can reach "
                f"it, or name another account in {self.setting}"
            )

    def may_pass(self, path: Path, root: Path) -> None:
        """Let the account through `root` and every directory below it on the way to `path`:
        each becomes exactly 0711 (search only: nothing listable or readable by others).
        Nothing above `root` changes, nor a directory that is a symlink."""
        for directory in (path, *path.parents):
            if not directory.is_relative_to(root):
                break
            try:
                fd = os.open(directory, _OPEN | os.O_DIRECTORY)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    continue
                raise
            try:
                os.fchmod(fd, 0o711)
            finally:
                os.close(fd)

    def may_read(self, path: Path) -> None:
        """Give the account's group read access to a file or a tree (models, its config).

        Symlinks are never followed, and a file with other hard links is left alone: either
        could lead out of the tree to a file that is none of the account's business."""
        for fd, info in _opened(path):
            if stat.S_ISDIR(info.st_mode):
                mode = 0o050
            elif stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                mode = 0o040
            else:
                continue
            os.fchown(fd, -1, self.gid)
            os.fchmod(fd, info.st_mode & 0o7777 | mode)

    def owns(self, path: Path) -> None:
        """Make a directory the account's own, created if missing: what a worker writes.

        Once the account owns it the worker can change anything below, so only what still
        belongs to root is handed over (a tree an earlier agent made), through descriptors
        that never follow a symlink, and never a file with other hard links."""
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, _OPEN | os.O_DIRECTORY)
        try:
            if os.fstat(fd).st_uid == 0:
                for below, info in _opened(path, top=False):
                    regular = stat.S_ISREG(info.st_mode) and info.st_nlink == 1
                    if info.st_uid == 0 and (stat.S_ISDIR(info.st_mode) or regular):
                        os.fchown(below, self.uid, self.gid)
            os.fchown(fd, self.uid, self.gid)
        finally:
            os.close(fd)

    def _run(self, python: str, code: str, path: Path) -> str | None:
        """What went wrong running `code` as this account, or None."""
        try:
            result = subprocess.run(
                [python, "-c", code, str(path)],
                user=self.uid,
                group=self.gid,
                extra_groups=list(self.groups),
                env={**worker_environment(), "HOME": "/"},
                cwd="/",
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if result.returncode == 0:
            return None
        return (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]


def worker_environment() -> dict[str, str]:
    """The agent's environment less its own settings (its bootstrap token among them), which
    are none of a worker's business."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def _opened(path: Path, *, top: bool = True) -> Iterator[tuple[int, os.stat_result]]:
    """`path` (unless `top` is false) and, when it is a directory, everything below it,
    deepest first, each opened without following a symlink: (descriptor, its fstat), the
    descriptor valid until the next one. Symlinks, and what went away, are passed over."""
    fd = os.open(path, _OPEN)
    try:
        info = os.fstat(fd)
        if not stat.S_ISDIR(info.st_mode):
            if top:
                yield fd, info
            return
    finally:
        os.close(fd)
    for _, dirs, files, dir_fd in os.fwalk(path, topdown=False, follow_symlinks=False):
        for name in (*files, *dirs):
            try:
                fd = os.open(name, _OPEN, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                yield fd, os.fstat(fd)
            finally:
                os.close(fd)
    if top:
        fd = os.open(path, _OPEN | os.O_DIRECTORY)
        try:
            yield fd, os.fstat(fd)
        finally:
            os.close(fd)


def worker_account(setting: str | None) -> WorkerAccount | None:
    """The account workers run as, or None when they run as the agent itself: the agent is
    not root, or `worker_user` names root.

    Unset, `tailguard-inference` where that account exists, else `nobody`; a name that is no
    account on this host raises WorkerUserError naming the setting.
    """
    if os.geteuid() != 0:
        return None
    for name in [setting] if setting else [DEFAULT_WORKER_USER, FALLBACK_WORKER_USER]:
        try:
            entry = pwd.getpwnam(name)
            break
        except KeyError:
            continue
    else:
        raise WorkerUserError(
            f"setting worker_user: there is no account {name!r} on this host; create it "
            f"(deploy/systemd/tailguard-agent.sysusers.conf makes {DEFAULT_WORKER_USER}) or "
            "name an existing unprivileged account"
        )
    if setting is None and name != DEFAULT_WORKER_USER:
        log.warning(
            "no %s account on this host: inference workers run as %s (create it or set "
            "worker_user)",
            DEFAULT_WORKER_USER,
            name,
        )
    if entry.pw_uid == 0:
        return None
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
    return WorkerAccount(name, entry.pw_uid, entry.pw_gid, groups)


def gateway_account(setting: str | None, workers: WorkerAccount | None) -> WorkerAccount | None:
    """The account the node's gateway runs as, or None when it runs as the agent itself
    (the agent is not root, or `gateway_user` names root).

    Unset, `tailguard-gateway` where that account exists, else the workers' account, with a
    warning: they then share a uid. A name that is no account raises WorkerUserError.
    """
    if os.geteuid() != 0:
        return None
    name = setting or DEFAULT_GATEWAY_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if setting:
            raise WorkerUserError(
                f"setting gateway_user: there is no account {name!r} on this host; create it "
                f"(deploy/systemd/tailguard-agent.sysusers.conf makes {DEFAULT_GATEWAY_USER}) "
                "or name an existing unprivileged account"
            ) from None
        if workers is not None:
            log.warning(
                "no %s account on this host: the gateway runs as %s, the inference workers' "
                "account (create it or set gateway_user)",
                DEFAULT_GATEWAY_USER,
                workers.name,
            )
            return replace(workers, role="the gateway", setting="gateway_user")
        return None
    if entry.pw_uid == 0:
        return None
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != entry.pw_gid)
    return WorkerAccount(name, entry.pw_uid, entry.pw_gid, groups, "the gateway", "gateway_user")
