"""``lattice-node``: run the daemon, or talk to a running one through its control socket.

Bad input never shows a traceback: every expected failure prints one line
``lattice-node: error: ...`` and exits with code 2. Heavy modules are imported only by the commands
that need them, so the daemon is ready fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from lattice.config import NodeConfig
    from lattice.plugins import Command, OptionGroup

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage + error)
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _add_control(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", metavar="SOCKET", help="control socket of the daemon (default: from config)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (to find the control socket)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def build_parser(with_apps: bool = True) -> argparse.ArgumentParser:
    """The parser of every subcommand; ``with_apps=False`` leaves out installed plug-ins (scanning the
    entry points costs ~20 ms, which a core command like `run` need not pay)."""
    parser = _Parser(prog="lattice-node", description="Lattice peer-to-peer node for decentralized AI.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_run_command(sub)
    _add_node_commands(sub)
    _add_rpc_commands(sub)
    _add_crdt_commands(sub)
    _add_send_tensor_command(sub)
    _add_dht_commands(sub)
    _add_content_commands(sub)
    from lattice.swarm import commands as swarm_commands  # testnet, top, bans

    _COMMANDS.update(swarm_commands.register(sub))
    if with_apps:  # installed plug-ins (lattice.plugins): serve-model, generate, gossip-sgd, ...
        from lattice.plugins import installed_apps

        for app in installed_apps():
            if app.add_commands is not None:
                app.add_commands(sub, _COMMANDS)
    return parser


def add_node_options(parser: OptionGroup) -> None:
    """Add the options that configure a node (config file, addresses, identity, control socket,
    limits, apps, NAT traversal, swarm) to ``parser``. `run`, `serve-model`, `gossip-sgd peer` and
    apps' own node commands share them; :func:`node_config` makes the NodeConfig."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--listen", metavar="MULTIADDR", action="append", help="listen address (repeatable)")
    parser.add_argument(
        "--bootstrap", metavar="MULTIADDR", action="append",
        help="bootstrap peer, or /dnsaddr/DOMAIN for a list published in DNS (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--dns-server", metavar="IP[:PORT]", action="append", dest="dns_servers",
        help="DNS resolver for /dnsaddr/ bootstrap addresses (repeatable; default: the system's)",
    )  # fmt: skip
    parser.add_argument("--key", metavar="FILE", help="identity key file (created with mode 0600 if missing)")
    parser.add_argument("--data-dir", metavar="DIR", help="directory for all persistent state")
    parser.add_argument("--control", metavar="SOCKET", help="control socket path")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--max-connections", type=int, metavar="N")
    parser.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory peers' traffic may hold, e.g. 2GiB (default: a quarter of RAM, >= 256 MiB)",
    )
    parser.add_argument(
        "--app", dest="apps", metavar="NAME", action="append",
        help="run the services of installed app NAME in the node (repeatable; replaces the config's apps)",
    )  # fmt: skip
    nat = parser.add_argument_group("NAT traversal")
    nat.add_argument(
        "--relay", action="store_true", default=None, help="serve as a circuit relay for NATed peers"
    )
    nat.add_argument(
        "--use-relay",
        metavar="MULTIADDR",
        action="append",
        help="relay to reserve on when private (repeatable)",
    )
    nat.add_argument(
        "--reachability",
        choices=["auto", "public", "private"],
        help="skip detection if you know (default auto)",
    )
    nat.add_argument(
        "--upnp", action="store_true", default=None, help="map the listen port on the gateway (UPnP/NAT-PMP)"
    )
    nat.add_argument(
        "--mdns", action="store_true", default=None, help="find peers on the LAN (multicast DNS)"
    )
    nat.add_argument(
        "--no-hole-punching", dest="hole_punching", action="store_false", default=None,
        help="stay on relayed connections (no DCUtR)",
    )  # fmt: skip
    from lattice.swarm import commands as swarm_commands  # --join, --bootstrap-node, --metrics-listen

    swarm_commands.add_run_options(parser)


def node_config(args: argparse.Namespace, **defaults: Any) -> NodeConfig:
    """The NodeConfig of a command that called :func:`add_node_options`: ``defaults`` (the command's
    own, e.g. a loopback listen address) < config file < environment (LATTICE_*) < the options given."""
    from lattice.config import NodeConfig
    from lattice.swarm.commands import run_overrides

    return NodeConfig.load(
        args.config,
        defaults=defaults,
        listen=args.listen,
        bootstrap=args.bootstrap,
        dns_servers=args.dns_servers,
        key_file=args.key,
        data_dir=args.data_dir,
        control_socket=args.control,
        control=True if args.control else None,  # a socket given is a socket wanted
        log_level=args.log_level,
        max_connections=args.max_connections,
        max_memory=args.max_memory,
        apps=args.apps,
        relay=args.relay,
        relays=args.use_relay,
        reachability=args.reachability,
        hole_punching=args.hole_punching,
        upnp=args.upnp,
        mdns=args.mdns,
        **run_overrides(args),
    )


