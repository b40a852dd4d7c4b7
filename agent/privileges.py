"""Who inference workers run as, and what of the agent's state they may reach.

An agent running as root (it opens GPUs, RDMA and NVMe devices) starts its workers as an
unprivileged account (setting `worker_user`), so a worker that serves untrusted prompts
never holds root. The agent's state directory is then searchable by all but listable by
none (0711); a worker may read its own config and its model, write its own run directory
and its TensorRT cache, and nothing else: the node credential, the other replicas'
records and the storage engine's state stay root's own (0600).
"""

from __future__ import annotations

import logging
import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.settings import ENV_PREFIX

log = logging.getLogger(__name__)

DEFAULT_WORKER_USER = "tailguard-inference"
"""Created by deploy/systemd/tailguard-agent.sysusers.conf and by the agent's image."""
FALLBACK_WORKER_USER = "nobody"

_PROBE = (
    "import os, sys, dataplane.inference.server\n"
    "if not os.access(sys.argv[1], os.X_OK):\n"
    "    sys.exit(f'cannot enter {sys.argv[1]}: a directory on the way is closed to it')\n"
)
"""Run as the account: the worker's code imports and the state directory is reachable."""


class WorkerUserError(ValueError):
    """The account named by `worker_user` does not exist or cannot run a worker."""


@dataclass(frozen=True)
class WorkerAccount:
    """The unprivileged account workers run as: its ids and supplementary groups (e.g.
    `video`, `render` where GPU devices are not open to all)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def probe(self, python: str, state_dir: Path) -> None:
        """Raise WorkerUserError unless this account can run `python` with the worker's code
        and reach `state_dir` (which this opens to it first)."""
        self.may_pass(state_dir, state_dir)
        try:
            result = subprocess.run(
                [python, "-c", _PROBE, str(state_dir)],
                user=self.uid,
                group=self.gid,
                extra_groups=list(self.groups),
                env={**worker_environment(), "HOME": "/"},
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            problem = result.stderr.strip().splitlines()[-1:] if result.returncode else []
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = [str(exc)]
        if problem:
            raise WorkerUserError(
                f"inference workers run as {self.name} (setting worker_user), which cannot "
                f"run {python}: {problem[0]}; install Tailguard and keep the state directory "
                "where that account can reach them, or name another account in worker_user"
            )

    def may_pass(self, path: Path, root: Path) -> None:
        """Let the account through `root` and every directory below it on the way to `path`
        (search only, 0711: nothing becomes listable or readable)."""
        for directory in (path, *path.parents):
            if not directory.is_relative_to(root):
                break
            mode = directory.stat().st_mode
            if mode & 0o001 == 0:
                directory.chmod(mode & 0o7777 | 0o001)

    def may_read(self, path: Path) -> None:
        """Give the account's group read access to a file or a tree (models, its config)."""
        for item in _tree(path):
            mode = 0o050 if item.is_dir() else 0o040
            os.chown(item, -1, self.gid, follow_symlinks=False)
            item.chmod(item.stat().st_mode & 0o7777 | mode)

    def owns(self, path: Path) -> None:
        """Make a directory the account's own, created if missing: what a worker writes."""
        path.mkdir(parents=True, exist_ok=True)
        for item in _tree(path):
            os.chown(item, self.uid, self.gid, follow_symlinks=False)


def worker_environment() -> dict[str, str]:
    """The agent's environment less its own settings (its bootstrap token among them), which
    are none of a worker's business."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def _tree(path: Path) -> list[Path]:
    if not path.is_dir() or path.is_symlink():
        return [path]
    return [path, *(p for p in path.rglob("*") if not p.is_symlink())]


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
