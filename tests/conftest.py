import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(2)  # the parity fixture was computed with 2 intra-op threads


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
