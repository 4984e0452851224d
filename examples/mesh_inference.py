"""Mesh inference in one script: three stage servers and a client, each its own node on 127.0.0.1.

python examples/mesh_inference.py            # tiny random model (instant)

Each server holds two blocks of a 6-block LLaMA and announces them in the DHT; the client finds the
chain, generates greedily with KV caches on the servers, and checks the result against the model
run in one piece. With real processes: `lattice-node serve-model --model smollm2 --blocks 0:10 ...`
and `lattice-node generate "The capital of France is" --bootstrap ...` (docs/mesh-inference.md).
"""

import tempfile
from pathlib import Path

import trio

from lattice import Node, NodeConfig
from lattice.apps.mesh_inference import MeshClient, Stage, StageServer, greedy_generate, open_model


async def main() -> None:
    source = open_model("tiny-random:0")
    tmp = Path(tempfile.mkdtemp(prefix="lattice-mesh-example-"))
    async with trio.open_nursery() as nursery:
        boot: list[str] = []
        for i, (a, b) in enumerate([(0, 2), (2, 4), (4, 6)]):
            stage = Stage(source.config, source.load(a, b), a, b)
            node = Node(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp / f"s{i}", control=False,
                                   bootstrap=boot[:1]))  # fmt: skip
            node.add_service(StageServer(stage, source.model_id, announce_interval=2.0))
            await nursery.start(_serve, node)
            boot = boot or node.addrs
        cfg = NodeConfig(
            listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp / "client", control=False, bootstrap=boot
        )
        async with Node(cfg) as node:
            client = MeshClient(node, source.model_id)
            chain = await client.wait_for_chain(timeout=10)
            print("chain:", [(h.server.peer[-6:], h.start, h.end) for h in chain])
            prompt = [1, 2, 3]
            async with client.session() as session:
                tokens = [t async for t in session.generate(prompt, 12)]
            print("mesh:  ", tokens)
            whole = Stage(source.config, source.load(0, 6), 0, 6)
            print("single:", greedy_generate([whole], prompt, 12))
        nursery.cancel_scope.cancel()


async def _serve(node: Node, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with node:
        await node.services["mesh"].ready.wait()
        task_status.started()
        await trio.sleep_forever()


trio.run(main)
