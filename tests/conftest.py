import os

import pytest
from hypothesis import settings

# one torch thread: tests run in one process next to nothing else, and results stay comparable
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Property tests draw the same examples on every run, so the suite's verdict (CI's included) never
# depends on luck. To look for new failing inputs, run with HYPOTHESIS_PROFILE=explore (fresh
# random examples on every run; a failure prints the example to add as a regression test).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture
def env():
    import simpy

    return simpy.Environment()


@pytest.fixture
def log():
    return []