def _add_run_command(sub: Any) -> None:
    run = sub.add_parser(
        "run", help="run the node daemon", description="Run the node daemon in the foreground."
    )
    add_node_options(run)
    run.add_argument(
        "--ready-file", metavar="FILE", help="write {peer_id, addrs, control} as JSON when ready"
    )
    run.add_argument("--enable-bench", action="store_true", help="serve the lattice.bench.* RPC methods")
    run.add_argument(
        "--inbox", action="store_true", help="accept tensors from `send-tensor` into <data-dir>/inbox (.npy)"
    )


def _add_node_commands(sub: Any) -> None:
    """id, peers, ping, connect, status, stop: one daemon, through its control socket."""
    ident = sub.add_parser("id", help="print this node's peer id", description="Print the peer id.")
    ident.add_argument("--key", metavar="FILE", help="read the peer id from a key file (no daemon needed)")
    _add_control(ident)
    peers = sub.add_parser("peers", help="list connected peers", description="List connected peers.")
    _add_control(peers)
    ping = sub.add_parser("ping", help="ping a peer", description="Ping a peer by multiaddr or peer id.")
    ping.add_argument("target", metavar="MULTIADDR|PEER_ID", help="multiaddr, or peer id (as for connect)")
    ping.add_argument("-c", "--count", type=int, default=3, help="number of pings (default 3)")
    _add_control(ping)
    connect = sub.add_parser(
        "connect",
        help="connect to a peer",
        description="Connect to a peer by multiaddr, or by peer id (found through the DHT, via its relay).",
    )
    connect.add_argument("target", metavar="MULTIADDR|PEER_ID")
    _add_control(connect)
    status = sub.add_parser("status", help="show node status", description="Show the node's status.")
    _add_control(status)
    stop = sub.add_parser("stop", help="stop the daemon", description="Ask the running daemon to shut down.")
    _add_control(stop)


def _add_rpc_commands(sub: Any) -> None:
    rpc = sub.add_parser("rpc", help="call peers' methods, measure transfers", description="Tensor RPC.")
    rpc_sub = rpc.add_subparsers(dest="rpc_command", metavar="ACTION", parser_class=_Parser, required=True)
    methods = rpc_sub.add_parser("methods", help="methods the daemon serves")
    call = rpc_sub.add_parser("call", help="call a method on a peer", description="Call METHOD on PEER.")
    call.add_argument("peer", metavar="PEER", help="peer id or multiaddr")
    call.add_argument("method")
    call.add_argument("payload", nargs="?", default="null", help="JSON payload (default: null)")
    call.add_argument("--timeout", type=float, default=30.0)
    bench = rpc_sub.add_parser("bench", help="measure transfers to a peer started with --enable-bench")
    bench.add_argument("peer", metavar="PEER", help="peer id or multiaddr")
    bench.add_argument("--size", default="64MiB", help="bytes per call: 8, 1MiB, 64MiB, 1GiB (default 64MiB)")
    bench.add_argument("--count", type=int, default=5)
    bench.add_argument("--direction", choices=["up", "down", "echo"], default="up")
    for p in (methods, call, bench):
        _add_control(p)


def _add_crdt_commands(sub: Any) -> None:
    crdt = sub.add_parser(
        "crdt", help="replicated documents", description="Read and write the daemon's replicated documents."
    )
    crdt_sub = crdt.add_subparsers(dest="crdt_command", metavar="ACTION", parser_class=_Parser, required=True)
    cget = crdt_sub.add_parser("get", help="print a document's map (opens it: it starts replicating)")
    cget.add_argument("doc")
    cset = crdt_sub.add_parser("set", help="set KEY to VALUE (JSON) in a document's map")
    cset.add_argument("doc")
    cset.add_argument("key")
    cset.add_argument("value", help="JSON value (a bare word is taken as a string)")
    cwatch = crdt_sub.add_parser(
        "watch", help="print every change of a document as it arrives (Ctrl-C stops)"
    )
    cwatch.add_argument("doc")
    cwatch.add_argument("--count", type=int, default=0, help="stop after this many changes (default: never)")
    cstatus = crdt_sub.add_parser("status", help="open documents, versions, counters")
    for p in (cget, cset, cwatch):
        p.add_argument("--map", default="root", help="the map inside the document (default: root)")
    for p in (cget, cset, cwatch, cstatus):
        _add_control(p)


