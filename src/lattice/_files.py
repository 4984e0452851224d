"""Local files other users of the machine must not be able to swap or plant.

The daemon keeps its identity key, control socket and inbox in directories; whoever can write such a
directory can replace the socket (and read what the operator's commands send) or plant a key. So a
directory the daemon uses must be ours (or root's) and writable by nobody else, and files it creates
in shared places are opened with O_EXCL|O_NOFOLLOW under random names, never through a symlink.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from lattice.errors import ConfigError

__all__ = ["dir_problem", "exclusive_temp", "private_dir"]


def dir_problem(mode: int, owner: int, me: int) -> str | None:
    """Why a directory with this ``st_mode`` and owner uid is unsafe for user ``me`` (None: it is safe)."""
    if not stat.S_ISDIR(mode):
        return "is not a directory"
    if owner not in (me, 0):
        return f"is owned by uid {owner}, not by you (uid {me})"
    if mode & 0o022:
        return f"is writable by group/others (mode {stat.S_IMODE(mode):o})"
    return None


def private_dir(path: Path, what: str) -> Path:
    """Create ``path`` with mode 0700 if missing; refuse (ConfigError, one line) an existing one that
    another local user could write."""
    path = Path(path)
    try:
        path.mkdir(parents=True, mode=0o700)
        return path
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    try:
        st = path.stat()  # a symlinked directory: the directory it names must be private
    except OSError as exc:
        raise ConfigError(f"cannot use {what} {path}: {exc.strerror}") from None
    problem = dir_problem(st.st_mode, st.st_uid, os.geteuid())
    if problem is not None:
        shared = st.st_mode & stat.S_ISVTX or st.st_uid != os.geteuid()  # /tmp, or someone else's
        hint = "use a directory of your own" if shared else f"run: chmod go-w {path}"
        raise ConfigError(f"{what} {path} {problem}; refusing to use it ({hint})")
    return path


def exclusive_temp(directory: str | os.PathLike[str], name: str, suffix: str) -> tuple[int, Path]:
    """A new file next to its final name ``name``: a random name, created with O_EXCL|O_NOFOLLOW and
    mode 0600 (tempfile.mkstemp), so a file or symlink planted there in advance is never written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=directory)
    return fd, Path(tmp)
