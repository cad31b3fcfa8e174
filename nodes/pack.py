"""The pack's ComfyUI nodes, its models folder and its entries in the stock sampler lists."""
import logging
import os

import torch

from .. import hosts
from ..calibration import CalibrationCancelled, load
from ..calibration.library import Library
from ..calibration.picture import residual_image
from ..samplers import SAMPLERS, Family, calibrated
from ..samplers.core import check_calibration
from .declare import In, Node, build, v3_api
from ..calibration.file import CalibrationSet
from ..calibration.requests import (RequestError, check_entries, check_request, output_path, parse_cfgs,
                                    parse_denoises, parse_steps)
from ..samplers import CalibrationMismatch
from .runtime import (FOLDER, comfy_noise_scaling, comfy_progress, dropdown_sampler, latent_shape,
                      make_guider, notify_warnings, prompt_conds, sample_calibrated, sample_calibration_run,
                      sample_or_calibrate)

log = logging.getLogger("calibrated_samplers")
CATEGORY = "sampling/custom_sampling/calibrated"
CALIBRATED = calibrated()


def register_folder():
    """models/calibrated_samplers, merged into a path list extra_model_paths.yaml may already have made."""
    import folder_paths
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths) + ([default] if default not in paths else [])
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | {".safetensors"})


def calibration_files():
    import folder_paths
    return folder_paths.get_filename_list(FOLDER)


def library_paths():
    import folder_paths
    return [folder_paths.get_full_path(FOLDER, name) for name in calibration_files()]


LIBRARY = Library(library_paths)


def register_dropdown():
    """Append the pack's samplers to KSampler's lists in place (once) and expose their sample_<name> functions."""
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.samplers
    added = []
    for name in SAMPLERS:
        existing = getattr(k_sampling, f"sample_{name}", None)
        if existing is not None and not getattr(existing, "calibrated_samplers", False):
            log.warning("[Calibrated Samplers] ComfyUI already has a sampler %r; the pack's is not listed", name)
            continue
        setattr(k_sampling, f"sample_{name}", dropdown_sampler(name, LIBRARY))
        for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
            if name not in names:
                names.append(name)
        added.append(name)
    return added


def comfy_version():
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:
        return "unknown"


def calibrate_node(model, positive, cfg, method, scheduler, steps, fine_steps, batch_size, seed, filename,
                   width, height, negative=None, latent=None, sigmas=None, chunk_size=8, overwrite=False,
                   end_to_end=True, learn_sigmas=True, max_minutes=0.0, more_steps="", cfg_list="", denoise_list="",
                   afs=False):
    import comfy.model_management as mm
    import comfy.samplers
    import folder_paths
    pairs = prompt_conds(positive, negative, cfg)
    check_request(steps=None if sigmas is not None else steps, cfg=cfg, width=None if latent is not None else width,
                  height=None if latent is not None else height, batch_size=batch_size, prompts=len(pairs),
                  filename=filename)
    spread = {"steps": parse_steps(more_steps, steps), "cfgs": parse_cfgs(cfg_list, cfg),
              "denoises": parse_denoises(denoise_list)}
    check_entries(**spread, afs=afs)
    if sum(len(v) for v in spread.values()) == 3:
        spread = None  # one setting: a plain calibration file, as before ranges existed
    elif sigmas is not None:
        raise RequestError("a SIGMAS input is one schedule: leave more_steps, cfg_list and denoise_list empty, or "
                           "disconnect SIGMAS and pick the scheduler")
    path = output_path(folder_paths.get_folder_paths(FOLDER)[0], filename, overwrite)
    model_sampling = model.get_model_object("model_sampling")
    if sigmas is None:
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu()
        schedule = f"{scheduler}, {steps} steps"
    else:
        schedule = "SIGMAS input"
    if spread is not None:
        spread.update(schedule=lambda n: comfy.samplers.calculate_sigmas(model_sampling, scheduler, n).cpu(),
                      noise_scaling=comfy_noise_scaling(model_sampling))
        schedule = f"{scheduler}, steps {', '.join(map(str, spread['steps']))}"
    shape = latent_shape(model, width, height, latent)
    noise = torch.randn((batch_size,) + shape, generator=torch.Generator().manual_seed(seed))
    first = noise[:min(chunk_size, batch_size)].clone()
    info = {"made_by": "ComfyUI Calibrate node", "comfyui": comfy_version(), "schedule": schedule, "seed": seed,
            "prompts": len(pairs), "latent_shape": list(shape)}
    fit_options = {"fine_steps": fine_steps, "chunk_size": chunk_size, "end_to_end": bool(end_to_end),
                   "learn_sigmas": bool(learn_sigmas), "time_limit": 60.0 * max_minutes if max_minutes else None}
    if afs:  # only then: files made without it stay as they were
        fit_options["afs"] = True
    job = hosts.Job(method, noise, len(pairs), fit_options, info, comfy_progress(), mm.processing_interrupted,
                    spread=spread, first_noise=first)
    guider = make_guider(model, pairs, cfg)
    sampler = comfy.samplers.KSAMPLER(sample_calibration_run, extra_options={"job": job})
    try:
        guider.sample(first, torch.zeros_like(first), sampler, sigmas, disable_pbar=True, seed=seed)
    except CalibrationCancelled:
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()
    result = job.result
    result.save(path, replace=overwrite)
    notify_warnings(method, result)
    cal = result.primary() if isinstance(result, CalibrationSet) else result
    gained = ""
    if cal.residual_before is not None:
        gained = f"; held-out residual {float(cal.residual_before.sum()):.4g} -> {float(cal.residual_after.sum()):.4g}"
    if isinstance(result, CalibrationSet):
        gained = f"; {len(result)} calibrations: {result.summary()}" + gained
    log.info("[Calibrated Samplers] wrote %s (%s, %s%s)", path, method, schedule, gained)
    return result, cal.sampling_sigmas.to(torch.float32), residual_image(cal)[None]


