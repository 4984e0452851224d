"""Communication graphs and Metropolis-Hastings mixing weights.

A topology is a function of the round (static graphs ignore it) returning undirected neighbour
sets over ``n`` peers, indexed 0..n-1. On the network the index of a peer is its position in the
sorted membership, so every peer derives the same graph without talking to anyone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

KINDS = ("ring", "torus", "exponential", "random-regular", "random", "full")


def ring(n: int) -> list[set[int]]:
    return [{(i - 1) % n, (i + 1) % n} - {i} for i in range(n)]


def torus(n: int) -> list[set[int]]:
    """2-D torus on the most square r x c factorization of n (a ring if n is prime)."""
    r = math.isqrt(n)
    while n % r:
        r -= 1
    c = n // r
    out = []
    for i in range(n):
        a, b = divmod(i, c)
        nb = {((a - 1) % r) * c + b, ((a + 1) % r) * c + b, a * c + (b - 1) % c, a * c + (b + 1) % c}
        out.append(nb - {i})
    return out


def exponential(n: int) -> list[set[int]]:
    """i <-> i +- 2^k (made undirected)."""
    out: list[set[int]] = [set() for _ in range(n)]
    k = 1
    while k < n:
        for i in range(n):
            out[i].add((i + k) % n)
            out[(i + k) % n].add(i)
        k *= 2
    return [s - {i} for i, s in enumerate(out)]


def full(n: int) -> list[set[int]]:
    return [set(range(n)) - {i} for i in range(n)]


def random_regular(n: int, k: int, seed: int = 0) -> list[set[int]]:
    """A connected random k-regular graph (pairing model, resampled; n*k must be even)."""
    if k >= n - 1:
        return full(n)
    if (n * k) % 2:
        raise ValueError("random-regular needs n*k even")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        stubs = rng.permutation(np.repeat(np.arange(n), k)).reshape(-1, 2)
        if any(a == b for a, b in stubs):
            continue
        edges = {(min(a, b), max(a, b)) for a, b in stubs}
        if len(edges) != len(stubs):
            continue
        graph: list[set[int]] = [set() for _ in range(n)]
        for a, b in edges:
            graph[a].add(int(b))
            graph[b].add(int(a))
        if connected(graph):
            return graph
    raise RuntimeError("could not sample a connected k-regular graph")


def random_neighbours(n: int, k: int, round_: int, seed: int = 0) -> list[set[int]]:
    """Time-varying: each peer picks k random others this round (symmetrized, so MH stays valid)."""
    rng = np.random.default_rng([seed, round_])
    out: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        others = np.delete(np.arange(n), i)
        for j in rng.choice(others, min(k, n - 1), replace=False):
            out[i].add(int(j))
            out[int(j)].add(i)
    return out


def connected(graph: Sequence[set[int]]) -> bool:
    if not graph:
        return True
    seen, todo = {0}, [0]
    while todo:
        for j in graph[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == len(graph)


def build(kind: str, n: int, round_: int = 0, k: int = 4, seed: int = 0) -> list[set[int]]:
    """The graph of ``kind`` for ``n`` peers at ``round_`` (only "random" changes with the round)."""
    if n <= 1:
        return [set() for _ in range(n)]
    if kind == "ring":
        return ring(n)
    if kind == "torus":
        return torus(n)
    if kind == "exponential":
        return exponential(n)
    if kind == "full":
        return full(n)
    if kind == "random-regular":
        return random_regular(n, k, seed)
    if kind == "random":
        return random_neighbours(n, k, round_, seed)
    raise ValueError(f"unknown topology {kind!r} (known: {', '.join(KINDS)})")


def metropolis_hastings(graph: Sequence[set[int]]) -> np.ndarray:
    """w_ij = 1/(1+max(deg_i, deg_j)) on edges, w_ii = 1 - sum: symmetric, doubly stochastic."""
    n = len(graph)
    w = np.zeros((n, n))
    for i, nb in enumerate(graph):
        for j in nb:
            w[i, j] = 1.0 / (1 + max(len(graph[i]), len(graph[j])))
    w[np.arange(n), np.arange(n)] = 1.0 - w.sum(axis=1)
    return w


def spectral_lambda(w: np.ndarray) -> float:
    """max(|lambda_2|, |lambda_n|): the mixing rate (spectral gap = 1 - this)."""
    ev = np.sort(np.abs(np.linalg.eigvalsh((w + w.T) / 2)))[::-1]
    return float(ev[1]) if len(ev) > 1 else 0.0


def weights_of(graph: Sequence[set[int]], i: int) -> dict[int, float]:
    """Peer i's row of the MH matrix, {j: w_ij} including i itself, without building the matrix."""
    row = {j: 1.0 / (1 + max(len(graph[i]), len(graph[j]))) for j in graph[i]}
    row[i] = 1.0 - sum(row.values())
    return row
