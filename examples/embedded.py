"""Embed a node in an ordinary (blocking) script: two nodes in one process talk to each other.

python examples/embedded.py
"""

from lattice import Node, NodeConfig

a = Node.start(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir="/tmp/lattice-example-a", control=False))
b = Node.start(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir="/tmp/lattice-example-b", control=False))
try:
    peer = b.connect(a.addrs[0])
    print("b connected to", peer)
    print("ping (ms):", [round(r * 1000, 3) for r in b.ping(peer, count=3)])
    print("b's peers:", [p["peer_id"] for p in b.peers()])
finally:
    a.close()
    b.close()
