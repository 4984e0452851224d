"""The hello service: what runs inside a node that enables the app.

* ``hello.greet`` (RPC): any peer may call it, so its input is checked before it is used;
* ``hello.stats`` (control op): the operator's view, through ``lattice.Client(socket).call(...)``;
* a dashboard panel "hello" (the web page of ``--metrics-listen`` draws it).
"""

from __future__ import annotations

from typing import Any

import trio

from lattice.errors import LatticeError

MAX_NAME = 64  # characters of a name; anything longer is refused, not stored or echoed


class BadGreeting(LatticeError):
    """A caller sent something that is not ``{"name": str}`` with a short name."""


def check_name(payload: Any) -> str:
    """The name in a greet request, or BadGreeting (the caller gets this one line back)."""
    name = payload.get("name") if isinstance(payload, dict) else None
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise BadGreeting(f'expected {{"name": a printable string of 1 to {MAX_NAME} characters}}')
    return name


class HelloService:
    """A node service (lattice.node.Service): started with the node, stopped with it."""

    name = "hello"

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting
        self.greeted = 0
        self.refused = 0
        self._me = ""
        self._panel: Any = None

    async def run(self, node: Any, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        node.rpc.register("hello.greet", self.greet)
        node.add_control_op("hello.stats", self.stats)
        self._panel = node.dashboard.panel("hello", title="hello: greetings served", unit="calls")
        self._me = str(node.peer_id)
        task_status.started()
        await trio.sleep_forever()

    async def greet(self, payload: Any, ctx: Any) -> dict:
        try:
            name = check_name(payload)
        except BadGreeting:
            self.refused += 1
            raise
        self.greeted += 1
        self._panel.push("greetings", trio.current_time(), self.greeted)
        return {"greeting": f"{self.greeting}, {name}!", "from": self._me, "to": str(ctx.peer)}

    async def stats(self) -> dict:
        return {"greeted": self.greeted, "refused": self.refused}
