"""Mesh inference: serve a model too big for one peer by splitting its blocks into stages.

Stage servers hold a contiguous range of blocks and announce it in the DHT; a client session finds
a chain of stages covering every block, streams hidden states through the tensor RPC, keeps KV
caches on the servers and replays its inputs to a replacement when a stage dies. Torch is needed
here (``pip install lattice[mesh]``) and only here.
"""
