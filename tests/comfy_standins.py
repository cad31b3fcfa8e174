"""Stand-ins for the few ComfyUI objects and modules the nodes touch, so node logic is tested without ComfyUI.

They mirror ComfyUI 0.3.64's shapes (read off its source): a sampler function receives a denoiser whose
``inner_model`` is the guider (``.model_patcher``, ``.cfg``); the patcher has ``.model.diffusion_model``,
``.patches``, ``.backup`` and ``get_model_object``; model_sampling classes mix in EPS / V_PREDICTION / CONST.
The denoiser is the analytic Gaussian mixture's exact one, class-conditional on the guider's active prompt.
The real thing is exercised by tests/test_comfyui_integration.py.
"""
import os
import sys
import types

import torch

from ..calibration.testbed.analytic import GaussianMixture, karras


class EPS:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):  # ComfyUI's, for a 0-d sigma
        return noise * ((1.0 + sigma ** 2) ** 0.5 if max_denoise else sigma) + latent_image


class V_PREDICTION(EPS):
    pass


class EDM(V_PREDICTION):
    pass


class CONST:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image


class ModelSamplingDiscrete(EPS):
    sigma_min, sigma_max = 0.0292, 14.6146


class ModelSamplingContinuousEDM(EDM):
    sigma_min, sigma_max = 0.002, 80.0


class ModelSamplingDiscreteFlow(CONST):
    sigma_min, sigma_max = 0.001, 1.0

    def __init__(self, shift=3.0):
        self.shift = shift


class LatentFormat:
    latent_channels, latent_dimensions, spacial_downscale_ratio = 4, 2, 8


class Net(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=g))
        self.conv_bias = torch.nn.Parameter(torch.randn(8, generator=g))
        self.norm = torch.nn.Parameter(torch.randn(8, generator=g))
        self.proj = torch.nn.Parameter(torch.randn(16, 8, generator=g))


class SD15:
    pass


class BaseModel(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.diffusion_model = net
        self.model_config = SD15()


class Patcher:
    def __init__(self, model_sampling=None, seed=0, latent_format=None):
        self.model = BaseModel(Net(seed))
        self.objects = {"model_sampling": model_sampling or ModelSamplingDiscrete(),
                        "latent_format": latent_format or LatentFormat()}
        self.patches, self.backup = {}, {}

    def get_model_object(self, name):
        return self.objects[name]


MIXTURE = GaussianMixture(shape=(4, 4, 4), n_classes=2)


class Denoiser:
    """What ComfyUI hands a sampler function (KSamplerX0Inpaint): callable, ``inner_model`` is the guider."""

    def __init__(self, guider):
        self.inner_model = guider
        self.calls, self.prompts_seen = 0, set()
        flow = isinstance(guider.model_patcher.get_model_object("model_sampling"), CONST)
        self.exact = MIXTURE.flow() if flow else MIXTURE.edm()

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        self.calls += 1
        prompt = getattr(self.inner_model, "active_prompt", 0)
        self.prompts_seen.add(prompt)
        labels = torch.full((x.shape[0],), prompt, dtype=torch.long)
        return self.exact(x, sigma, cond=labels, cfg=self.inner_model.cfg)


class Guider:
    def __init__(self, patcher, cfg=1.0):
        self.model_patcher, self.cfg = patcher, cfg


class CFGGuider(Guider):
    """comfy.samplers.CFGGuider's calling pattern: scale the noise, hand a denoiser to the SAMPLER's function."""

    def __init__(self, patcher):
        super().__init__(patcher)
        self.original_conds = {}

    def inner_set_conds(self, conds):
        self.original_conds = dict(conds)

    def set_cfg(self, cfg):
        self.cfg = cfg

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        x = noise * (1 + float(sigmas[0]) ** 2) ** 0.5 + latent_image  # EPS noise_scaling at max denoise
        extra_args = {"model_options": {}, "seed": seed, "denoise_mask": denoise_mask}
        return sampler.sampler_function(Denoiser(self), x, sigmas, extra_args=extra_args, callback=callback,
                                        disable=disable_pbar, **sampler.extra_options)


class KSAMPLER:
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):  # noqa: B006 (ComfyUI's signature)
        self.sampler_function, self.extra_options, self.inpaint_options = sampler_function, extra_options, inpaint_options


class Interrupted(Exception):
    pass


def install(monkeypatch, base_dir, interrupted=lambda: False):
    """Put stand-in ``comfy``, ``comfy.samplers``, ``comfy.k_diffusion.sampling``, ``comfy.utils``,
    ``comfy.model_management``, ``folder_paths`` and ``server`` modules in sys.modules for one test; the
    server's messages to the browser are kept in ``.sent``."""
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSAMPLER_NAMES = ["euler", "dpmpp_2m", "ipndm"]
    samplers.SAMPLER_NAMES = samplers.KSAMPLER_NAMES + ["ddim"]
    samplers.SCHEDULER_NAMES = ["simple", "karras", "normal"]
    samplers.KSAMPLER, samplers.CFGGuider = KSAMPLER, CFGGuider
    samplers.calculate_sigmas = lambda model_sampling, scheduler, steps: karras(steps, 0.03, 14.6).float()
    k_diffusion = types.ModuleType("comfy.k_diffusion")
    k_sampling = types.ModuleType("comfy.k_diffusion.sampling")
    k_sampling.sample_euler = k_sampling.sample_dpmpp_2m = k_sampling.sample_ipndm = lambda *a, **k: None
    utils = types.ModuleType("comfy.utils")
    bars = []

    class ProgressBar:
        def __init__(self, total):
            self.total, self.values = total, []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.values.append((value, total))

    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.processing_interrupted = interrupted
    mm.InterruptProcessingException = Interrupted

    def throw():
        if interrupted():
            raise Interrupted()
    mm.throw_exception_if_processing_interrupted = throw
    fp = types.ModuleType("folder_paths")
    fp.models_dir = os.path.join(base_dir, "models")
    fp.folder_names_and_paths = {}

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0]

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        return sorted(f for p in paths if os.path.isdir(p) for f in os.listdir(p) if os.path.splitext(f)[1] in exts)

    def get_full_path(name, filename):
        for p in get_folder_paths(name):
            if os.path.isfile(os.path.join(p, filename)):
                return os.path.join(p, filename)
        return None

    def get_full_path_or_raise(name, filename):
        path = get_full_path(name, filename)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return path
    fp.get_folder_paths, fp.get_filename_list = get_folder_paths, get_filename_list
    fp.get_full_path, fp.get_full_path_or_raise = get_full_path, get_full_path_or_raise
    server = types.ModuleType("server")
    sent, texts = [], []

    class PromptServer:
        client_id, last_node_id = "client-1", "7"

        def send_sync(self, event, data, sid=None):
            sent.append((event, data, sid))

        def send_progress_text(self, text, node_id, sid=None):
            texts.append((text, node_id))
    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer
    comfy.samplers, comfy.k_diffusion, comfy.utils, comfy.model_management = samplers, k_diffusion, utils, mm
    k_diffusion.sampling = k_sampling
    for name, mod in {"comfy": comfy, "comfy.samplers": samplers, "comfy.k_diffusion": k_diffusion,
                      "comfy.k_diffusion.sampling": k_sampling, "comfy.utils": utils,
                      "comfy.model_management": mm, "folder_paths": fp, "server": server}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(samplers=samplers, k_sampling=k_sampling, folder_paths=fp, bars=bars, sent=sent,
                                 texts=texts)
