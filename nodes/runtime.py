"""What the nodes do inside ComfyUI's sampling: read the model's family and identity, pick or fit a calibration.

Everything here takes ComfyUI's objects as arguments and imports ``comfy`` only inside the functions that
construct ComfyUI classes, so the logic is testable with stand-ins.
"""
import logging
import math
import os

import torch

from .. import hosts
from ..calibration import CalibrationCancelled
from ..calibration.end_to_end import normal_weights
from ..calibration.progress import TimeLeft
from ..calibration.identity import fingerprint, named_weights, tensor_digest
from ..calibration.file import CalibrationSet
from ..calibration.library import cfg_mismatch, check_model
from ..samplers import SAMPLERS, CalibrationMismatch, Family

log = logging.getLogger("calibrated_samplers")
FOLDER = "calibrated_samplers"
HOW_TO_CALIBRATE = f"run the 'Fit calibration' node on this model with method {{name}} (files go to models/{FOLDER})"
# ComfyUI's model_sampling mixins, most specific first (EDM subclasses V_PREDICTION subclasses EPS)
PREDICTIONS = (("CONST", "flow"), ("EDM", "edm"), ("V_PREDICTION", "v"), ("X0", "x0"), ("EPS", "eps"))


def prediction_of(model_sampling):
    names = {c.__name__ for c in type(model_sampling).__mro__}
    for cls_name, prediction in PREDICTIONS:
        if cls_name in names:
            return prediction
    return type(model_sampling).__name__.lower()  # x = x0 + sigma * n in ComfyUI unless CONST


def family_of(model_sampling):
    """The samplers' Family for a ComfyUI model_sampling object: CONST is flow (with its shift), all else ve."""
    if prediction_of(model_sampling) == "flow":
        return Family("flow", float(getattr(model_sampling, "shift", 1.0)))
    return Family("ve")


def _first_tensor(obj, depth=0):
    if torch.is_tensor(obj):
        return obj
    if depth > 4:
        return None
    items = obj if isinstance(obj, (list, tuple)) else getattr(obj, "weights", None)
    for item in items if isinstance(items, (list, tuple)) else ():
        t = _first_tensor(item, depth + 1)
        if t is not None:
            return t
    return None


def model_fingerprint(patcher):
    """The calibration.identity fingerprint of a ComfyUI ModelPatcher: the unpatched weights plus its patches."""
    base = patcher.model
    model_sampling = patcher.get_model_object("model_sampling")
    prefix = "diffusion_model."
    backup = getattr(patcher, "backup", None) or {}  # original weights of keys a patch has replaced in place
    named = named_weights(base.diffusion_model,
                            lambda k: getattr(backup.get(prefix + k), "weight", None))
    patches = []
    for key, entries in sorted((getattr(patcher, "patches", None) or {}).items()):
        for entry in entries:
            t = _first_tensor(entry[1])
            patches.append(f"{key}|{float(entry[0]):g}|{float(entry[2]):g}|{type(entry[1]).__name__}|"
                           f"{tensor_digest(t) if t is not None else '-'}")
    family = family_of(model_sampling)
    return fingerprint(named, prediction_of(model_sampling), family.name, family.shift, patches,
                       model=type(getattr(base, "model_config", base)).__name__,
                       sigma_min=float(getattr(model_sampling, "sigma_min", 0.0)),
                       sigma_max=float(getattr(model_sampling, "sigma_max", 0.0)))


def run_context(model):
    """(model patcher, Family, cfg) for the denoiser a ComfyUI sampler function receives."""
    guider = getattr(model, "inner_model", None)
    patcher = getattr(guider, "model_patcher", None)
    if patcher is None:
        raise RuntimeError("calibrated samplers run inside ComfyUI's sampling (KSampler, SamplerCustom...): "
                           "the model they were given has no model patcher")
    cfg = getattr(guider, "cfg", None)
    return patcher, family_of(patcher.get_model_object("model_sampling")), (None if cfg is None else float(cfg))


EVENT = "calibrated_samplers.warning"  # the browser extension shows these as toasts


