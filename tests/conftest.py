import os
from pathlib import Path

import pytest
import torch


def _test_data_dir() -> Path:
    return Path(os.environ.get("STMDIT_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The shared real-data folder; tests that need it skip with the reason when it is absent."""
    path = _test_data_dir()
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path}; set STMDIT_TEST_DATA to the shared data folder")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
