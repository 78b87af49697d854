"""Shared test configuration."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# dev keeps the local loop fast; CI sets HYPOTHESIS_PROFILE=ci. Both are derandomized so a
# failure reproduces on every run.
settings.register_profile("dev", max_examples=10, derandomize=True, deadline=None)
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Test helpers (tests/families.py) import as top-level modules under --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's many small tensor operations on one thread: on a shared two-core
    machine, waking a second OpenMP thread per operation costs more than the operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
