"""Hostile HTTP clients of the OpenAI-compatible endpoint, a real `serve-api` process in front of
a real `serve-model` process: an honest client (another address) must still get its completion."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
import trio

torch = pytest.importorskip("torch")

from attacks.api_flood import held_streams, slow_heads  # noqa: E402
from lattice.apps.mesh_inference.model import Stage, generate_local, random_weights, tiny_config  # noqa: E402
from lattice.apps.mesh_inference.tokenizer import byte_tokenizer  # noqa: E402
from lattice.testing.daemons import start_daemon  # noqa: E402

MODEL = "tiny-random-0"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """(host, port) of a serve-api process (8 connections per address, 3 s to send a request)
    over one stage server holding the whole tiny model."""
    workdir = tmp_path_factory.mktemp("api-attack")
    os.environ["LATTICE_MESH_RUNTIME_DIR"] = str(workdir / "mesh-servers")
    common = ["--model", "tiny-random:0", "--listen", "/ip4/127.0.0.1/tcp/0"]
    stage = start_daemon(workdir, "stage", [*common, "--blocks", "0:6", "--announce-interval", "1",
                         "--threads", "1"], command="serve-model", timeout=60)  # fmt: skip
    daemons = [stage]
    try:
        api = start_daemon(workdir, "api", [*common, "--bootstrap", stage.info["addrs"][0], "--http",
                           "127.0.0.1:0", "--http-max-connections-per-ip", "8", "--http-request-timeout",
                           "3"], command="serve-api", timeout=60)  # fmt: skip
        daemons.append(api)
        host, port = api.info["url"].split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        for _ in range(100):  # the first request waits for the stage server's announcement
            try:
                honest_completion(host, int(port), 2)
                break
            except OSError:
                trio.run(trio.sleep, 0.2)
        yield host, int(port)
    finally:
        for d in reversed(daemons):
            d.stop()
        os.environ.pop("LATTICE_MESH_RUNTIME_DIR", None)


def honest_completion(host: str, port: int, n: int = 8) -> str:
    """A greedy completion from 127.0.0.1 (the attackers connect from 127.0.0.2)."""
    body = json.dumps({"model": MODEL, "prompt": "Hello mesh", "max_tokens": n, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=20) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def reference(n: int = 8) -> str:
    config, tok = tiny_config(), byte_tokenizer()
    stage = Stage(config, random_weights(config, seed=0), 0, config.n_layers)
    return tok.decode(generate_local([stage], tok.encode("Hello mesh").ids, n))


def attack_and_honest(attack, host: str, port: int, delay: float) -> tuple[dict, str, float]:
    """Run ``attack()``; ``delay`` s into it, an honest completion (in a thread) while it goes on."""

    async def main() -> tuple[dict, str, float]:
        out: dict = {}

        async def run_attack() -> None:
            out["attack"] = await attack()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_attack)
            await trio.sleep(delay)
            t0 = trio.current_time()
            text = await trio.to_thread.run_sync(honest_completion, host, port)
            seconds = trio.current_time() - t0
        return out["attack"], text, seconds

    return trio.run(main)


def test_slow_request_heads_from_one_address_do_not_lock_out_others(endpoint):
    host, port = endpoint
    attack, text, seconds = attack_and_honest(
        lambda: slow_heads(host, port, connections=80, seconds=5.0), host, port, delay=1.5
    )
    assert text == reference() and seconds < 10
    assert attack["max_open"] <= 8  # --http-max-connections-per-ip
    assert attack["refused"] > 0 and attack["cut"] > 0  # the rest refused, slow heads cut after 3 s


def test_unread_streams_of_one_client_leave_sessions_for_others(endpoint):
    host, port = endpoint
    attack, text, _ = attack_and_honest(
        lambda: held_streams(host, port, MODEL, count=6, seconds=4.0), host, port, delay=1.0
    )
    assert text == reference()
    assert attack["accepted"] == 2 and attack["refused_429"] == 4  # --max-generations-per-client 2
