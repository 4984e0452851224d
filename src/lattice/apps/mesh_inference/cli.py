"""``lattice-node serve-model`` (a daemon serving a stage) and ``lattice-node generate``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from lattice.cli import add_node_options, node_config, remove_ready_file, write_atomic
from lattice.plugins import App

if TYPE_CHECKING:
    from lattice.node import Node


def register(sub: Any, commands: dict) -> None:
    """Add the subcommands to lattice-node's parser (the hook in lattice.cli)."""
    serve = sub.add_parser(
        "serve-model",
        help="serve a range of a model's blocks to mesh-inference clients",
        description="Run a node that serves blocks A:B of a model and announces them in the DHT.",
    )
    serve.add_argument(
        "--model",
        default="smollm2",
        help="tiny-random[:SEED], smollm2, a LLaMA / Qwen2 .gguf, or the content id of a packed model "
        "(pack-model)",
    )
    serve.add_argument("--blocks", default="auto", help="A:B (blocks A..B-1), or auto (least served)")
    serve.add_argument(
        "--n-blocks", type=int, default=None, help="with --blocks auto: how many (default: as many as fit)"
    )
    serve.add_argument(
        "--max-memory-mib",
        type=int,
        default=None,
        help="weights budget, --blocks auto (default: half free)",
    )
    add_node_options(serve)  # --config, --listen, --bootstrap, --data-dir, --control, --join, ... as `run`
    serve.add_argument(
        "--ready-file", metavar="FILE", help="write {peer_id, addrs, blocks, ...} when serving"
    )
    serve.add_argument("--max-sessions", type=int, default=16)
    serve.add_argument("--max-sessions-per-peer", type=int, default=4)
    serve.add_argument("--cache-mib", type=int, default=512, help="KV-cache budget (MiB)")
    serve.add_argument("--max-context", type=int, default=2048, help="positions per session")
    serve.add_argument("--prefill-chunk", type=int, default=256, help="prompt positions per compute step")
    serve.add_argument("--session-ttl", type=float, default=60.0, help="idle sessions are dropped after this")
    serve.add_argument("--announce-interval", type=float, default=10.0)
    serve.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the cores shared among this user's serve-model processes on "
        "this machine, re-balanced as they start and stop)",
    )
    serve.add_argument(
        "--inline-tokens", type=int, default=4, help="calls of <= N tokens skip the worker thread (0: never)"
    )
    serve.add_argument("--cache-dir", metavar="DIR", help="dequantized weights (<data-dir>/mesh-cache)")
    serve.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights and linear layers (bfloat16/float16: half the memory; docs/mesh-inference.md)",
    )
    serve.add_argument(
        "--max-batch", type=int, default=16, help="sessions whose steps run as one forward (1: no batching)"
    )
    commands["serve-model"] = cmd_serve_model

    gen = sub.add_parser(
        "generate",
        help="generate text through the mesh, printing tokens as they arrive",
        description="Join the network, find a chain of stage servers and generate (greedy unless "
        "--temperature). The model's config and tokenizer come from the servers: no local copy.",
    )
    gen.add_argument(
        "prompt", nargs="?", default="", help="prompt text (tokenized with the servers' tokenizer)"
    )
    gen.add_argument(
        "--model", default="smollm2", help="the model id the servers announce (or a spec as for serve-model)"
    )
    gen.add_argument("--tokens", help="comma-separated prompt token ids instead of text")
    gen.add_argument("--bootstrap", metavar="MULTIADDR", action="append", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for a chain")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    add_sampling_options(gen)
    commands["generate"] = cmd_generate

    pack = sub.add_parser(
        "pack-model",
        help="write a model as one safetensors file to add to the content store",
        description="Write every tensor of a model (fp32) and its config and tokenizer into one "
        "safetensors file. Add it to a node (`lattice-node add FILE`): stage servers started with "
        "`serve-model --model <its id>` then fetch only their blocks from that node.",
    )
    pack.add_argument("--model", default="smollm2", help="tiny-random[:SEED], smollm2 or a LLaMA/Qwen2 .gguf")
    pack.add_argument("-o", "--output", required=True, metavar="FILE")
    pack.add_argument("--cache-dir", metavar="DIR", help="dequantized weights cache (default: none)")
    commands["pack-model"] = cmd_pack_model

    api = sub.add_parser(
        "serve-api",
        help="an OpenAI-compatible HTTP endpoint (/v1/completions, /v1/chat/completions) on the mesh",
        description="Run a client node that joins the mesh and serves the OpenAI API for one model.",
    )
    api.add_argument("--model", default="smollm2", help="the model id the servers announce")
    api.add_argument("--http", default="127.0.0.1:8000", help="HOST:PORT (loopback unless --api-key-file)")
    api.add_argument("--api-key-file", metavar="FILE", help="clients must send this key (Bearer); also env "
                     "LATTICE_API_KEY")  # fmt: skip
    api.add_argument("--max-tokens", type=int, default=512, help="completion tokens per request")
    api.add_argument("--max-prompt-tokens", type=int, default=4096)
    api.add_argument("--max-body-kib", type=int, default=1024, help="request body size")
    api.add_argument("--max-generations", type=int, default=4, help="generations at once (the stage "
                     "servers' --max-sessions-per-peer must allow as many)")  # fmt: skip
    api.add_argument("--max-generations-per-client", type=int, default=2)
    api.add_argument("--http-max-connections", type=int, default=64, help="open HTTP connections")
    api.add_argument("--http-max-connections-per-ip", type=int, default=16)
    api.add_argument("--http-request-timeout", type=float, default=10.0, help="seconds to send a request")
    api.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for a chain at start")
    add_node_options(api)
    api.add_argument("--ready-file", metavar="FILE", help="write {url, peer_id, ...} when serving")
    commands["serve-api"] = cmd_serve_api


def add_sampling_options(parser: Any) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this mass")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    parser.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")


