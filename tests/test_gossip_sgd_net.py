"""Gossip SGD over the real network: peer processes with embedded nodes on 127.0.0.1."""

from __future__ import annotations

import signal
import time

import pytest

pytest.importorskip("torch")

from lattice.apps.gossip_sgd.launch import read_log, start_peers

ARGS = [
    "--train-limit",
    "6000",
    "--test-limit",
    "1000",
    "--eval-every",
    "1",
    "--wait",
    "40",
    "--timeout",
    "4",
    "--set",
    "local_steps=3",
    "--linger",
    "5",
]


def _rounds(path):
    return [r for r in read_log(path) if r.get("event") == "round"]


def _cfg(tmp_path, name):
    from lattice import NodeConfig

    return NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False)


async def test_exchange_mixes_dedups_and_renormalizes_over_the_rpc(tmp_path):
    """Three embedded nodes: one phase mixes exactly; a replay is refused; a dead peer is dropped."""
    import torch
    import trio

    from lattice import Node
    from lattice.apps.gossip_sgd.algorithms import Send
    from lattice.apps.gossip_sgd.network import GRACE, METHOD, Gossip

    stop_third = trio.Event()
    third_gone = trio.Event()

    async def third(task_status=trio.TASK_STATUS_IGNORED):
        async with Node(_cfg(tmp_path, "c")) as c:
            task_status.started(c)
            await stop_third.wait()
        third_gone.set()

    async with trio.open_nursery() as outer, Node(_cfg(tmp_path, "a")) as a, Node(_cfg(tmp_path, "b")) as b:
        nodes = [a, b, await outer.start(third)]
        for x in nodes:
            for y in nodes:
                if x is not y:
                    await x.connect(y.addrs[0])
        gossips = [Gossip(node, "t", timeout=3.0) for node in nodes]
        for g in gossips:
            g.join(0)
        with trio.fail_after(15):
            while not all(len(g.members()) == 3 for g in gossips):
                await trio.sleep(0.02)
        values = [torch.full((1, 5), float(i)) for i in range(3)]
        results = [None] * 3

        async def one(i, round_):
            results[i] = await gossips[i].exchange(round_, Send("p", {"x": values[i]}))

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i, 0)
        for r in results:  # a ring of 3 is the full graph: MH weights 1/3
            torch.testing.assert_close(r.mix("x"), torch.full((1, 5), 1.0))
        # with a codec, our own row as the neighbours decode it is there when asked (decoded then)
        third = torch.tensor([[1 / 3] * 5])
        fp16 = [None] * 3

        async def coded(i):
            fp16[i] = await gossips[i].exchange(0, Send("h", {"h": third + i}, codecs={"h": "fp16"}))

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(coded, i)
        for i, r in enumerate(fp16):
            assert "h" not in r.decoded_own  # not decoded before sending: nothing asked for it
            torch.testing.assert_close(r.sent("h"), (third + i).half().float())
            torch.testing.assert_close(r.own["h"], third + i)  # mixed exact (self_exact)
        # a replay of a delivered message is never applied twice; an old round is refused
        payload = {"run": "t", "round": 0, "phase": "p", "tensors": {"x": values[1][0].numpy()}}
        assert await b.rpc.call(a.peer_id, METHOD, payload, timeout=5) == "duplicate"
        gossips[0].round = 1
        payload["phase"] = "other"
        assert await b.rpc.call(a.peer_id, METHOD, payload, timeout=5) == "late"
        # the third node goes away: the others finish the next phase (bounded by the 3 s timeout)
        stop_third.set()
        await third_gone.wait()
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(one, i, 1)
        assert trio.current_time() - started < 3.0 + 2.0
        for i, r in enumerate(results[:2]):
            assert set(r.weights) == {str(nodes[1 - i].peer_id)}
            assert r.self_weight == pytest.approx(2 / 3)  # the dead peer's weight stays home
            torch.testing.assert_close(r.mix("x"), torch.full((1, 5), (2 * i + (1 - i)) / 3))
            assert str(nodes[2].peer_id) in gossips[i].dead()
        # the dead peer stays in the graph (not waited for) until GRACE rounds after it was seen gone,
        # the same round at every survivor (trackers restart there)
        assert str(nodes[2].peer_id) in gossips[0].neighbours(1)[0]
        assert gossips[0].neighbours(1 + GRACE) == ({str(b.peer_id): 0.5}, 0.5)


