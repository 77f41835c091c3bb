"""Fixtures of the pretrain tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def single_thread_torch():
    """Run torch single-threaded for one test: on the shared 2-core CI machine, OpenMP threads
    spinning against other processes made tiny models ~100x slower. Opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread_torch")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