def sampling_from(args: argparse.Namespace) -> Any:
    from lattice.apps.mesh_inference.sampling import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip


def _blocks(text: str, n_layers: int) -> tuple[int, int] | None:
    from lattice.errors import ConfigError

    if text == "auto":
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--blocks {text!r}: expected A:B") from None
    if not 0 <= a < b <= n_layers:
        raise ConfigError(f"--blocks {text}: the model has blocks 0:{n_layers}")
    return a, b


def _blocks_that_fit(config: Any, args: argparse.Namespace) -> int:
    """How many blocks' fp32 weights fit in --max-memory-mib (default: half the free memory)."""
    from lattice.apps.mesh_inference.config import expected_shapes
    from lattice.apps.mesh_inference.server import free_memory

    budget = (args.max_memory_mib << 20) if args.max_memory_mib else free_memory() // 2
    shapes = expected_shapes(config)
    per_block = 4 * sum(_numel(shapes[n]) for n in config.block_tensor_names(0))
    return max(1, min(config.n_layers, budget // max(per_block, 1)))


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def cmd_serve_model(args: argparse.Namespace) -> int:
    import trio

    from lattice.apps.mesh_inference.weights import content_model, open_model
    from lattice.observe.logs import setup_logging

    config = node_config(args)
    setup_logging(config.log_level, config.log_format)  # remote strings in log lines inert
    source = content_model(args.model) or open_model(args.model)
    blocks = _blocks(args.blocks, source.config.n_layers) if source.config is not None else None
    from lattice.apps.mesh_inference.server import release_large_buffers

    release_large_buffers()  # so peak memory follows ServerLimits.step_bytes (see there)
    return one_line_errors(trio.run, _serve, args, config, source, blocks)


async def _serve(args: argparse.Namespace, config: Any, source: Any, blocks: tuple[int, int] | None) -> int:
    from pathlib import Path

    import trio

    from lattice.apps.mesh_inference.client import MeshClient
    from lattice.apps.mesh_inference.model import Stage
    from lattice.apps.mesh_inference.routing import choose_blocks
    from lattice.apps.mesh_inference.server import ServerLimits, StageServer
    from lattice.apps.mesh_inference.weights import ContentModel
    from lattice.plugins import build_node

    limits = ServerLimits(max_sessions=args.max_sessions, max_sessions_per_peer=args.max_sessions_per_peer,
                          cache_bytes=args.cache_mib << 20, max_context=args.max_context,
                          prefill_chunk=args.prefill_chunk, session_ttl=args.session_ttl,
                          inline_tokens=args.inline_tokens, max_batch=args.max_batch)  # fmt: skip

    async def load(node: Node) -> Stage:
        nonlocal blocks
        if blocks is None or source.config is None:
            with trio.move_on_after(3.0):
                while not await node.peers():
                    await trio.sleep(0.05)
        if source.config is None:  # a packed model: its config comes with it (the header only)
            await source.open(node.content)
            assert source.config is not None
            blocks = _blocks(args.blocks, source.config.n_layers)
        if blocks is None:  # look at what the network serves, take the least-served window
            n = source.config.n_layers
            servers = await MeshClient(node, source.model_id).servers(fresh=True)
            blocks = choose_blocks(servers, n, args.n_blocks or _blocks_that_fit(source.config, args))
        start, end = blocks
        if isinstance(source, ContentModel):  # only the chunks of these blocks, from its providers
            weights = await source.load(node.content, start, end)
            server.set_tokenizer(source.tokenizer() if source.meta.get("tokenizer") else None, source.eos())
        else:
            cache = Path(args.cache_dir) if args.cache_dir else config.data_dir / "mesh-cache"
            weights = await trio.to_thread.run_sync(source.load, start, end, cache)
        return Stage(source.config, weights, start, end, args.dtype)

    server = StageServer(
        load,
        source.model_id,
        limits,
        announce_interval=args.announce_interval,
        threads=args.threads or "auto",
        tokenizer=source.tokenizer() if source.config is not None else None,  # a packed model's: in load
        eos=source.eos() if source.config is not None else None,
    )
    node = build_node(config)  # with the services of other apps the config enables
    node.add_service(server)
    async with node:
        await server.ready.wait()
        start, end = server.stage.start, server.stage.end
        info = await node.id()
        info |= {"control": str(node.control_path) if node.control_path else None, "pid": os.getpid(),
                 "model_id": source.model_id, "blocks": [start, end],
                 "throughput": server.throughput}  # fmt: skip
        print(f"lattice-node serving {source.model_id} blocks {start}:{end}\npeer id: {info['peer_id']}",
              flush=True)  # fmt: skip
        for addr in info["addrs"]:
            print(f"listening: {addr}", flush=True)
        if args.ready_file:
            write_atomic(args.ready_file, json.dumps(info))
        await node.serve_until_stopped()
    remove_ready_file(args.ready_file)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import trio

    from lattice.apps.mesh_inference.weights import model_id_for
    from lattice.errors import ConfigError

    prompt: list[int] | None = None
    if args.tokens:
        try:
            prompt = [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            raise ConfigError("--tokens: comma-separated integers") from None
        if not prompt:
            raise ConfigError("empty prompt")
    elif not args.prompt:
        raise ConfigError("empty prompt")
    sampling = sampling_from(args)
    return one_line_errors(trio.run, _generate, args, model_id_for(args.model), prompt, sampling)


def cmd_pack_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lattice.apps.mesh_inference.weights import open_model, pack_model

    source = open_model(args.model)
    out = pack_model(source, Path(args.output), Path(args.cache_dir) if args.cache_dir else None)
    print(f"{out}: {source.model_id}, {out.stat().st_size} bytes\nadd it to a node: lattice-node add {out}")
    return 0


def one_line_errors(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, with an error from inside the node's task groups raised as the one error that
    caused it (lattice-node prints a LatticeError as one line); a network or timeout error becomes
    a MeshError naming it."""
    import trio

    from lattice.apps.mesh_inference.errors import MeshError, real_cause
    from lattice.errors import LatticeError

    try:
        return fn(*args)
    except (KeyboardInterrupt, LatticeError):
        raise
    except BaseException as exc:
        cause = real_cause(exc)
        if isinstance(cause, LatticeError | KeyboardInterrupt):
            raise cause from None
        if isinstance(cause, OSError | trio.TooSlowError):
            raise MeshError(f"{type(cause).__name__}: {cause or 'timed out'}") from None
        raise


async def _generate(args: argparse.Namespace, model_id: str, prompt: list[int] | None, sampling: Any) -> int:
    import tempfile
    import time
    from pathlib import Path

    from lattice.apps.mesh_inference.client import MeshClient
    from lattice.apps.mesh_inference.errors import MeshError
    from lattice.apps.mesh_inference.tokenizer import format_chat
    from lattice.config import NodeConfig
    from lattice.node import Node
    from lattice.observe.inert import inert  # server ids and generated text come from remote peers

    with tempfile.TemporaryDirectory(prefix="lattice-generate-") as tmp:
        cfg = NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",), bootstrap=args.bootstrap, data_dir=Path(tmp),
                         control=False)  # fmt: skip
        async with Node(cfg) as node:
            await _reach_bootstrap(node, args.bootstrap, args.timeout)
            client = MeshClient(node, model_id)
            await client.wait_for_chain(args.timeout)
            card = await client.model_card()  # config, tokenizer, stop tokens: from the servers
            tokenizer = await client.tokenizer() if card.tokenizer is not None else None
            if prompt is None:
                if tokenizer is None:
                    raise MeshError(f"the servers of {model_id} publish no tokenizer: give --tokens")
                text = (
                    format_chat([("user", args.prompt)], card.chat or "plain") if args.chat else args.prompt
                )
                prompt = tokenizer.encode(text).ids
            out: list[int] = []
            t0 = time.perf_counter()
            first = None
            async with client.session() as session:
                if not args.json:
                    route = " -> ".join(
                        f"{inert(h.server.peer[-8:])}[{h.start}:{h.end}]" for h in session.chain
                    )
                    print(f"chain: {route}", file=sys.stderr, flush=True)
                shown = ""
                async for token in session.generate(prompt, args.max_new_tokens, stop=card.stop,
                                                    sampling=sampling):  # fmt: skip
                    first = first or time.perf_counter() - t0
                    out.append(token)
                    if args.json:
                        continue
                    if tokenizer is not None:
                        text = tokenizer.decode(out)
                        sys.stdout.write(inert(text[len(shown) :], keep="\n"))
                        shown = text
                    else:
                        sys.stdout.write(f"{token} ")
                    sys.stdout.flush()
                elapsed = time.perf_counter() - t0
                chain = [[h.server.peer, h.start, h.end] for h in session.chain]
                recoveries = session.recoveries
            result = {"tokens": out, "text": tokenizer.decode(out) if tokenizer else None,
                      "seconds": round(elapsed, 3), "first_token_s": round(first or 0, 3),
                      "chain": chain, "recoveries": recoveries}  # fmt: skip
            if args.json:
                print(json.dumps(result))
            else:
                print(f"\n[{len(out)} tokens in {elapsed:.2f} s]", file=sys.stderr)
    return 0


def cmd_serve_api(args: argparse.Namespace) -> int:
    import trio

    from lattice.apps.mesh_inference.api import ApiLimits
    from lattice.apps.mesh_inference.weights import model_id_for
    from lattice.observe.logs import setup_logging

    config = node_config(args)
    setup_logging(config.log_level, config.log_format)
    limits = ApiLimits(max_body=args.max_body_kib << 10, max_tokens=args.max_tokens,
                       max_prompt_tokens=args.max_prompt_tokens, max_sessions=args.max_generations,
                       max_sessions_per_client=args.max_generations_per_client,
                       max_connections=args.http_max_connections,
                       max_connections_per_ip=args.http_max_connections_per_ip,
                       request_timeout=args.http_request_timeout)  # fmt: skip
    key = _api_key(args.api_key_file)
    return one_line_errors(trio.run, _serve_api, args, config, model_id_for(args.model), limits, key)


def _api_key(path: str | None) -> str | None:
    """The key from --api-key-file (first line) or $LATTICE_API_KEY; None for neither."""
    from lattice.errors import ConfigError

    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                key = fh.readline().strip()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {path}: {exc.strerror or exc}") from None
        if len(key) < 16:
            raise ConfigError(f"--api-key-file {path}: the key must have at least 16 characters")
        return key
    return os.environ.get("LATTICE_API_KEY") or None


async def _serve_api(
    args: argparse.Namespace, config: Any, model_id: str, limits: Any, key: str | None
) -> int:
    import trio

    from lattice.apps.mesh_inference.api import ApiServer
    from lattice.apps.mesh_inference.client import MeshClient
    from lattice.plugins import build_node

    node = build_node(config)
    async with node:
        if config.bootstrap:
            await _reach_bootstrap(node, list(config.bootstrap), args.timeout)
        client = MeshClient(node, model_id)
        api = ApiServer(client, limits, key)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(api.serve, args.http)
            info = await node.id()
            info |= {"url": url, "model_id": model_id, "pid": os.getpid(),
                     "control": str(node.control_path) if node.control_path else None}  # fmt: skip
            print(f"lattice-node serving the OpenAI API for {model_id} at {url}", flush=True)
            if args.ready_file:
                write_atomic(args.ready_file, json.dumps(info))
            await node.serve_until_stopped()
            nursery.cancel_scope.cancel()
    remove_ready_file(args.ready_file)
    return 0


async def _reach_bootstrap(node: Any, addrs: list[str], timeout: float) -> None:
    """Connect to one of the --bootstrap peers, or raise MeshError naming why each failed (else the
    user would only learn, after --timeout, that no stage server announces the model)."""
    import trio

    from lattice.apps.mesh_inference.errors import MeshError
    from lattice.errors import LatticeError
    from lattice.observe.inert import inert

    errors = []
    for addr in addrs:
        try:
            await node.connect(addr, timeout=min(timeout, 10.0))
            return
        except (LatticeError, OSError, trio.TooSlowError) as exc:
            text = inert(exc) or "timed out"
            errors.append(text if addr in text else f"{addr}: {text}")
    raise MeshError(f"cannot reach the --bootstrap peer{'s' if len(addrs) > 1 else ''} ({'; '.join(errors)})")


APP = App(
    name="mesh_inference",
    description="serve a model split into stages across peers (serve-model, generate)",
    add_commands=register,
)
