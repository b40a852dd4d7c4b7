"""Command lines in deploy/ checked against the project's real command-line parsers.

A command is accepted when its program is Python running one of the modules that
controlplane/processes.py starts (`-m uvicorn|celery|agent`), Python running manage.py
with an existing management command, or one of pyproject's console scripts; its
arguments must then parse with that program's own parser (click for uvicorn and Celery,
argparse for ours and Django's), so a misspelt option or a bad value fails here.
"""

from __future__ import annotations

import argparse
import importlib
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from controlplane import processes

REPO = Path(__file__).resolve().parent.parent.parent
DEPLOY = REPO / "deploy"


def process_modules() -> set[str]:
    """The modules run with `python -m` in the control plane's own process command lines."""
    argvs = [
        processes.web("127.0.0.1", 8000),
        processes.celery_worker(Path("schedule")),
        processes.agent("http://cp", "token", Path("state"), "host"),
    ]
    return {argv[2] for argv in argvs if argv[1] == "-m"}


def console_scripts() -> dict[str, str]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["project"]["scripts"])


def _parse_uvicorn(args: Sequence[str]) -> dict[str, Any]:
    from uvicorn.main import main as uvicorn_command

    params = uvicorn_command.make_context("uvicorn", list(args)).params
    module, _, attr = params["app"].partition(":")
    assert attr, f"uvicorn app {params['app']!r} must be module:attribute"
    assert callable(getattr(importlib.import_module(module), attr)), params["app"]
    return dict(params)


def _parse_celery(args: Sequence[str]) -> dict[str, Any]:
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery, find_app

    group = celery.make_context("celery", list(args))
    app_name = group.params["app"]
    assert app_name == "controlplane", (
        f"Celery app {app_name!r}: the control plane's is controlplane"
    )
    group.obj = CLIContext(app=find_app(app_name), no_color=True, workdir=None, quiet=True)
    name, command, rest = celery.resolve_command(group, [*group._protected_args, *group.args])
    assert command is not None, f"no celery command {name!r}"
    sub = command.make_context(name, rest, parent=group)
    return {"command": name, **sub.params}


def _parse_argparse(parser: argparse.ArgumentParser, args: Sequence[str]) -> dict[str, Any]:
    try:
        return vars(parser.parse_args(list(args)))
    except SystemExit as exc:  # argparse reports the error on stderr and exits
        raise AssertionError(f"{parser.prog} rejects {list(args)}") from exc


def _parse_manage(args: Sequence[str]) -> dict[str, Any]:
    from django.core.management import get_commands, load_command_class

    assert (REPO / "manage.py").is_file()
    name, *rest = args
    commands = get_commands()
    assert name in commands, f"manage.py has no command {name!r}"
    command = load_command_class(commands[name], name)
    return {"command": name, **_parse_argparse(command.create_parser("manage.py", name), rest)}


def parse(argv: Sequence[str]) -> dict[str, Any]:
    """Parse a deploy command line as its program would; AssertionError or click's error if not."""
    program = Path(argv[0]).name
    scripts = console_scripts()
    if program in scripts:
        module = importlib.import_module(scripts[program].partition(":")[0])
        return {"program": program, **_parse_argparse(module.build_parser(), argv[1:])}
    assert program.startswith("python"), f"{argv[0]}: neither Python nor a console script"
    if argv[1] == "manage.py":
        return {"program": "manage.py", **_parse_manage(argv[2:])}
    assert argv[1] == "-m", f"{list(argv)}: run a module with -m"
    module, args = argv[2], argv[3:]
    assert module in process_modules(), (
        f"python -m {module} is not one of the control plane's processes ({process_modules()})"
    )
    try:
        if module == "uvicorn":
            return {"program": module, **_parse_uvicorn(args)}
        if module == "celery":
            return {"program": module, **_parse_celery(args)}
    except click.ClickException as exc:
        raise AssertionError(f"{module} rejects {list(args)}: {exc.format_message()}") from exc
    from agent.cli import build_parser

    return {"program": module, **_parse_argparse(build_parser(), args)}
