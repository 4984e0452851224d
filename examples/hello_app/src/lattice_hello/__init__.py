"""An example lattice-node app, built only on Lattice's public API (see docs/plugins.md)."""
