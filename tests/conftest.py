"""Shared test setup: paths to the shared data, CPU-only JAX, quiet TensorFlow."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_WATER = REPO_ROOT.parent / "shared" / "data" / "water_bodies"


@pytest.fixture(scope="session")
def water_dir() -> pathlib.Path:
    """The shared water-bodies dataset (images/, masks/, train/test lists)."""
    if not (SHARED_WATER / "images").is_dir():
        pytest.fail(
            f"shared water data not found at {SHARED_WATER}; CI places ../shared beside the repo"
        )
    return SHARED_WATER