async def _three_nodes(tmp_path, nursery, stop_third, third_gone):
    from lattice import Node

    async def third(task_status):
        async with Node(_cfg(tmp_path, "c")) as c:
            task_status.started(c)
            await stop_third.wait()
        third_gone.set()

    return await nursery.start(third)


async def test_references_are_rebuilt_from_exact_copies_when_the_graph_changes(tmp_path):
    """CDProxSGT's mixed references over the RPC: a receiver without a copy of a neighbour's reference
    asks for the full one, then adds differences; when a peer dies, the survivors' mixed references
    are W_new x_hat over the survivors (not a running sum kept with the old weights)."""
    import torch
    import trio

    from lattice import Node
    from lattice.apps.gossip_sgd.algorithms import Send
    from lattice.apps.gossip_sgd.network import GRACE, Gossip

    stop_third, third_gone = trio.Event(), trio.Event()
    async with trio.open_nursery() as outer, Node(_cfg(tmp_path, "a")) as a, Node(_cfg(tmp_path, "b")) as b:
        nodes = [a, b, await _three_nodes(tmp_path, outer, stop_third, third_gone)]
        for x in nodes:
            for y in nodes:
                if x is not y:
                    await x.connect(y.addrs[0])
        gossips = [Gossip(node, "r", timeout=3.0) for node in nodes]
        for g in gossips:
            g.join(0)
        with trio.fail_after(15):
            while not all(len(g.members()) == 3 for g in gossips):
                await trio.sleep(0.02)
        gen = torch.Generator().manual_seed(0)
        refs = [torch.zeros(1, 6) for _ in range(3)]  # each peer's reference x_hat_i
        mixed: list = [None] * 3

        async def phase(i, round_, k):
            diff = torch.randn(1, 6, generator=gen)
            send = Send(f"x{k}", {"dx": diff}, {"dx": None}, self_exact=False, refs={"dx": refs[i]})
            r = await gossips[i].exchange(round_, send)
            mixed[i] = r.mix_ref("dx")
            refs[i] = refs[i] + r.sent("dx")

        async def all_phase(who, round_, k):
            async with trio.open_nursery() as nursery:
                for i in who:
                    nursery.start_soon(phase, i, round_, k)

        await all_phase(range(3), 0, 0)  # nobody holds a copy yet: each mixes its own reference only
        for i in range(3):
            torch.testing.assert_close(mixed[i], refs[i])
        for k in (1, 2):  # full references arrive once, then differences: exact W x_hat (1/3 each)
            await all_phase(range(3), 0, k)
        for i in range(3):
            torch.testing.assert_close(mixed[i], sum(refs) / 3)
        sent = [g.stats.full_refs_sent for g in gossips]
        assert all(2 <= n <= 4 for n in sent)  # one per neighbour (+1 if a request crossed the full one)
        stop_third.set()
        await third_gone.wait()
        await all_phase(range(2), 1, 0)  # c is gone: its copy dropped, its weight stays home
        for i in range(2):
            torch.testing.assert_close(mixed[i], refs[i] * 2 / 3 + refs[1 - i] / 3)
        await all_phase(range(2), 1 + GRACE, 0)  # the graph without c: MH weights 1/2
        for i in range(2):
            torch.testing.assert_close(mixed[i], (refs[0] + refs[1]) / 2)
        assert [g.stats.full_refs_sent for g in gossips[:2]] == sent[:2]  # copies of each other still exact


