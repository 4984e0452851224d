"""How many torch threads a stage server takes: the machine's cores shared among the servers on it.

Torch's default (one thread per core) in every server process means two servers on one machine run
twice as many busy threads as cores, and their OpenMP barriers spin against each other: two
concurrent sessions took 37-46 s for 96 tokens instead of 7-11 s with one thread per server. Each
server registers itself in a per-user directory (a file named by its pid); the live files are the
servers on this machine, and each one re-reads them every few seconds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lattice.cpus import usable_cpus

ENV_DIR = "LATTICE_MESH_RUNTIME_DIR"  # where the servers of this machine register (tests isolate it)


cores = usable_cpus  # the cores this process may run on (CPU affinity, e.g. a container's)


def threads_for(cores: int, servers: int) -> int:
    """Torch threads of one server when ``servers`` share ``cores``: an equal share, at least one."""
    return max(1, cores // max(1, servers))


def default_dir() -> Path:
    """``$LATTICE_MESH_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/lattice/mesh-servers``, else a per-user
    directory in the temporary directory."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "lattice" / "mesh-servers"
    return Path(tempfile.gettempdir()) / f"lattice-{os.getuid()}" / "mesh-servers"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with a recycled pid: count it, harmless
        return True
    return True


class MachineServers:
    """This machine's stage servers (of this user), as pid files in one directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_dir()
        self.pid = os.getpid()

    def register(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.directory / str(self.pid)).touch()

    def unregister(self) -> None:
        (self.directory / str(self.pid)).unlink(missing_ok=True)

    def count(self) -> int:
        """Live registered servers (at least this one); files of dead processes are removed."""
        live = {self.pid}
        try:
            names = os.listdir(self.directory)
        except OSError:
            return 1
        for name in names:
            if not name.isdigit():
                continue
            if _alive(int(name)):
                live.add(int(name))
            else:
                (self.directory / name).unlink(missing_ok=True)
        return len(live)

    def threads(self) -> int:
        return threads_for(cores(), self.count())
