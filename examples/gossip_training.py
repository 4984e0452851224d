"""Decentralized training of your own PyTorch model from a plain script: a GossipOptimizer on a
blocking node (Node.start), your nn.Module, your Dataset sharded by the peer's rank, your loop.

    python examples/gossip_training.py --peers 2            # this peer + 1 more started here
    python examples/gossip_training.py --peers 4 --spawn 0 --listen /ip4/0.0.0.0/tcp/4001
    python examples/gossip_training.py --peers 4 --bootstrap /ip4/192.168.1.7/tcp/4001/p2p/12D3KooW...

Every peer runs this same script (same --run, --peers, --algorithm, ...); the first prints the address
the others --bootstrap to. Needs torch and the Fashion-MNIST files (docs/gossip_sgd.md, "Data").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lattice import Node, NodeConfig
from lattice.apps.gossip_sgd import GossipOptimizer, shard
from lattice.apps.gossip_sgd.data import load_fashion_mnist


class SmallCNN(nn.Module):
    """Any nn.Module works: GossipOptimizer only sees its parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 5), nn.Conv2d(16, 32, 5)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x.view(-1, 1, 28, 28))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="example")
    ap.add_argument("--peers", type=int, default=2, help="peers of the run (every peer gives the same)")
    ap.add_argument(
        "--spawn", type=int, default=None, help="start this many more peers here (default peers-1)"
    )
    ap.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR")
    ap.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    ap.add_argument("--algorithm", default="dsgt")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps (every peer the same)")
    ap.add_argument("--train-limit", type=int, default=0, help="use the first N training samples only")
    ap.add_argument("--data", default=None, help="Fashion-MNIST directory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # every peer starts from the same model

    raw = load_fashion_mnist(args.data)
    n = args.train_limit or len(raw.train_y)
    train = TensorDataset(torch.from_numpy(raw.train_x[:n]), torch.from_numpy(raw.train_y[:n]))
    train.targets = train.tensors[1]  # what shard() reads for a non-iid split
    test = TensorDataset(torch.from_numpy(raw.test_x[:2000]), torch.from_numpy(raw.test_y[:2000]))

    home = Path(tempfile.mkdtemp(prefix="lattice-gossip-example-"))
    node = Node.start(
        NodeConfig(listen=[args.listen], bootstrap=args.bootstrap, data_dir=home, control=False)
    )
    others = []
    if not args.bootstrap:
        print(f"peer {node.peer_id} listening on {node.addrs[0]}", flush=True)
        spawn = args.peers - 1 if args.spawn is None else args.spawn
        flags = ["--run", args.run, "--peers", str(args.peers), "--algorithm", args.algorithm,
                 "--steps", str(args.steps), "--train-limit", str(args.train_limit),
                 "--bootstrap", node.addrs[0]]  # fmt: skip
        if args.data:
            flags += ["--data", args.data]
        others = [subprocess.Popen([sys.executable, __file__, *flags]) for _ in range(spawn)]
    try:
        model = SmallCNN()
        opt = GossipOptimizer(
            model.parameters(), node, run=args.run, peers=args.peers, algorithm=args.algorithm,
            lr=0.05, momentum=0.5, local_steps=10, rounds=args.steps // 10, lr_schedule="cosine",
            settings={"model": "SmallCNN", "data": "fashion-mnist", "train_limit": n},
        )  # fmt: skip
        mine = shard(train, opt.rank, opt.world, split="dirichlet", alpha=0.3)
        batches = DataLoader(mine, batch_size=32, shuffle=True, drop_last=True)
        step = 0
        while step < args.steps:
            for xb, yb in batches:
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                step += 1
                if step % 50 == 0:
                    print(f"rank {opt.rank} step {step} loss {loss.item():.3f} lr {opt.lr:.4f}", flush=True)
                if step == args.steps:
                    break
        print(
            f"rank {opt.rank}: {len(mine)} samples, own model accuracy {accuracy(model, test):.3f}",
            flush=True,
        )

        def evaluate(models: torch.Tensor) -> dict:  # every peer's final parameters, [m, d]
            opt.average_parameters(models)
            return {"accuracy": accuracy(model, test)}

        average = opt.close(evaluate)
        if average:
            print(f"rank {opt.rank}: average model of {average['peers']} peers: accuracy "
                  f"{average['accuracy']:.3f}", flush=True)  # fmt: skip
    finally:
        node.close()
        for p in others:
            p.wait(timeout=300)
    sys.exit(max([p.returncode for p in others], default=0))


if __name__ == "__main__":
    main()
