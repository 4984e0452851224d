"""CDProxSGT's stability across topologies and (codec, gamma) settings, in the simulator: one JSON
line per run (16 peers, Dir(0.3), the MLP, K = 10, seed 0). What set the default gamma
(docs/gossip_sgd.md).

    python bench/cdproxsgt_grid.py 50 torus,random-regular,random,ring,exponential,full \\
        "codec_x=topk:0.1,codec_y=topk:0.1;gamma_x=0.3,gamma_y=0.3"

Arguments: rounds, topologies (comma-separated), settings (";" between runs, "," between --set items).
"""

import json
import sys
import time

import torch

from lattice.apps.gossip_sgd.experiment import Config, simulate
from lattice.apps.gossip_sgd.options import hyper_from


def main() -> None:
    torch.set_num_threads(1)
    rounds, topos, configs = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(";")
    for topo in topos:
        for c in configs:
            sets = [x for x in c.split(",") if x]
            cfg = Config(algorithm="cdproxsgt", peers=16, topology=topo, degree=4, rounds=rounds,
                         eval_every=0, hp=hyper_from(sets))  # fmt: skip
            t = time.time()
            r = simulate(cfg)[-1]
            print(json.dumps({"topology": topo, "set": sets, "acc_avg": round(r["acc_avg"], 4),
                              "acc_local": round(r["acc_local"], 4), "consensus": r["consensus"],
                              "seconds": round(time.time() - t)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
