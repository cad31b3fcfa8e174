"""Shared fixtures. The pack is imported as ``calibrated_samplers`` (``pip install -e .``, as .ci/run does)."""
import importlib.util
import os
import sys
import types

import pytest
import torch

import calibrated_samplers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.realpath(os.path.dirname(calibrated_samplers.__file__)) != os.path.realpath(ROOT):
    raise RuntimeError(
        f"calibrated_samplers imports from {calibrated_samplers.__file__}, not this checkout ({ROOT}): "
        "run `pip install -e .` here (bash .ci/run does)")


def load_k_diffusion_sampling():
    """PyPI k-diffusion's sampling module, loaded without the package __init__.

    k_diffusion/__init__.py imports its training stack (clip, torchvision, wandb...); its sampling.py needs
    only torch, scipy, torchsde, torchdiffeq, tqdm and utils.append_dims. utils.py imports torchvision at the
    top for image helpers the samplers never call, so a placeholder stands in when torchvision is absent.
    """
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise RuntimeError("k-diffusion is not installed: bash .ci/run installs it (pip install --no-deps k-diffusion==0.1.1.post1)")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = pkg
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    return importlib.import_module("k_diffusion.sampling")


@pytest.fixture(scope="session")
def K():
    return load_k_diffusion_sampling()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
