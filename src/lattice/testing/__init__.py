"""Helpers for your own tests of Lattice applications, in the spirit of ``trio.testing``:

- :mod:`lattice.testing.daemons`: start real ``lattice-node`` daemons as processes (optionally
  inside a testbed namespace), wait until they are ready, stop them;
- :mod:`lattice.testing.netns`: a testbed of Linux network namespaces (root): hosts on a bridge
  "internet", home routers doing cone or symmetric NAT with nftables, link cuts;
- :mod:`lattice.testing.wan`: the same namespaces behind shaped access links (RTT, jitter, loss,
  up/down rate) with presets from ``lan`` to ``intercontinental`` and a heterogeneous ``mixed``.

Attack tools and the project's own test scenarios live under ``tests/``, not in the package.
"""
