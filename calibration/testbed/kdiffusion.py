"""PyPI k-diffusion's sampling module without its package __init__ (the golden reference of the tests and benchmarks)."""
import importlib
import importlib.util
import sys
import types


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
