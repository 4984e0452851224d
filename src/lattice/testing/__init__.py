"""Test helpers for Lattice: a NAT testbed of Linux network namespaces (:mod:`lattice.testing.netns`)."""