def _add_send_tensor_command(sub: Any) -> None:
    send = sub.add_parser(
        "send-tensor",
        help="send a .npy tensor to a peer's inbox",
        description="Send FILE (.npy) to PEER, which saves it in its inbox (started with --inbox).",
    )
    send.add_argument("peer", metavar="PEER", help="peer id or multiaddr")
    send.add_argument("file", metavar="FILE", help="a .npy file (no pickled objects)")
    send.add_argument("--name", help="name in the peer's inbox (default: the file name)")
    send.add_argument("--codec", help="compress on the wire: fp16, bf16, int8, int8-block, topk:R")
    send.add_argument("--timeout", type=float, default=600.0)
    _add_control(send)


def _add_dht_commands(sub: Any) -> None:
    dht = sub.add_parser(
        "dht", help="DHT records and providers", description="Use the DHT of a running daemon."
    )
    dht_sub = dht.add_subparsers(dest="dht_command", metavar="ACTION", parser_class=_Parser, required=True)
    put = dht_sub.add_parser("put", help="store a signed record", description="Store KEY=VALUE (signed).")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    put.add_argument("--subkey", help="entry name under the key (default: this node's peer id)")
    get = dht_sub.add_parser("get", help="read a key", description="Read every entry stored under KEY.")
    get.add_argument("key")
    get.add_argument("--fast", action="store_true", help="return the first answer (may miss newer entries)")
    provide = dht_sub.add_parser("provide", help="announce that this node holds KEY")
    provide.add_argument("key")
    providers = dht_sub.add_parser("providers", help="find peers that announced KEY")
    providers.add_argument("key")
    dht_status = dht_sub.add_parser("status", help="routing table and store sizes, counters")
    for p in (put, get, provide, providers, dht_status):
        _add_control(p)


def _add_content_commands(sub: Any) -> None:
    """add, get, pins, content {status,pin,unpin,gc,verify}: the daemon's content store."""
    add = sub.add_parser(
        "add", help="add a file to the content store (prints its id)",
        description="Add FILE to the daemon's content store, pin it and announce it; print its id.",
    )  # fmt: skip
    add.add_argument("file", metavar="FILE")
    add.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin (GC may drop it)")
    add.add_argument(
        "--chunk-size", metavar="SIZE", help="chunk size, 4KiB-4MiB (default: the daemon's, 1MiB)"
    )
    get = sub.add_parser(
        "get", help="fetch content by id from the swarm",
        description="Fetch ID from its providers (the DHT's and --provider), verified chunk by chunk. "
        "An interrupted get resumes: only the missing chunks move.",
    )  # fmt: skip
    get.add_argument("cid", metavar="ID")
    get.add_argument("-o", "--output", metavar="FILE", help="copy it here (default: keep it in the store)")
    get.add_argument(
        "--provider", dest="providers", metavar="MULTIADDR|PEER_ID", action="append",
        help="ask this peer too (repeatable)",
    )  # fmt: skip
    get.add_argument(
        "--only-providers", dest="discover", action="store_false",
        help="fetch only from the --provider peers (no DHT lookup): e.g. peers you trust",
    )  # fmt: skip
    get.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin (GC may drop it)")
    get.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    pins = sub.add_parser("pins", help="list pinned content", description="List the daemon's pinned content.")
    content = sub.add_parser(
        "content", help="the content store: status, pin, unpin, gc, verify",
        description="The daemon's content store.",
    )  # fmt: skip
    csub = content.add_subparsers(
        dest="content_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    cstatus = csub.add_parser(
        "status", help="store usage, transfers in progress, serving counters, providers"
    )
    actions = [
        csub.add_parser("pin", help="keep ID (no GC) and announce it"),
        csub.add_parser("unpin", help="let GC drop ID and stop announcing it"),
        csub.add_parser("verify", help="re-hash every chunk of ID (corrupt ones are refetched if pinned)"),
    ]
    for p in actions:
        p.add_argument("cid", metavar="ID")
    gc = csub.add_parser("gc", help="drop unpinned content now")
    for p in (add, get, pins, cstatus, gc, *actions):
        _add_control(p)


