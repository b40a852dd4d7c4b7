"""Every environment variable the control plane reads is in the example environment file
and the operations guide, and deploy/ sets no variable that nothing reads."""

from __future__ import annotations

import ast
import re

import yaml

from tests.deploy.commands import DEPLOY, REPO

SETTINGS = REPO / "controlplane" / "settings.py"


def read_variables() -> set[str]:
    """Names passed to os.environ.get(...) or the _env_* helpers in controlplane/settings.py."""
    names = set()
    for node in ast.walk(ast.parse(SETTINGS.read_text())):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = ast.unparse(node.func)
        first = node.args[0]
        if (func == "os.environ.get" or func.startswith("_env_")) and isinstance(
            first, ast.Constant
        ):
            names.add(first.value)
    return names


def env_file_variables() -> set[str]:
    text = (DEPLOY / "systemd" / "tailguard.env").read_text()
    return set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))


def test_settings_read_the_documented_basics() -> None:
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "SIGNING_KEY_FILE"} <= read_variables()


def test_environment_file_lists_every_variable_and_no_other() -> None:
    assert env_file_variables() == read_variables()


def test_operations_guide_names_every_variable() -> None:
    guide = (REPO / "docs" / "operations.md").read_text()
    missing = {name for name in read_variables() if f"`{name}`" not in guide}
    assert not missing, f"docs/operations.md does not describe {sorted(missing)}"


def test_compose_and_kubernetes_set_only_variables_the_control_plane_reads() -> None:
    known = read_variables() | {"DJANGO_SETTINGS_MODULE"}
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    set_here = set(compose["x-controlplane"]["environment"])
    for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "controlplane.yaml").read_text()):
        if doc["kind"] in {"ConfigMap", "Secret"} and doc["metadata"]["name"] == (
            "tailguard-controlplane"
        ):
            set_here |= set(doc.get("data") or doc.get("stringData"))
    assert set_here - known == set()