def sampler_node(calibration, allow_other_model=False, sigmas=None, label="calibration"):
    import comfy.samplers
    if sigmas is not None:
        sig, fam = [float(s) for s in sigmas], Family.of(calibration.family)
        if isinstance(calibration, CalibrationSet):
            chosen, why = calibration.select(sig, fam)
            if chosen is None:
                raise CalibrationMismatch(f"{label} {why}")
        else:
            check_calibration(calibration, calibration.method, sig, fam)
    sampler = comfy.samplers.KSAMPLER(sample_calibrated, extra_options={
        "calibration": calibration, "allow_other_model": bool(allow_other_model), "label": label})
    shown = calibration.primary() if isinstance(calibration, CalibrationSet) else calibration
    return sampler, shown.sampling_sigmas.to(torch.float32)


def sampler_from_file_node(calibration_file, allow_other_model=False, sigmas=None):
    import folder_paths
    cal = load(folder_paths.get_full_path_or_raise(FOLDER, calibration_file))
    return (*sampler_node(cal, allow_other_model, sigmas, calibration_file), cal)


def first_use_node(sampler_name, calibrate_if_missing=True, batch_size=16, fine_steps=6, end_to_end=False,
                   max_minutes=0.0, afs=False):
    import comfy.samplers
    import folder_paths
    return (comfy.samplers.KSAMPLER(sample_or_calibrate, extra_options={
        "method": sampler_name, "library": LIBRARY, "folder": folder_paths.get_folder_paths(FOLDER)[0],
        "calibrate_missing": bool(calibrate_if_missing), "batch_size": int(batch_size), "fine_steps": int(fine_steps),
        "end_to_end": bool(end_to_end), "max_minutes": float(max_minutes), "afs": bool(afs)}),)


def gddim_node(order, corrector, lam):
    import comfy.samplers
    return (comfy.samplers.KSAMPLER(dropdown_sampler("gddim", LIBRARY),
                                    extra_options={"order": order, "corrector": corrector, "lam": lam}),)


def scheduler_names():
    import comfy.samplers
    return comfy.samplers.SCHEDULER_NAMES


ALLOW = In("allow_other_model", "BOOLEAN", False, tooltip="use the calibration even if it was made for another "
           "model (checkpoint, LoRAs, prediction type); only when you know they sample alike")
CHECK_SIGMAS = In("sigmas", "SIGMAS", optional=True, tooltip="sigmas from elsewhere, checked against the calibration's")

