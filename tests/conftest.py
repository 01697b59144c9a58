"""Test-wide settings."""

import os

import pytest
import torch
from hypothesis import settings

# Deterministic by default (CI and a user's `make test` alike): the same examples every run, no example database
# replaying an old failure. `make fuzz` (HYPOTHESIS_PROFILE=fuzz) searches randomly with more examples instead.
# The tests set no max_examples of their own, so the profile decides how hard to search.
settings.register_profile("default", derandomize=True, database=None, deadline=None, print_blob=True,
                          max_examples=50)
settings.register_profile("fuzz", derandomize=False, deadline=None, print_blob=True,
                          max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "1000")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: OpenMP wake-ups dominate tiny matmuls on a busy 2-core machine, so use one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
