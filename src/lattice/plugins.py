"""Applications that plug into ``lattice-node``: installed packages that name an :class:`App` under
the ``lattice.apps`` entry-point group. Lattice's own apps (mesh inference, gossip SGD) use the same
door as a third party's; nothing is privileged.

In the app's ``pyproject.toml``::

    [project.entry-points."lattice.apps"]
    my_app = "my_package.plugin:APP"

and in ``my_package/plugin.py``::

    from lattice.plugins import App

    def add_commands(sub, commands):
        p = sub.add_parser("hello", help="say hello")
        commands["hello"] = lambda args: print("hello") or 0

    APP = App(name="my_app", add_commands=add_commands)

An app's commands run inside ``lattice-node``; its services (RPC methods, control ops, dashboard
panels) are ordinary node services built on the public API (see docs/plugins.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

__all__ = ["ENTRY_POINT_GROUP", "App", "Command", "installed_apps"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lattice.apps"

Command = Callable[[argparse.Namespace], int]  # a subcommand: parsed arguments -> exit code


@dataclass(frozen=True)
class App:
    """What an application adds to ``lattice-node``."""

    name: str
    description: str = ""
    # add_commands(subparsers, commands): add sub-parsers and put their handlers in ``commands``
    # (name -> Command). Import nothing heavy here: it runs on every `lattice-node` start.
    add_commands: Callable[[argparse._SubParsersAction, dict[str, Command]], None] | None = None


def installed_apps() -> list[App]:
    """The apps installed in this environment. One that fails to load is reported on stderr and
    skipped: a broken plug-in must not take the node's own commands down."""
    apps = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            app = ep.load()
        except Exception as exc:  # an installed plug-in's bug, not ours
            print(f"warning: app {ep.name!r} ({ep.value}) failed to load: {exc}", file=sys.stderr)
            continue
        if not isinstance(app, App):
            print(f"warning: app {ep.name!r} ({ep.value}) is not a lattice.plugins.App", file=sys.stderr)
            continue
        apps.append(app)
    return apps
