"""Running a swarm: named swarm profiles, node roles, the local testnet and its CLI commands."""