def notify(message, short):
    """Warn in the console (``message``, whole) and in the browser of the client that queued the run (``short``):
    a run that falls back to the uncalibrated solver must not look like a normal success."""
    log.warning(message)
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):  # outside a ComfyUI server (tests, scripts)
        return
    server.send_sync(EVENT, {"message": short, "node": getattr(server, "last_node_id", None)},
                     getattr(server, "client_id", None))


def find_or_warn(name, library, sigmas, family, fingerprint, cfg, fix, fit=None, shape=None):
    """The saved calibration for a run (latent ``shape`` without the batch), else ``fit()``'s (calibration, path)
    when given; with neither, the run is uncalibrated and the console and the browser say so (``fix``: what to do,
    in the browser's words)."""
    calibration, path, notes, warnings = hosts.find(name, library, sigmas, family, fingerprint, cfg, shape, fit)
    if calibration is None:
        notify(*hosts.missing(name, sigmas, cfg, notes, HOW_TO_CALIBRATE.format(name=name), fix))
    else:
        log.info("[Calibrated Samplers] %s: using %s", name, os.path.basename(path))
        for warning in warnings:
            log.warning(warning)
    return calibration


def notify_warnings(method, result):
    """Show the user each warning of a finished calibration (hosts.warnings_of), in the console and the browser."""
    for message in hosts.warnings_of(result):
        notify(f"[Calibrated Samplers] {method}: {message}", f"{method}: {message}")


def comfy_progress():
    """A progress(done, total) that drives the running node's ComfyUI progress bar and shows the time left on the node
    (and in the console each tenth of the way)."""
    import comfy.utils
    bar, left, said = [], TimeLeft(), [-1]

    def progress(done, total):
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)
        text = f"calibrating: {left.text(done, total)}"
        try:
            from server import PromptServer
            server = PromptServer.instance
            server.send_progress_text(text, server.last_node_id)
        except (ImportError, AttributeError):  # outside a server, or a ComfyUI without progress text
            pass
        tenth = int(10 * done / max(total, 1))
        if tenth > said[0]:  # the console said the plan once already (hosts.say_plan)
            said[0] = tenth
            log.info("[Calibrated Samplers] calibrating: %s", left.estimate(done, total))
    progress.time_left = left  # where the host puts the planned evaluations (hosts.announce_plan)
    return progress


def dropdown_sampler(name, library):
    """The function ComfyUI's KSampler calls for ``name``: finds the matching saved calibration, or warns."""
    fn = SAMPLERS[name]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        patcher, family, cfg = run_context(model)
        calibration = None
        if fn.kind != "plain":
            calibration = find_or_warn(name, library, sigmas, family, model_fingerprint(patcher), cfg,
                                       "Run the 'Fit calibration' node", shape=tuple(x.shape[1:]))
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                  calibration=calibration, family=family.name, shift=family.shift, **options)

    sample.__name__ = f"sample_{name}"
    sample.calibrated_samplers = True
    sample.__doc__ = f"{name} for ComfyUI's sampler lists: uses the saved calibration matching the run."
    return sample


def sample_or_calibrate(model, x, sigmas, extra_args=None, callback=None, disable=None, method=None, library=None,
                        folder=None, calibrate_missing=True, batch_size=16, fine_steps=6, end_to_end=False,
                        max_minutes=0.0, afs=False, **options):
    """The SAMPLER function of the first-use node: the saved calibration matching the run, else (when
    ``calibrate_missing``) one fitted right here on the run's own model, prompts, cfg, schedule and image, saved to
    ``folder`` and used at once; the next run at the same setting finds the file."""
    patcher, family, cfg = run_context(model)
    fp = model_fingerprint(patcher)

    def fit():
        return first_use_calibration(model, x, sigmas, extra_args, method, patcher, family, cfg, fp, folder,
                                     batch_size, fine_steps, end_to_end, max_minutes, afs)
    calibration = find_or_warn(method, library, sigmas, family, fp, cfg,
                               "Turn on calibrate_if_missing, or run 'Fit calibration'",
                               fit if calibrate_missing else None, tuple(x.shape[1:]))
    return SAMPLERS[method](model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, calibration=calibration,
              family=family.name, shift=family.shift, **options)


