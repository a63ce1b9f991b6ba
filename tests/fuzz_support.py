"""Shared pieces of the float64 fuzz tests (tests/test_fuzz_*.py, tests/test_mha_builtin_fuzz.py)."""

import itertools

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: torch's intra-op thread pool only adds wake-ups (3-5x slower on a shared 2-core CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def all_pairs(factors: dict, seed: int = 0) -> list[dict]:
    """A greedy all-pairs covering array: every value pair of every two factors appears in some row."""
    names = list(factors)
    uncovered = {
        (a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in factors[a] for vb in factors[b]
    }
    rows = []
    rng = np.random.default_rng(seed)
    while uncovered:
        best, best_gain = None, -1
        for _ in range(200):  # random candidates, keep the one covering most new pairs
            row = {n: factors[n][rng.integers(len(factors[n]))] for n in names}
            # seed the candidate with one uncovered pair so progress is guaranteed
            a, va, b, vb = sorted(uncovered, key=repr)[rng.integers(len(uncovered))]
            row[a], row[b] = va, vb
            gain = sum((x, row[x], y, row[y]) in uncovered for x, y in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append(best)
        uncovered -= {(x, best[x], y, best[y]) for x, y in itertools.combinations(names, 2)}
    return rows
