import os
import zlib

# bitsandbytes' reference backend wraps kernels in torch.compile, which would
# recompile for every test shape; eager mode computes the same values.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Property tests: enough examples to find edge cases, bounded for 2-core CI.
settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# CI runs the same examples every time (a failure there is then reproducible, never luck);
# local runs explore new ones.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))


@pytest.fixture
def rng(request):
    # a different, reproducible stream per test: crc32 of its id (Python's hash() of a str changes with every
    # process, which made the data, and a failure, different in every run)
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
