"""Gossip SGD as a library: GossipOptimizer on the user's own nn.Module and loop, with blocking nodes
(Node.start) on 127.0.0.1; optimizer features; checkpoints."""

from __future__ import annotations

import math
import threading

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from lattice import Node, NodeConfig  # noqa: E402
from lattice.apps.gossip_sgd import GossipOptimizer, load_checkpoint, shard  # noqa: E402
from lattice.apps.gossip_sgd.algorithms import make  # noqa: E402
from lattice.apps.gossip_sgd.hyper import Hyper, lr_factor  # noqa: E402
from lattice.apps.gossip_sgd.simulator import Simulator, drive  # noqa: E402
from lattice.errors import ConfigError  # noqa: E402


def _node(tmp_path, name, boot=()):
    cfg = NodeConfig(
        listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False, bootstrap=list(boot)
    )
    return Node.start(cfg)


def _batch(rank: int, step: int) -> tuple:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _peers(tmp_path, n, body, **kw):
    """n peers in threads, each with its own blocking node and optimizer; body(rank, model, opt)."""
    nodes = [_node(tmp_path, "n0")]
    nodes += [_node(tmp_path, f"n{i}", [nodes[0].addrs[0]]) for i in range(1, n)]
    results, errors = [None] * n, []
    models = [_model() for _ in range(n)]  # here: torch's global RNG is not for threads

    def peer(i):
        try:
            model = models[i]
            opt = GossipOptimizer(model.parameters(), nodes[i], run="lib", peers=n, wait=20, timeout=5, **kw)
            results[i] = body(model, opt)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for node in nodes:
        node.close()
    if errors:
        raise errors[0]
    return results


def test_the_user_loop_mixes_as_the_algorithm_says(tmp_path):
    """Two peers, DFedAvg with 2 local steps: after each round both hold the average of their local
    SGD results, computed here by hand on the same batches (ranks come from the membership)."""
    lr, steps, rounds = 0.1, 2, 2

    def body(model, opt):
        for k in range(steps * rounds):
            xb, yb = _batch(opt.rank, k)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        params = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt.close(linger=5)
        return opt.rank, params

    results = _peers(tmp_path, 2, body, algorithm="dfedavg", lr=lr, local_steps=steps)
    expected = torch.nn.utils.parameters_to_vector(_model().parameters()).detach()
    for r in range(rounds):
        ends = []
        for rank in (0, 1):
            m = _model()
            torch.nn.utils.vector_to_parameters(expected.clone(), m.parameters())
            sgd = torch.optim.SGD(m.parameters(), lr=lr)
            for k in range(r * steps, (r + 1) * steps):
                xb, yb = _batch(rank, k)
                sgd.zero_grad()
                nn.functional.cross_entropy(m(xb), yb).backward()
                sgd.step()
            ends.append(torch.nn.utils.parameters_to_vector(m.parameters()).detach())
        expected = (ends[0] + ends[1]) / 2  # a ring of 2: MH weights 1/2
    assert sorted(rank for rank, _ in results) == [0, 1]
    for _, params in results:
        torch.testing.assert_close(params, expected, rtol=1e-5, atol=1e-6)


def test_a_sam_step_needs_a_closure_and_equals_a_hand_written_sam_step(tmp_path):
    rho, lr = 0.05, 0.1
    node = _node(tmp_path, "solo")
    try:
        model = _model()
        opt = GossipOptimizer(model.parameters(), node, run="sam", algorithm="dfedsam", lr=lr, rho=rho,
                              local_steps=5, wait=1)  # fmt: skip
        xb, yb = _batch(0, 0)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        closure()
        with pytest.raises(ConfigError, match="step\\(closure\\)"):
            opt.step()
        closure()
        opt.step(closure)
        got = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    finally:
        node.close()
    ref = _model()
    x = torch.nn.utils.parameters_to_vector(ref.parameters()).detach()

    def grad_at(v):
        torch.nn.utils.vector_to_parameters(v, ref.parameters())
        ref.zero_grad()
        nn.functional.cross_entropy(ref(xb), yb).backward()
        return torch.cat([p.grad.reshape(-1) for p in ref.parameters()])

    g = grad_at(x.clone())
    g2 = grad_at(x + rho * g / g.norm())
    torch.testing.assert_close(got, x - lr * g2, rtol=1e-5, atol=1e-6)