def _version() -> str:
    from lattice._version import __version__

    return f"lattice-node {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    core = build_parser(with_apps=False)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = core if first in _COMMANDS else build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from lattice.errors import LatticeError
    from lattice.observe.inert import inert

    try:
        return _COMMANDS[args.command](args)
    except (LatticeError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        error = _sole_error(exc)
        if isinstance(error, KeyboardInterrupt):
            return 130
        if not isinstance(error, LatticeError):
            raise
        print(f"lattice-node: error: {inert(error)}", file=sys.stderr)  # may quote a remote peer
        return EXIT_USAGE


def _sole_error(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups of one member each (what trio makes of an error
    raised in the body of ``async with Node(...)``), else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# -- the daemon
def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from lattice.observe.logs import setup_logging

    config = node_config(args)
    setup_logging(config.log_level, config.log_format)
    return trio.run(_run_daemon, config, args.ready_file, args.enable_bench, args.inbox)


async def _run_daemon(config, ready_file: str | None, enable_bench: bool = False, inbox: bool = False) -> int:
    from lattice.plugins import build_node

    node = build_node(config)  # with the services of the apps the config enables
    if enable_bench:
        from lattice.rpc import bench

        bench.install(node.rpc)
    if inbox:
        from lattice._files import private_dir
        from lattice.rpc import inbox as tensor_inbox

        private_dir(config.data_dir, "data dir")  # checked before the inbox is made inside it
        limits = tensor_inbox.InboxLimits(
            max_files=config.inbox_max_files,
            max_bytes=config.inbox_max_bytes,
            max_files_per_peer=config.inbox_max_files_per_peer,
            max_bytes_per_peer=config.inbox_max_bytes_per_peer,
        )
        tensor_inbox.install(node.rpc, config.data_dir / "inbox", limits)
    async with node:
        info = await node.id()
        info["control"] = str(node.control_path) if node.control_path else None
        info["pid"] = os.getpid()
        info["http"] = node.http_url
        print(f"lattice-node ready\npeer id: {info['peer_id']}", flush=True)
        for addr in info["addrs"]:
            print(f"listening: {addr}", flush=True)
        if info["control"]:
            print(f"control: {info['control']}", flush=True)
        if info["http"]:
            print(f"metrics and web page: {info['http']}", flush=True)
        if ready_file:
            write_atomic(ready_file, json.dumps(info))
        from lattice._allocator import keep_freed_memory  # after ready: ctypes is not on start-up's path

        keep_freed_memory()  # a long-running daemon: the heap does not shrink and regrow per MiB moved
        await node.serve_until_stopped()
    remove_ready_file(ready_file)
    if node.fatal_error:  # the node stopped itself (e.g. its bootstrap peers are of another swarm)
        print(f"lattice-node: error: {node.fatal_error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    print("lattice-node stopped", file=sys.stderr, flush=True)
    return 0


def remove_ready_file(path: str | None) -> None:
    """Remove the ready file on the way out (whoever waits on it then sees the process stopped
    serving); already gone is fine."""
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


def write_atomic(path: str, text: str, what: str = "ready file") -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never half of it
    (ready files and address files that other processes poll). The temporary file has a random name
    and is created exclusively: a symlink planted in a shared directory (/tmp) is never followed."""
    from lattice._files import exclusive_temp
    from lattice.errors import ConfigError

    target = os.path.abspath(path)
    tmp = None
    try:
        fd, tmp = exclusive_temp(os.path.dirname(target), os.path.basename(target), ".tmp")
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o644)  # what other processes poll is not secret
            fh.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {what} {path}: {exc.strerror}") from None


# -- client commands
def _client(args: argparse.Namespace, timeout: float = 60.0):
    from lattice.config import NodeConfig
    from lattice.control.client import Client

    path = args.control or NodeConfig.load(args.config).control_path
    return Client(path, timeout=timeout)


def _add_row(table: Any, *cells: Any) -> None:
    """A rich table row shown literally, since cells may hold what remote peers chose
    (lattice.observe.inert); a list is one line per item ("-" if empty)."""
    from rich.text import Text

    from lattice.observe.inert import inert

    def cell(value: Any) -> Text:
        if isinstance(value, list):
            return Text("\n".join(inert(item) for item in value) or "-")
        return Text(inert(value))

    table.add_row(*(cell(c) for c in cells))


def _print(args: argparse.Namespace, data: Any, render) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        render(data)


def cmd_id(args: argparse.Namespace) -> int:
    if args.key:
        from lattice.identity import load_or_create_key

        print(load_or_create_key(args.key, create=False).peer_id)
        return 0
    with _client(args) as client:
        info = client.id()
    _print(args, info, lambda d: print(d["peer_id"]))
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    with _client(args) as client:
        peers = client.peers()

    def render(rows: list[dict]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} connected peer(s)")
        for col in ("peer id", "address", "dir", "path", "rtt ms", "agent"):
            table.add_column(col, overflow="fold")
        for p in rows:
            rtt = "" if p["rtt_ms"] is None else f"{p['rtt_ms']:.2f}"
            path = "relayed" if p["relayed"] else "direct"
            punch = p.get("hole_punch")
            if p["relayed"] and punch and punch["outcome"] != "direct":
                path += " (hole punch failed: NAT likely symmetric)"
            _add_row(table, p["peer_id"], p["addr"], p["direction"], path, rtt, p["agent"])
        Console().print(table)

    _print(args, peers, render)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    if args.count < 1 or args.count > 1000:
        from lattice.errors import ConfigError

        raise ConfigError("--count must be between 1 and 1000")
    target = args.target
    if target.startswith("/"):
        from lattice.multiaddr import Multiaddr

        Multiaddr.parse(target)  # a clear error before contacting the daemon
    else:
        from lattice.identity import PeerId

        PeerId.from_string(target)
    with _client(args) as client:
        rtts = client.ping(target, count=args.count)
    ms = [r * 1000 for r in rtts]

    def render(values: list[float]) -> None:
        for i, v in enumerate(values, 1):
            print(f"pong {i} from {target}: {v:.3f} ms")
        print(
            f"min/median/max = {min(values):.3f}/{sorted(values)[len(values) // 2]:.3f}/{max(values):.3f} ms"
        )

    _print(args, {"rtt_ms": ms}, lambda d: render(d["rtt_ms"]))
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    from lattice.identity import PeerId
    from lattice.multiaddr import Multiaddr
    from lattice.observe.inert import inert

    if args.target.startswith("/"):
        Multiaddr.parse(args.target)
    else:
        PeerId.from_string(args.target)  # a clear error before contacting the daemon
    with _client(args) as client:
        peer = client.connect(args.target)
    _print(args, {"peer_id": peer}, lambda d: print(f"connected to {inert(d['peer_id'])}"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()

    def render(s: dict) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="lattice-node status", show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value", overflow="fold")
        _add_row(table, "peer id", s["peer_id"])
        _add_row(table, "version", s["version"])
        if s.get("swarm"):
            _add_row(table, "swarm", s["swarm"] + (f" ({', '.join(s['roles'])})" if s.get("roles") else ""))
        _add_row(table, "uptime", f"{s['uptime_s']:.0f} s")
        _add_row(table, "reachability", s["reachability"])
        nat = s.get("nat") or {}
        relays = [f"{r['relay']} (expires in {r['expires_in']} s)" for r in nat.get("relays", [])]
        _add_row(table, "relays", relays)
        if nat.get("relay_service"):
            rs = nat["relay_service"]
            _add_row(table, "relay server", f"{rs['reservations']} reservations, {rs['circuits']} circuits")
        _add_row(table, "direct/relayed", f"{s['direct_peers']} / {s['relayed_peers']}")
        paths = [f"{peer[-8:]}: {path}" for peer, path in sorted(s.get("paths", {}).items())[:32]]
        _add_row(table, "peer paths", paths)
        mapping = nat.get("port_mapping")
        if mapping is not None:
            text = f"{mapping['external']} via {mapping['method']}" if mapping["mapped"] else mapping["error"]
            _add_row(table, "port mapping", text or "-")
        punches = nat.get("hole_punches", {})
        failed = sum(1 for r in punches.values() if r["outcome"] != "direct")
        if punches:
            _add_row(table, "hole punches", f"{len(punches) - failed} direct, {failed} failed")
        _add_row(table, "addresses", s["addrs"])
        _add_row(table, "observed", s["observed_addrs"])
        _add_row(table, "peers/conns", f"{s['peers']} / {s['connections']}")
        boot = [f"{b['addr']} ({'up' if b['connected'] else 'down'})" for b in s["bootstrap"]]
        _add_row(table, "bootstrap", boot)
        _add_row(table, "traffic", f"sent {s['bytes_sent']} B, received {s['bytes_received']} B")
        res = s.get("resources")
        if res:
            node = res["node"]
            mib = 1 << 20
            refusals = ", ".join(f"{k} {v}" for k, v in sorted(res["refusals"].items()))
            _add_row(table, "budgets", [
                f"memory {node['memory'] / mib:.1f} / {node['memory_limit'] / mib:.0f} MiB"
                f" (peak {node['peak_memory'] / mib:.1f})",
                f"connections {node['connections']} / {node['connections_limit']}, "
                f"streams {node['streams']} / {node['streams_limit']}, "
                f"pending handshakes {node['pending_handshakes']} / {node['pending_handshakes_limit']}",
                f"refused: {sum(res['refusals'].values())} ({refusals or 'none'}), "
                f"evicted handshakes {res['evicted_handshakes']}, dropped replies {res['dropped_replies']}",
            ])  # fmt: skip
        _add_row(table, "services", ", ".join(s["services"]) or "-")
        _add_row(table, "control", s["control"] or "-")
        Console().print(table)

    _print(args, status, render)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.shutdown()
    if not args.json:
        print("daemon is stopping")
    return 0


def _summarise(value: Any) -> Any:
    """JSON-printable view of a reply: tensors become their dtype and shape."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return {"tensor": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return [_summarise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _summarise(v) for k, v in value.items()}
    return value


def cmd_rpc(args: argparse.Namespace) -> int:
    from lattice.errors import ConfigError

    with _client(args) as client:
        if args.rpc_command == "methods":
            methods = client.rpc.methods()
            _print(args, methods, lambda rows: print("\n".join(rows)))
        elif args.rpc_command == "call":
            try:
                payload = json.loads(args.payload)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"payload is not valid JSON: {exc}") from None
            reply = client.rpc.call(args.peer, args.method, payload, timeout=args.timeout)
            print(json.dumps(_summarise(reply), indent=2 if not args.json else None))
        else:
            from lattice.config import parse_size

            size = parse_size(args.size, "--size")
            if not 1 <= args.count <= 10_000:
                raise ConfigError("--count must be between 1 and 10000")
            result = client.rpc.bench(args.peer, size, count=args.count, direction=args.direction)

            def show(r: dict) -> None:
                speed = f", {r['mib_per_s']:.0f} MiB/s" if r.get("mib_per_s") else ""
                print(
                    f"{args.direction} {args.size} x{args.count}: median {r['median_s'] * 1000:.3f} ms{speed}"
                )

            _print(args, result, show)
    return 0


def cmd_send_tensor(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from lattice.errors import ConfigError
    from lattice.observe.inert import inert
    from lattice.rpc import inbox

    name = args.name or os.path.basename(args.file).removesuffix(".npy")
    if not inbox.NAME.match(name):
        raise ConfigError(f"invalid name {name!r}: use A-Z a-z 0-9 . _ - (up to 100 characters)")
    try:
        tensor = np.load(args.file, allow_pickle=False)  # never unpickle: .npy of plain dtypes only
    except FileNotFoundError:
        raise ConfigError(f"{args.file} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{args.file} is not a readable .npy array: {exc}") from None
    if not isinstance(tensor, np.ndarray):
        raise ConfigError(f"{args.file} holds several arrays (.npz); send one .npy")
    with _client(args) as client:
        start = time.perf_counter()
        reply = client.rpc.call(
            args.peer, inbox.METHOD, {"name": name, "tensor": tensor}, timeout=args.timeout, codec=args.codec
        )
        seconds = time.perf_counter() - start

    def show(r: dict) -> None:
        mib = tensor.nbytes / 2**20
        what = f"{tensor.dtype}{list(tensor.shape)} ({mib:.1f} MiB)"
        print(f"sent {what} in {seconds:.2f} s, {mib / seconds:.0f} MiB/s")
        print(f"stored in the peer's inbox as {inert(r['file'])} (sha256 {inert(r['sha256'])[:16]}...)")

    _print(args, reply, show)
    return 0


def _printable_entry(entry: dict) -> dict:
    import time

    return {
        "value": entry["value"].decode("utf-8", "replace"),
        "publisher": entry["publisher"],
        "subkey": entry["subkey"].hex(),
        "expires_in_s": round(entry["expires_at"] - time.time(), 1),
    }


def cmd_crdt(args: argparse.Namespace) -> int:
    from lattice.observe.inert import inert  # JSON output (json.dumps) escapes control characters itself

    with _client(args) as client:
        if args.crdt_command == "get":
            result = client.call("crdt.get", doc=args.doc, map=args.map)
        elif args.crdt_command == "set":
            try:
                value = json.loads(args.value)
            except json.JSONDecodeError:
                value = args.value
            result = client.call("crdt.set", doc=args.doc, key=args.key, value=value, map=args.map)
        elif args.crdt_command == "watch":
            try:
                for change in client.stream("crdt.watch", doc=args.doc, map=args.map, limit=args.count):
                    if args.json:
                        print(json.dumps(change, default=str), flush=True)
                    else:
                        who = "local" if change["local"] else inert(change["author"][-8:])
                        print(f"{who} #{change['seq']}: {json.dumps(change['map'], default=str)}", flush=True)
            except KeyboardInterrupt:
                pass
            return 0
        else:
            result = client.call("crdt.status")
    _print(args, result, lambda r: print(json.dumps(r, indent=2, default=str)))
    return 0


def cmd_dht(args: argparse.Namespace) -> int:
    from lattice.errors import ConfigError
    from lattice.observe.inert import inert  # values, publishers, addresses: what remote peers chose

    if args.dht_command in ("put", "get", "provide", "providers") and not 0 < len(args.key.encode()) <= 512:
        raise ConfigError("a DHT key has 1 to 512 bytes")
    with _client(args) as client:
        if args.dht_command == "put":
            if args.ttl <= 0:
                raise ConfigError("--ttl must be positive")
            n = client.dht.put(args.key, args.value.encode(), ttl=args.ttl, subkey=args.subkey)
            _print(args, {"replicas": n}, lambda d: print(f"stored on {d['replicas']} peer(s)"))
        elif args.dht_command == "get":
            rows = [_printable_entry(e) for e in client.dht.get(args.key, latest=not args.fast)]

            def show(rows: list[dict]) -> None:
                for e in rows:
                    print(f"{inert(e['value'])}\t(publisher {inert(e['publisher'])}, "
                          f"expires in {e['expires_in_s']:.0f} s)")  # fmt: skip
                if not rows:
                    print("(nothing stored under this key)")

            _print(args, rows, show)
        elif args.dht_command == "provide":
            n = client.dht.provide(args.key)
            _print(args, {"announced_to": n}, lambda d: print(f"announced to {d['announced_to']} peer(s)"))
        elif args.dht_command == "providers":
            found = client.dht.providers(args.key)
            _print(
                args,
                found,
                lambda rows: print(
                    "\n".join(f"{inert(p)}  {inert(' '.join(a))}" for p, a in rows) or "(none)"
                ),
            )
        else:
            _print(
                args,
                client.dht.status(),
                lambda d: print("\n".join(f"{inert(k)}: {inert(v)}" for k, v in d.items())),
            )
    return 0


def _check_cid(text: str) -> None:
    from lattice.content import ContentId

    ContentId.parse(text)  # a clear error before contacting the daemon


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def cmd_add(args: argparse.Namespace) -> int:
    from lattice.errors import ConfigError

    if not os.path.isfile(args.file):
        raise ConfigError(f"{args.file} is not a file")
    chunk_size = None
    if args.chunk_size:
        from lattice.config import parse_size

        chunk_size = parse_size(args.chunk_size, "--chunk-size")
    with _client(args) as client:
        added = client.content.add(args.file, pin=args.pin, chunk_size=chunk_size)
    _print(args, added, lambda d: print(d["cid"]))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    """Fetch with a progress bar (providers, rate, ETA) fed by the daemon's progress items."""
    from lattice.errors import ConfigError

    _check_cid(args.cid)
    if args.output and os.path.isdir(args.output):
        raise ConfigError(f"{args.output} is a directory: give a file name")
    if not args.discover and not args.providers:
        raise ConfigError("--only-providers needs at least one --provider")
    with _client(args, timeout=600.0) as client:  # finding providers and a manifest may take minutes
        items = client.content.get(
            args.cid, args.output, providers=args.providers, pin=args.pin, discover=args.discover
        )
        if args.json or args.quiet:
            result = {}
            for item in items:
                result = item
        else:
            result = _get_with_progress(items)
    result = {k: v for k, v in result.items() if k not in ("eta_s",)}

    def show(r: dict) -> None:
        moved = (
            f"{r['fetched']} chunks fetched, {r['had']} already here" if r.get("chunks") else "already here"
        )
        rate = f", {_mib(r['bytes'] / r['elapsed_s'])}/s" if r.get("elapsed_s") else ""
        print(f"{r['path']} ({moved}{rate})")

    _print(args, result, show)
    return 0


def _get_with_progress(items: Any) -> dict:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from lattice.observe.inert import inert

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[rate]}/s  ETA {task.fields[eta]}  {task.fields[providers]} provider(s)"),
    )
    result: dict = {}
    with Progress(*columns, transient=False) as bar:
        task = None
        for item in items:
            result = item
            if "chunks" not in item or "size" not in item:
                continue
            chunks = max(item["chunks"], 1)
            done = item["size"] * (item["chunks"] - item["remaining"]) / chunks
            eta = item.get("eta_s")
            fields = {
                "rate": _mib(item["rate"]),
                "eta": "-" if eta is None or eta == float("inf") else f"{eta:.0f} s",
                "providers": item["providers"],
            }
            if task is None:
                task = bar.add_task(inert(item["cid"])[-12:], total=item["size"], **fields)
            bar.update(task, completed=done, **fields)
    return result


def cmd_pins(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.content.pins()

    def render(rows: list[dict]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} pinned")
        for col in ("id", "size", "state"):
            table.add_column(col, overflow="fold")
        for r in rows:
            state = (
                r["state"] if "have_chunks" not in r else f"{r['state']} ({r['have_chunks']}/{r['chunks']})"
            )
            _add_row(table, r["cid"], _mib(r["size"]), state)
        Console().print(table)

    _print(args, rows, render)
    return 0


def cmd_content(args: argparse.Namespace) -> int:
    action = args.content_command
    if action in ("pin", "unpin", "verify"):
        _check_cid(args.cid)
    with _client(args) as client:
        if action == "status":
            _print(args, client.content.status(), _render_content_status)
        elif action == "pin":
            client.content.pin(args.cid)
            _print(args, {"pinned": args.cid}, lambda d: print(f"pinned {d['pinned']}"))
        elif action == "unpin":
            changed = client.content.unpin(args.cid)
            _print(args, {"unpinned": changed}, lambda d: print("unpinned" if changed else "was not pinned"))
        elif action == "gc":
            _print(args, client.content.gc(), lambda d: print(
                f"removed {d['removed']} object(s), freed {_mib(d['freed_bytes'])}"))  # fmt: skip
        else:
            r = client.content.verify(args.cid)
            _print(args, r, lambda d: print(f"{len(d['bad_chunks'])} corrupt chunk(s)"))
    return 0


def _render_content_status(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    store, serving = s["store"], s["serving"]
    table = Table(title="content", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    used = f"{_mib(store['used_bytes'])} of {_mib(store['max_bytes'])}"
    _add_row(table, "store", f"{used}: {store['objects']} complete, {store['partial']} partial, "
             f"{store['pinned']} pinned")  # fmt: skip
    _add_row(table, "announced", s["announced"])
    fetching = [
        f"{cid[-12:]}: {p['chunks'] - p['remaining']}/{p['chunks']} chunks, {_mib(p['rate'])}/s, "
        f"{p['providers']} provider(s)"
        for cid, p in s["fetching"].items()
    ]
    _add_row(table, "fetching", fetching)
    _add_row(table, "fetched", f"{serving['chunks_fetched']} chunks, {_mib(serving['bytes_fetched'])}, "
             f"{serving['bad_chunks']} bad")  # fmt: skip
    _add_row(table, "serving", f"{serving['active']} request(s) from {serving['peers']} peer(s)")
    _add_row(
        table,
        "served",
        f"{serving['requests']} requests, {serving['chunks_served']} chunks, "
        f"{_mib(serving['bytes_served'])}; refused {serving['refused']}, malformed {serving['malformed']}",
    )
    providers = [f"{p[-8:]}: {_mib(r['rate'])}/s, {r['chunks']} chunks" + (f" (dropped: {r['dropped']})"
                 if r.get("dropped") else "") for p, r in s["providers"].items()]  # fmt: skip
    _add_row(table, "providers", providers)
    _add_row(table, "bad providers", [f"{p[-8:]}: {why}" for p, why in s["bad_providers"].items()])
    Console().print(table)


_COMMANDS: dict[str, Command] = {
    "run": cmd_run,
    "id": cmd_id,
    "peers": cmd_peers,
    "ping": cmd_ping,
    "connect": cmd_connect,
    "status": cmd_status,
    "stop": cmd_stop,
    "dht": cmd_dht,
    "rpc": cmd_rpc,
    "send-tensor": cmd_send_tensor,
    "crdt": cmd_crdt,
    "add": cmd_add,
    "get": cmd_get,
    "pins": cmd_pins,
    "content": cmd_content,
}

if __name__ == "__main__":
    raise SystemExit(main())
