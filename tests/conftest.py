import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# the parity fixture was computed with 2 intra-op threads; tools/mutation.py runs several pytest processes at once
# and gives each one thread (INSTDIFF_TEST_THREADS), or they would fight over the cores
torch.set_num_threads(int(os.environ.get("INSTDIFF_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def parity_path():
    """The golden fixture. In CI it must exist (a missing fixture is a failure, not a skip)."""
    from instdiff_lib.parity import FixtureError, parity_dir, verify_fixture

    d = parity_dir()
    try:
        verify_fixture(d)
    except FixtureError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    return d
