"""Helpers for your own tests of Lattice applications, in the spirit of ``trio.testing``:

- :mod:`lattice.testing.daemons`: start real ``lattice-node`` daemons as processes (optionally
  inside a testbed namespace), wait until they are ready, stop them;
- :mod:`lattice.testing.netns`: a testbed of Linux network namespaces (root): hosts on a bridge
  "internet", home routers doing cone or symmetric NAT with nftables, link cuts.

Attack tools and the project's own test scenarios live under ``tests/``, not in the package.
"""