@pytest.mark.usefixtures("fashion_mnist")
def test_a_peer_with_other_settings_is_refused_and_the_average_model_is_evaluated(tmp_path):
    """Peers print their address; a peer started with another --algorithm exits 2 with one line
    naming the setting, instead of training alone; the others train together, and the first of them
    evaluates the network's average model (content store) as the simulator's acc_avg/consensus."""
    # int8 messages: the 2 peers' models differ after mixing (plain ones would be equal: consensus 0)
    common = [
        "--algorithm",
        "dfedavg",
        "--rounds",
        "2",
        *ARGS,
        "--set",
        "local_steps=2",
        "--set",
        "codec=int8",
    ]
    procs = start_peers(3, "t-cfg", tmp_path, common, extra={2: ["--algorithm", "dsgt"]})
    try:
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = [(tmp_path / f"peer{i}" / "stderr").read_text() for i in range(3)]
    assert procs[2].returncode == 2, err[2][-3000:]
    last = err[2].strip().splitlines()
    assert len(last) == 3 and last[-1].startswith("error: run 't-cfg': 2 of 3 members use other settings")
    assert "algorithm: 'dsgt' here, 'dfedavg' in the run" in last[-1]
    averages = []
    for i in range(2):
        assert procs[i].returncode == 0, err[i][-3000:]
        assert "gossip-sgd peer 12D3KooW" in err[i] and "listening: /ip4/127.0.0.1/tcp/" in err[i]
        log = read_log(tmp_path / f"peer{i}" / "log.jsonl")
        rounds = [r for r in log if r.get("event") == "round"]
        assert rounds[-1]["live"] == 2 and "acc_avg" not in rounds[-1] and "consensus" not in rounds[-1]
        averages += [r for r in log if r.get("event") == "average"]
    assert len(averages) == 2 and averages[0] == {**averages[1], "t": averages[0]["t"]}  # the first computes
    avg = averages[0]
    assert avg["peers"] == 2 and avg["acc_avg"] > 0.3 and avg["consensus"] > 0


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dsgt", "cdproxsgt"])
def test_peers_learn_and_the_rest_finish_when_one_is_killed(tmp_path, algorithm):
    """Trackers restart and CDProxSGT's references are rebuilt when the dead peer leaves the graph."""
    n, rounds, victim = 4, 8, 3
    procs = start_peers(n, "t-net", tmp_path, ["--algorithm", algorithm, "--rounds", str(rounds), *ARGS])
    try:
        deadline = time.monotonic() + 90
        while not any(r["round"] >= 2 for r in _rounds(tmp_path / f"peer{victim}" / "log.jsonl")):
            assert time.monotonic() < deadline, (tmp_path / f"peer{victim}" / "stderr").read_text()[-3000:]
            assert procs[victim].poll() is None, (tmp_path / f"peer{victim}" / "stderr").read_text()[-3000:]
            time.sleep(0.05)
        procs[victim].send_signal(signal.SIGKILL)
        for p in procs[:victim]:
            p.wait(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i in range(victim):
        log = read_log(tmp_path / f"peer{i}" / "log.jsonl")
        assert procs[i].returncode == 0, (tmp_path / f"peer{i}" / "stderr").read_text()[-3000:]
        done = next(r for r in log if r.get("event") == "done")
        rounds_ = _rounds(tmp_path / f"peer{i}" / "log.jsonl")
        assert rounds_[-1]["round"] == rounds
        assert rounds_[-1]["acc_local"] > 0.4 > 0.1  # above chance, after a few rounds on a slice
        assert rounds_[-1]["acc_local"] > rounds_[0]["acc_local"]
        assert rounds_[-1]["live"] == n - 1  # the dead peer left the graph
        assert done["duplicates"] == 0 and done["bytes_sent"] > 0
        if algorithm == "dsgt":  # the survivors restarted tracking at the same round
            (left,) = [r for r in log if r.get("event") == "membership"]
            assert left["left"] == [done["dead"][0]]


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.slow
def test_a_late_peer_joins_a_run_in_progress(tmp_path):
    import subprocess
    import sys

    n, rounds = 3, 12
    common = ["--algorithm", "dfedavg", "--rounds", str(rounds), *ARGS]
    procs = start_peers(n, "t-late", tmp_path, common)
    try:
        # started now, but --late waits until the run is under way, then takes part 2 rounds later
        late_dir = tmp_path / "late"
        late_dir.mkdir()
        addr = (tmp_path / "bootstrap.addr").read_text().strip()
        late = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lattice.apps.gossip_sgd",
                "peer",
                "--run",
                "t-late",
                "--peers",
                str(n),
                "--out",
                str(late_dir),
                "--bootstrap",
                addr,
                "--late",
                *common,
            ],
            stdout=open(late_dir / "stdout", "w"),  # noqa: SIM115
            stderr=open(late_dir / "stderr", "w"),  # noqa: SIM115
        )
        procs.append(late)
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), (tmp_path / "late" / "stderr").read_text()[-3000:]
    mine = _rounds(tmp_path / "late" / "log.jsonl")
    assert mine and mine[0]["round"] > 1 and mine[-1]["round"] == rounds  # joined mid-run, finished
    (joined,) = [r for r in read_log(tmp_path / "late" / "log.jsonl") if r.get("event") == "joined"]
    assert joined["round"] == mine[0]["round"] - 1  # the round it started at
    # its model: a neighbour's of a round under way, not the initial one
    assert joined["from"] == "neighbour" and joined["model_round"] >= 1
    assert mine[-1]["acc_local"] > 0.3
    assert _rounds(tmp_path / "peer0" / "log.jsonl")[-1]["live"] == n + 1  # the others took it in


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.slow
def test_a_killed_peer_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL a peer after its checkpoint at round 4; restarted with --resume it loads the
    checkpoint (safetensors), joins the run again from a later round and finishes with the others."""
    import subprocess
    import sys

    n, rounds, victim = 3, 80, 2  # the others still train (~0.35 s a round) when the victim is back
    common = ["--algorithm", "dfedavg", "--rounds", str(rounds), "--checkpoint-every", "2", *ARGS,
              "--eval-every", "5", "--set", "local_steps=10"]  # fmt: skip
    procs = start_peers(n, "t-resume", tmp_path, common)
    out = tmp_path / f"peer{victim}"
    try:
        deadline = time.monotonic() + 90
        while not any(
            r.get("event") == "checkpoint" and r["round"] >= 4 for r in read_log(out / "log.jsonl")
        ):
            assert time.monotonic() < deadline and procs[victim].poll() is None, (out / "stderr").read_text()[
                -3000:
            ]
            time.sleep(0.05)
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        addr = (tmp_path / "bootstrap.addr").read_text().strip()
        cmd = [sys.executable, "-m", "lattice.apps.gossip_sgd", "peer", "--run", "t-resume",
               "--peers", str(n), *common, "--out", str(out), "--bootstrap", addr, "--resume"]  # fmt: skip
        with open(out / "stderr2", "w") as err:
            procs[victim] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), (out / "stderr2").read_text()[-3000:]
    log = read_log(out / "log.jsonl")
    (joined,) = [r for r in log if r.get("event") == "joined"]
    assert joined["from"] == "checkpoint"
    starts = [r for r in log if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["first"] > 4  # back from a later round
    assert _rounds(out / "log.jsonl")[-1]["round"] == rounds
    assert _rounds(tmp_path / "peer0" / "log.jsonl")[-1]["live"] == n  # the others took it back in
    assert _rounds(out / "log.jsonl")[-1]["live"] == n


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.slow  # 25-37 s at load 7-13: data loading under load takes most of it
def test_a_time_budget_stops_every_peer_after_the_same_round(tmp_path):
    """3 peers, a 4 s budget and rounds enough for minutes: all stop after one agreed round, past the
    budget on the run's clock, and the run still ends with its average model."""
    budget = 4.0
    args = ["--algorithm", "dfedavg", "--rounds", "100000", "--time-budget", str(budget), "--train-limit",
            "3000", "--test-limit", "300", "--eval-every", "1", "--wait", "40", "--timeout", "10",
            "--set", "local_steps=2", "--linger", "10"]  # fmt: skip
    procs = start_peers(3, "t-budget", tmp_path, args)
    try:
        for p in procs:
            p.wait(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    lasts, averages = set(), []
    for i in range(3):
        err = (tmp_path / f"peer{i}" / "stderr").read_text()
        assert procs[i].returncode == 0, err[-3000:]
        log = read_log(tmp_path / f"peer{i}" / "log.jsonl")
        rounds = [r for r in log if r.get("event") == "round"]
        times = [r["t_s"] for r in rounds]
        assert times == sorted(times) and times[-1] > budget and times[-1] < budget + 60
        assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))  # none skipped
        assert rounds[-1]["timeouts"] == 0  # nobody waited for a neighbour that had stopped
        lasts.add(rounds[-1]["round"])
        averages += [r for r in log if r.get("event") == "average"]
    assert len(lasts) == 1 and 5 < lasts.pop() < 100000
    assert len(averages) == 3 and averages[0]["peers"] == 3