NODES = [
    Node("CalibratedSamplersCalibrate", "Fit calibration (run once, saves a file)", CATEGORY,
         "Fit a calibrated sampler to this model, schedule and cfg, and save it to models/calibrated_samplers. "
         "Runs the model many times (batch size x the fine reference's steps); progress shows, Cancel writes nothing. "
         "more_steps, cfg_list and denoise_list make one file serve several settings (each costs a calibration).",
         [In("model", "MODEL"),
          In("positive", "CONDITIONING", tooltip="the prompt(s) to calibrate on; several combined with "
             "Conditioning (Combine) count as separate prompts"),
          In("cfg", "FLOAT", 7.0, min=0.0, max=100.0, step=0.1, round=0.01,
             tooltip="calibrate at the cfg you will sample with (the file only matches that cfg)"),
          In("method", "COMBO", "iia_dpmpp_2m", options=CALIBRATED),
          In("scheduler", "COMBO", "karras", options=scheduler_names),
          In("steps", "INT", 8, min=1, max=200, tooltip="sampler steps (AMED and Heun-type methods take 2 "
             "evaluations per step)"),
          In("fine_steps", "INT", 10, min=1, max=100, tooltip="reference sub-steps per step (more: slower, closer fit)"),
          In("batch_size", "INT", 32, min=3, max=4096, tooltip="noises to calibrate on, split over the prompts; a "
             "quarter is held out to check the result (at least 3 per prompt; 32 or more per prompt is better)"),
          In("seed", "INT", 0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
          In("filename", "STRING", "my_model_calibration", tooltip="saved as models/calibrated_samplers/<name>.safetensors"),
          In("width", "INT", 512, min=16, max=16384, step=8),
          In("height", "INT", 512, min=16, max=16384, step=8),
          In("negative", "CONDITIONING", optional=True, tooltip="needed unless cfg is 1"),
          In("latent", "LATENT", optional=True, tooltip="gives the latent shape instead of width/height "
             "(needed for video models); its content is not used"),
          In("sigmas", "SIGMAS", optional=True, tooltip="a custom schedule instead of scheduler/steps"),
          In("chunk_size", "INT", 8, optional=True, min=1, max=1024, tooltip="samples per model call: lower it "
             "if you run out of memory; the result does not depend on it"),
          In("overwrite", "BOOLEAN", False, optional=True),
          In("end_to_end", "BOOLEAN", True, optional=True, tooltip="after the per-step fit, tune all steps together "
             "through the model (slower, usually much better)"),
          In("learn_sigmas", "BOOLEAN", True, optional=True, tooltip="let the end-to-end stage move the time steps; "
             "the file then samples on its own sigmas (the SIGMAS output) and is still found by this scheduler"),
          In("max_minutes", "FLOAT", 0.0, optional=True, min=0.0, max=1440.0, step=1.0,
             tooltip="stop the end-to-end stage after this many minutes (0: its default budget only)"),
          In("more_steps", "STRING", "", optional=True, tooltip="more step counts for the same file, e.g. 4-12 or "
             "6, 10, 20: KSampler then finds it at any of them (each count is a calibration of its own)"),
          In("cfg_list", "STRING", "", optional=True, tooltip="cfg values to fit instead of cfg alone, e.g. 3, 5.5, 8 "
             "(or 3-8 for three evenly spaced): runs at a cfg between them interpolate"),
          In("denoise_list", "STRING", "", optional=True, tooltip="denoise values for img2img and hires fix, e.g. "
             "1, 0.6, 0.4 (each fitted on the model's own images, re-noised)"),
          In("afs", "BOOLEAN", False, optional=True, tooltip="analytic first step: the first step needs no model "
             "evaluation (one fewer per image at the same steps) and the calibration learns around it; for text-to-"
             "image (full denoise)")],
         [("CALIBRATION", "calibration"), ("SIGMAS", "sigmas"), ("IMAGE", "residuals")],
         calibrate_node, output_node=True),
    Node("CalibratedSamplersSampler", "Sampler from calibration", CATEGORY,
         "SAMPLER and SIGMAS for SamplerCustom(Advanced) from a CALIBRATION.",
         [In("calibration", "CALIBRATION"), ALLOW, CHECK_SIGMAS],
         [("SAMPLER", "sampler"), ("SIGMAS", "sigmas")], sampler_node),
    Node("CalibratedSamplersSamplerFromFile", "Sampler from calibration file", CATEGORY,
         "SAMPLER and SIGMAS for SamplerCustom(Advanced) from a file in models/calibrated_samplers.",
         [In("calibration_file", "COMBO", options=calibration_files), ALLOW, CHECK_SIGMAS],
         [("SAMPLER", "sampler"), ("SIGMAS", "sigmas"), ("CALIBRATION", "calibration")], sampler_from_file_node),
    Node("CalibratedSamplersFirstUse", "Calibrated sampler (fits on first use)", CATEGORY,
         "SAMPLER for SamplerCustom(Advanced): uses the saved calibration matching each run; when none does (and "
         "calibrate_if_missing is on) it calibrates that run's setting first, on its own prompt, cfg, schedule and "
         "image, saves the file and samples with it. The first run at a new setting takes longer.",
         [In("sampler_name", "COMBO", "iia_dpmpp_2m", options=CALIBRATED),
          In("calibrate_if_missing", "BOOLEAN", True, tooltip="off: a run no file fits runs uncalibrated, with a "
             "warning"),
          In("batch_size", "INT", 16, min=3, max=1024, tooltip="noises for a first-use calibration (more: slower, "
             "better; a quarter is held out)"),
          In("fine_steps", "INT", 6, min=1, max=100, tooltip="reference sub-steps per step"),
          In("end_to_end", "BOOLEAN", False, tooltip="also tune all steps together (several times slower, usually "
             "better)"),
          In("max_minutes", "FLOAT", 0.0, min=0.0, max=1440.0, step=1.0, tooltip="limit for the end-to-end stage"),
          In("afs", "BOOLEAN", False, optional=True, tooltip="fit new calibrations with the analytic first step (one "
             "evaluation fewer per image at the same steps); text-to-image runs only: an img2img or hires-fix run is "
             "fitted without it. A file already saved for the setting is used as it is")],
         [("SAMPLER", "sampler")], first_use_node),
    Node("CalibratedSamplersGDDIM", "gDDIM sampler", CATEGORY,
         "gDDIM (exponential-integrator multistep, ICLR 2023): needs no calibration.",
         [In("order", "INT", 2, min=1, max=4), In("corrector", "BOOLEAN", True),
          In("lam", "FLOAT", 0.0, min=0.0, max=1.0, step=0.05, tooltip="0: deterministic; 1: DDPM-like noise")],
         [("SAMPLER", "sampler")], gddim_node),
]


def mappings():
    """Register the folder and the dropdown entries, then build the node classes (V3 where available)."""
    register_folder()
    register_dropdown()
    return build(NODES, v3_api())
