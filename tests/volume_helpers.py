"""Helpers shared by the volume-engine tests (session, command line)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a module on one torch thread (import this fixture into the test module).

    The tiny test model is fastest on one thread, and far faster than on two when other
    processes share the CPU: intra-op threads then wait on each other (50x slower measured).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays."""
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