def first_use_calibration(model, x, sigmas, extra_args, method, patcher, family, cfg, fp, folder, batch_size,
                          fine_steps, end_to_end, max_minutes, afs=False):
    """(Calibration, path) fitted on this run, or (None, None) where a run cannot be calibrated (an inpainting
    mask). Progress goes to the sampling node's bar; Cancel stops it and writes nothing. ``afs`` applies to a run
    from pure noise only (an empty latent at the schedule's top sigma); another is fitted without it, with a note."""
    import comfy.model_management as mm
    extra = dict(extra_args or {})
    if extra.get("denoise_mask") is not None:
        notify("[Calibrated Samplers] an inpainting run (with a mask) is not calibrated on first use",
               f"{method}: an inpainting run is not calibrated on first use; it runs uncalibrated.")
        return None, None
    seed = int(extra.get("seed") or 0)
    noise = hosts.first_use_noise(batch_size, x.shape[1:], seed, x)
    image = getattr(model, "latent_image", None)  # the img2img / hires-fix image; zeros for txt2img
    image = torch.zeros_like(noise) if image is None else image[:1].to(x.device, x.dtype).expand_as(noise).clone()
    model_sampling = patcher.get_model_object("model_sampling")
    states = comfy_noise_scaling(model_sampling)(sigmas[0], noise, image)
    sigma_min = getattr(model_sampling, "sigma_min", None)
    sigma_max = getattr(model_sampling, "sigma_max", None)
    if afs and (bool(image.abs().max() > 0) or (
            sigma_max is not None and float(sigmas[0]) < 0.99 * float(sigma_max))):  # a denoise below 1
        afs = False
        notify(f"[Calibrated Samplers] {method}: this run does not start from pure noise (img2img, hires fix or "
               "denoise below 1); its first-use calibration is fitted without afs",
               f"{method}: afs assumes a run from pure noise; this one is img2img, hires fix or a denoise below 1, "
               "so it was calibrated without afs.")
    if end_to_end:
        normal_weights(patcher.model)
    try:
        cal, path = hosts.first_use(
            method, model, sigmas.detach().cpu().double(), states, folder=folder, cfg=cfg, fingerprint=fp,
            shape=tuple(x.shape[1:]), afs=afs, extra_args=extra, family=family.name, shift=family.shift,
            fine_steps=int(fine_steps), chunk_size=max(1, x.shape[0]),
            sigma_min=None if sigma_min is None else float(sigma_min), end_to_end=bool(end_to_end),
            network=patcher.model,
            time_limit=60.0 * max_minutes if max_minutes else None, progress=comfy_progress(),
            cancel=mm.processing_interrupted,
            info={"made_by": "ComfyUI first-use calibration", "seed": seed, "schedule": "the run's own sigmas"})
    except CalibrationCancelled:
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()
    notify_warnings(method, cal)
    notify(f"[Calibrated Samplers] {method}: calibrated this run's setting and wrote {path}",
           f"{method}: no file fitted this setting, so it was calibrated now and saved as {os.path.basename(path)}; "
           "later runs at this setting use it.")
    return cal, path


def sample_calibrated(model, x, sigmas, extra_args=None, callback=None, disable=None, calibration=None,
                      allow_other_model=False, label="calibration", **options):
    """The SAMPLER function of the calibrated-sampler nodes: one given calibration, checked against the model."""
    patcher, family, cfg = run_context(model)
    message = check_model(calibration, model_fingerprint(patcher), allow_other_model, label)
    if message:
        log.warning("[Calibrated Samplers] %s (allowed by allow_other_model)", message)
    if isinstance(calibration, CalibrationSet):
        chosen, why = calibration.select(sigmas, family, cfg)
        if chosen is None:
            raise CalibrationMismatch(f"{label} {why}")
        calibration = chosen
    why = cfg_mismatch(calibration, cfg)
    if why:
        notify(f"[Calibrated Samplers] {label} {why}: the correction may not fit; calibrate at this cfg",
               f"{label} {why}: the correction may not fit. Calibrate at this cfg (or over a cfg range).")
    return SAMPLERS[calibration.method](model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                       calibration=calibration, family=family.name, shift=family.shift, **options)


def comfy_noise_scaling(model_sampling):
    """A run's start state as ComfyUI's sampling makes it (pure noise at the top sigma is scaled differently)."""
    sigma_max = float(getattr(model_sampling, "sigma_max", float("inf")))

    def scale(sigma, noise, image):
        sigma = float(sigma)
        top = math.isclose(sigma_max, sigma, rel_tol=1e-5) or sigma > sigma_max
        return model_sampling.noise_scaling(torch.tensor(sigma, dtype=noise.dtype, device=noise.device), noise, image,
                                            top)
    return scale


