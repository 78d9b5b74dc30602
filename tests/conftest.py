"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models, restored afterwards.

    On a 2-core machine shared with other processes (and with the CLI subprocesses some tests
    start), OpenMP's spin-waiting threads make a tiny model's forward 20-40x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
