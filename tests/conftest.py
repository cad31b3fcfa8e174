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


@pytest.fixture(scope="session")
def K():
    return load_k_diffusion_sampling()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
