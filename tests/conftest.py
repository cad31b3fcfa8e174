"""Shared fixtures. The pack is imported as ``calibrated_samplers`` (``pip install -e .``, as .ci/run does)."""
import os

import pytest
import torch

import calibrated_samplers
from calibrated_samplers.calibration.testbed.kdiffusion import load_k_diffusion_sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.realpath(os.path.dirname(calibrated_samplers.__file__)) != os.path.realpath(ROOT):
    raise RuntimeError(
        f"calibrated_samplers imports from {calibrated_samplers.__file__}, not this checkout ({ROOT}): "
        "run `pip install -e .` here (bash .ci/run does)")

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # pytest-xdist (.ci/run): share the cores out, not one thread pool per core in every worker
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(scope="session")
def K():
    return load_k_diffusion_sampling()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