def sample_calibration_run(model, x, sigmas, extra_args=None, callback=None, disable=None, job=None):
    """A SAMPLER function that calibrates instead of sampling, so ComfyUI's guider prepares model and prompts.

    ComfyUI gives it the first ``first_noise`` samples already scaled to sigmas[0]; the scale of a zero latent
    is linear in the noise, so the whole batch is scaled the same way here (the guider only ever sees a batch
    of ``chunk_size``, which keeps ComfyUI's memory estimate to what one model call needs).
    """
    first = job.first_noise.to(x.device, torch.float64)
    scale = (x.to(torch.float64) * first).sum() / (first * first).sum()
    states = (job.noise.to(x.device, torch.float64) * scale).to(x.dtype)
    patcher, family, cfg = run_context(model)
    guider = model.inner_model
    fp = model_fingerprint(patcher)
    sigma_min = getattr(patcher.get_model_object("model_sampling"), "sigma_min", None)
    if job.fit_options.get("end_to_end", True):
        normal_weights(patcher.model)

    def denoiser(xs, sigma, prompt=0, **kwargs):
        guider.active_prompt = prompt
        return model(xs, sigma, **kwargs)

    conditions = [dict(extra_args or {}, prompt=k) for k in range(job.prompts)]

    def with_cfg(value):
        guider.cfg = value  # the guider combines the prompts at its cfg when the denoiser is called
        return denoiser, conditions
    hosts.run(job, denoiser, sigmas, states, job.noise.to(x.device, x.dtype), conditions, family, cfg, fp, with_cfg,
              sigma_min=None if sigma_min is None else float(sigma_min), network=patcher.model)
    return x


def prompt_conds(positive, negative, cfg):
    """One (positive, negative) conditioning pair per prompt: each entry of ``positive`` is a prompt.

    ``negative`` pairs entry by entry when it has as many entries, else applies whole to every prompt.
    """
    if not positive:
        raise ValueError("Calibrate needs a positive CONDITIONING (a text encode of a typical prompt, or several "
                         "combined with Conditioning (Combine) to calibrate over many prompts)")
    if negative is None and abs(cfg - 1.0) > 1e-9:
        raise ValueError(f"cfg is {cfg:g} but no negative CONDITIONING is connected: connect one, or set cfg to 1")
    pairs = []
    for k, entry in enumerate(positive):
        if negative is None:
            neg = None
        elif len(negative) == len(positive):
            neg = [negative[k]]
        else:
            neg = negative
        pairs.append(([entry], neg))
    return pairs


def make_guider(model, pairs, cfg):
    """A CFGGuider that holds every prompt's conditioning and samples with the one ``active_prompt`` names."""
    import comfy.samplers

    class PromptsGuider(comfy.samplers.CFGGuider):
        active_prompt = 0

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            k = self.active_prompt
            return comfy.samplers.sampling_function(
                self.inner_model, x, timestep, self.conds.get(f"negative_{k}"), self.conds.get(f"positive_{k}"),
                self.cfg, model_options=model_options, seed=seed)

    guider = PromptsGuider(model)
    conds = {}
    for k, (pos, neg) in enumerate(pairs):
        conds[f"positive_{k}"] = pos
        if neg is not None:
            conds[f"negative_{k}"] = neg
    guider.inner_set_conds(conds)
    guider.set_cfg(cfg)
    return guider


def latent_shape(model, width, height, latent=None):
    """Per-sample latent shape: the LATENT's if given, else the model's latent format at width x height."""
    if latent is not None:
        return tuple(latent["samples"].shape[1:])
    fmt = model.get_model_object("latent_format")
    dims = getattr(fmt, "latent_dimensions", 2)
    if dims != 2:
        raise ValueError(f"this model's latents are {dims}-D (video/audio): connect a LATENT from the model's "
                         "empty-latent node to give the shape")
    ratio = getattr(fmt, "spacial_downscale_ratio", 8)
    return (int(fmt.latent_channels), max(1, height // ratio), max(1, width // ratio))