def _alone(hp: Hyper, grads: list, x0):
    """One peer (no neighbours) of dfedavg: plain local SGD with the algorithm's update rules."""
    algo = make("dfedavg", hp, x0, 1, rounds=len(grads) // hp.local_steps)
    it = iter(grads)
    sim = Simulator(1)
    for t in range(len(grads) // hp.local_steps):
        drive(
            algo.round(t),
            lambda s, t=t: sim.exchange(t, s),
            lambda req: (torch.zeros(1), next(it)(req.params)),
        )
    return algo.x[0]


def test_momentum_weight_decay_and_clipping_match_torch_sgd():
    torch.manual_seed(0)
    target = torch.randn(6)
    grads = [lambda p, k=k: (p - target * (1 + k % 3)) * 3 for k in range(12)]  # a quadratic's gradients
    x0 = torch.zeros(6)
    hp = Hyper(lr=0.05, local_steps=4, momentum=0.9, weight_decay=0.01, clip=2.0)
    got = _alone(hp, grads, x0)
    p = torch.zeros(6, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=0.05, momentum=0.9, weight_decay=0.01)
    for k in range(12):
        sgd.zero_grad()
        p.grad = grads[k](p.detach()[None])[0].clone()
        torch.nn.utils.clip_grad_norm_([p], 2.0)
        sgd.step()
    torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6)


def test_learning_rate_schedules():
    assert lr_factor("constant", 7, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("step:3:0.1", 7, 0) == pytest.approx(0.01)
    assert lr_factor("warmup:4+cosine", 1, 100) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 100)))
    assert lr_factor("linear", 10, 10) == 0.0
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_factor("exp", 0, 1)


def test_a_checkpoint_round_trips_and_refuses_other_settings(tmp_path):
    node = _node(tmp_path, "ck")
    try:
        model = _model()
        path = tmp_path / "ck.safetensors"
        opt = GossipOptimizer(model.parameters(), node, run="ck", algorithm="dsgt", momentum=0.9,
                              local_steps=2, checkpoint=path, checkpoint_every=1, wait=1)  # fmt: skip
        for k in range(4):  # two rounds: a checkpoint after each
            xb, yb = _batch(0, k)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        state, round_, meta = load_checkpoint(path)
        assert round_ == 2 and meta["algorithm"] == "dsgt" and meta["run"] == "ck"
        assert set(state) == {"x", "m", "y", "g_prev"} and state["x"].shape == (1, 39)
        assert b"pickle" not in path.read_bytes()[:200] and path.read_bytes()[8:9] == b"{"  # safetensors
        settings = opt.run.settings
        load_checkpoint(path, settings)
        with pytest.raises(ConfigError, match=r"other settings .*algorithm: 'dfedavg' here, 'dsgt' in it"):
            load_checkpoint(path, {**settings, "algorithm": "dfedavg"})
    finally:
        node.close()


def test_shards_partition_a_dataset():
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.arange(100), torch.arange(100) % 10)
    ds.targets = torch.arange(100) % 10
    for split in ("iid", "dirichlet", "label-skew"):
        parts = [shard(ds, r, 4, split=split, seed=3) for r in range(4)]
        seen = sorted(i for p in parts for i in p.indices)
        assert len(seen) == len(set(seen)), split  # disjoint
        assert seen == list(range(100)) or split == "label-skew", split  # 4 x 2 classes miss 2 of 10
    assert {int(ds[i][1]) for i in shard(ds, 1, 5, split="label-skew").indices} == {1, 6}
