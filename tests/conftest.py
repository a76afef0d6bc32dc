import os

import pytest

# one torch thread: tests run in one process next to nothing else, and results stay comparable
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def env():
    import simpy

    return simpy.Environment()


@pytest.fixture
def log():
    return []
