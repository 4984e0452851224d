"""The web page the daemon serves at ``/`` (filled in by the dashboard step)."""

HTML = "<!doctype html><title>lattice-node</title><p>lattice-node</p>"
