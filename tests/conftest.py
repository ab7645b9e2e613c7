"""Test configuration: float64 everywhere and a deterministic hypothesis profile.

Profiles (select with ``HYPOTHESIS_PROFILE=<name>``):

- ``default``: derandomised, no deadline, each test's own ``max_examples``;
- ``slow``: the same with 10× the examples (pair it with ``-m slow`` for the long tests).
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

_common = dict(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("default", **_common)
settings.register_profile("slow", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    The suite compiles thousands of small programs; kept for the whole run in one process,
    XLA's CPU compiler was seen to abort late in the run. Each module compiles what it
    needs afresh, so this only costs the recompilation of programs shared across modules.
    """
    yield
    jax.clear_caches()
