"""Applications that plug into ``lattice-node``: installed packages that name an :class:`App` under
the ``lattice.apps`` entry-point group. Lattice's own apps (mesh inference, gossip SGD) use the same
door as a third party's; nothing is privileged.

In the app's ``pyproject.toml``::

    [project.entry-points."lattice.apps"]
    my_app = "my_package.plugin:APP"

and in ``my_package/plugin.py``::

    from lattice.plugins import App

    def add_commands(sub, commands):
        sub.add_parser("hello", help="say hello")
        commands["hello"] = lambda args: print("hello") or 0

    def services(config):
        from my_package.service import HelloService  # heavy imports here, not at the top

        return [HelloService()]

    APP = App(name="my_app", add_commands=add_commands, services=services)

Commands run inside ``lattice-node``; services run inside a node started with ``--app my_app`` (or
``apps = ["my_app"]`` in its config file) and register RPC methods, control ops and dashboard panels
through the node's public API. See docs/plugins.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # types only: importing the node here would cost every `lattice-node` start
    from lattice.config import NodeConfig
    from lattice.node import AppService, Node

__all__ = [
    "ENTRY_POINT_GROUP",
    "App",
    "Command",
    "OptionGroup",
    "app_services",
    "build_node",
    "find_app",
    "installed_apps",
]

ENTRY_POINT_GROUP = "lattice.apps"

Command = Callable[[argparse.Namespace], int]  # a subcommand: parsed arguments -> exit code
AddCommands = Callable[[Any, dict[str, Command]], None]  # (argparse subparsers, name -> Command)


class OptionGroup(Protocol):
    """Where options go: an argparse parser or one of its argument groups."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action: ...
    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class App:
    """What an application adds to ``lattice-node``. Both hooks are optional."""

    name: str  # the entry-point name (what `--app NAME` and `apps = [...]` refer to)
    description: str = ""
    # add_commands(subparsers, commands): add sub-parsers and put their handlers in ``commands``.
    # Import nothing heavy here: it runs whenever `lattice-node` lists or runs app commands.
    add_commands: AddCommands | None = None
    # services(config): the services to run inside a node that enables this app; each one gets the
    # node in ``run(node, task_status)`` and registers its RPC methods, control ops and panels there.
    services: Callable[[NodeConfig], list[AppService]] | None = None


def _load(ep: Any) -> App | None:
    """The App an entry point names; a broken one is reported on stderr and skipped (None): an
    installed plug-in's bug must not take the node's own commands down."""
    try:
        app = ep.load()
    except Exception as exc:  # an installed plug-in's bug, not ours
        print(f"warning: app {ep.name!r} ({ep.value}) failed to load: {exc}", file=sys.stderr)
        return None
    if not isinstance(app, App):
        print(f"warning: app {ep.name!r} ({ep.value}) is not a lattice.plugins.App", file=sys.stderr)
        return None
    return app


def entry_points(**select: str) -> Any:
    """importlib.metadata's entry points, imported here: it costs ~20 ms, which a node that enables no
    app need not pay."""
    from importlib.metadata import entry_points as scan

    return scan(**select)


def installed_apps() -> list[App]:
    """The apps installed in this environment, by entry-point name (the first of a duplicated name)."""
    apps: dict[str, App] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name not in apps and (app := _load(ep)) is not None:
            apps[ep.name] = app
    return list(apps.values())


def find_app(name: str) -> App:
    """The installed app called ``name``; loads that entry point only."""
    from lattice.errors import ConfigError

    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        app = _load(ep)
        if app is None:
            raise ConfigError(f"app {name!r} is installed but failed to load (see the warning above)")
        return app
    known = ", ".join(sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})) or "none"
    raise ConfigError(f"app {name!r} is not installed (installed apps: {known})")


def app_services(config: NodeConfig) -> list[AppService]:
    """The services of the apps ``config.apps`` enables, in that order."""
    from lattice.errors import ConfigError

    out: list[AppService] = []
    for name in config.apps:  # no app enabled: no entry point scanned
        app = find_app(name)
        if app.services is None:
            raise ConfigError(f"app {name!r} has no services to run in a node (it only adds commands)")
        out.extend(app.services(config))
    return out


def build_node(config: NodeConfig) -> Node:
    """``Node(config)`` with the services of the apps it enables: how `run`, `serve-model` and app
    commands make their node, so an app enabled in the config file runs in each of them."""
    from lattice.node import Node

    node = Node(config)
    for service in app_services(config):
        node.add_service(service)
    return node
