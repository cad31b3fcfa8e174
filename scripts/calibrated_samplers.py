"""A1111 / Forge extension entry: the pack's samplers in the web UI's sampler list, and calibration from the web UI.

The web UI imports every file in ``extensions/<folder>/scripts/``; this one loads the pack (the repository
root) as the package ``calibrated_samplers`` and uses its ``samplers`` and ``calibration``. Outside a web UI
(ComfyUI, tests, plain Python) importing it registers nothing.

Files live in ``models/calibrated_samplers/`` of the web UI and are the same format as ComfyUI's: copy them
between the two. A file matches a generation when the method, the sigmas the web UI computed (scheduler and
steps), the cfg and the model fingerprint (calibration.identity) agree.
"""
import hashlib
import importlib.util
import logging
import math
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("calibrated_samplers")

FOLDER = "calibrated_samplers"
INFOTEXT_KEY = "Calibration"
HIRES_INFOTEXT_KEY = "Hires calibration"
WARNING_SUFFIX = " warning"  # "Calibration warning": what an API client reads (A1111's response has no comments)


def labels():
    """{sampler: its name in the web UI's sampler list}, IIA first, then AMED, then the uncalibrated ones: the
    registry's labels, "(calibrated)" added where a file is used."""
    from calibrated_samplers.samplers import SAMPLERS
    return {name: fn.label + ("" if fn.kind == "plain" else " (calibrated)")
            for kind in ("iia", "amed", "plain") for name, fn in SAMPLERS.items() if fn.kind == kind}


def calibrated_methods():
    """The samplers a file serves (what the tab and the calibrate route offer), in the list's order."""
    from calibrated_samplers.samplers import calibrated
    fitted = calibrated()
    return [name for name in labels() if name in fitted]


def __getattr__(name):  # ``LABELS``, read once the pack is loaded
    if name == "LABELS":
        return labels()
    raise AttributeError(name)


def load_pack():
    """The repository as the package ``calibrated_samplers`` (whatever the extension folder is called)."""
    mod = sys.modules.get("calibrated_samplers")
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location("calibrated_samplers", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["calibrated_samplers"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["calibrated_samplers"]
        raise
    return mod


# ------------------------------------------------------------------------------------------ the loaded model
def model_family(sd_model):
    """(prediction, Family) of the web UI's loaded model: Forge's predictor, or A1111's parameterization."""
    from calibrated_samplers.samplers import Family
    forge = getattr(sd_model, "forge_objects", None)
    if forge is not None:
        predictor = forge.unet.model.predictor
        kind = getattr(predictor, "prediction_type", "epsilon")
        if kind == "const":
            return "flow", Family("flow", float(getattr(predictor, "shift", 1.0)))
        return {"v_prediction": "v", "edm": "edm"}.get(kind, "eps"), Family("ve")
    sampling = getattr(getattr(sd_model, "model", None), "model_sampling", None)
    if type(sampling).__name__ == "ModelSamplingDiscreteFlow":  # A1111's SD3: it says "eps" and samples a flow
        return "flow", Family("flow", float(sampling.shift))
    return ("v" if getattr(sd_model, "parameterization", "eps") == "v" else "eps"), Family("ve")


def model_fingerprint(sd_model):
    """calibration.identity's fingerprint: the same rule as the ComfyUI nodes, so files move between the UIs."""
    from calibrated_samplers.calibration.identity import fingerprint, named_weights
    forge = getattr(sd_model, "forge_objects", None)
    if forge is not None:
        unet = forge.unet
        net = unet.model.diffusion_model
        backup = getattr(getattr(unet, "lora_loader", None), "backup", None) or {}
        patches = sorted(repr(k) for k in (getattr(unet, "lora_patches", None) or {}))
    else:
        net = sd_model.model.diffusion_model
        backup, patches = {}, []
    named = named_weights(net, lambda k: backup.get("diffusion_model." + k))
    prediction, family = model_family(sd_model)
    return fingerprint(named, prediction, family.name, family.shift, patches, model=type(sd_model).__name__)


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------ sampling
_pending = threading.local()


def pending_job(method):
    job = getattr(_pending, "job", None)
    return job if job is not None and job.method == method else None


def model_sigma_min(model):
    """The smallest sigma of the denoiser the web UI hands a sampler, or None: the fit's teacher ends there as the
    sampler's last step does (hosts' docstring). A1111's CFG denoiser holds a k-diffusion wrapper that says it; Forge's
    wrapper (ForgeScheduleLinker) calls its predictor's ``sigma_min``, a property there, and raises, so the
    predictor is read directly."""
    wrapper = getattr(model, "inner_model", None)
    source = getattr(wrapper, "predictor", wrapper)
    try:
        sigma_min = getattr(source, "sigma_min", None)
        sigma_min = sigma_min() if callable(sigma_min) else sigma_min
        return None if sigma_min is None else float(sigma_min)
    except (TypeError, ValueError, RuntimeError):  # not one number: the model is taken as defined at every sigma
        return None


def make_sampler(name, library, env):
    """The k-diffusion-style function the web UI calls for ``name``. ``env`` gives the web UI's state
    (``sd_model()``, ``sgm_noise_multiplier()``, ``conds(p, prompt, batch)``) so tests can stand in for it."""
    from calibrated_samplers import hosts
    from calibrated_samplers.samplers import SAMPLERS
    fn = SAMPLERS[name]
    label = labels()[name]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        p = getattr(model, "p", None)
        extra_args = extra_args or {}
        job = pending_job(name)
        if job is not None:
            return calibration_run(model, x, sigmas, extra_args, job, env, p)
        sd_model = env.sd_model()
        _, family = model_family(sd_model)
        calibration = None
        if fn.kind != "plain":
            hires = getattr(p, "is_hr_pass", False)
            cfg = extra_args.get("cond_scale")
            if hires and getattr(p, "hr_cfg", None) is not None:
                cfg = float(p.hr_cfg)  # Forge's hires pass guides at its own "Hires CFG Scale", not cond_scale
            # first use fits txt2img runs only: there x is pure noise, so the run can be calibrated as it is
            txt2img = p is not None and not hires and not getattr(p, "init_images", None)
            settings = env.first_use() if txt2img else None

            def fit():
                cal, path = fit_on_first_use(model, x, sigmas, extra_args, name, env, sd_model, family, cfg, settings)
                p.comment(f"{label}: no file fitted this setting, so it was calibrated now and saved as "
                          f"{os.path.basename(path)}; later runs at this setting use it.")
                return cal, path
            calibration, path, notes, warnings = hosts.find(name, library, sigmas, family, model_fingerprint(sd_model),
                                                            cfg, tuple(x.shape[1:]), fit if settings else None)
            if calibration is None:
                console, short = hosts.missing(
                    name, sigmas, cfg, notes, "use the 'Calibrated Samplers' tab or POST /calibrated-samplers/calibrate "
                    f"(files go to models/{FOLDER})", "Calibrate in the 'Calibrated Samplers' tab", shown=label,
                    shown_short=label + (" (hires pass)" if hires else ""))
                log.warning(console)
                if p is not None and hasattr(p, "comment"):  # shown under the image, not only in the console
                    p.comment(short)
                note, warnings = f"none: uncalibrated, {fn.uncalibrated}", [short]
            else:
                note = f"{os.path.basename(path)} ({file_hash(path)})"
                for warning in warnings:
                    log.warning(warning)
            if p is not None:  # hires fix's second pass gets lines of its own, after the first pass's
                key = HIRES_INFOTEXT_KEY if hires else INFOTEXT_KEY
                p.extra_generation_params[key] = note
                if warnings:  # in the infotext and the API's info JSON, read by scripts as by people
                    p.extra_generation_params[key + WARNING_SUFFIX] = " ".join(warnings)
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                  calibration=calibration, family=family.name, shift=family.shift, **options)

    sample.__name__ = f"sample_{name}"
    return sample


def start_state(family, sgm, sigma_top):
    """(sigma, noise, image) -> the state the web UI starts from: txt2img scales pure noise at the schedule's top
    sigma (by sqrt(1 + sigma^2) with its SGM option), img2img and hires fix add sigma x noise to the image."""
    def scale(sigma, noise, image):
        sigma = float(sigma)
        if family.name == "flow":
            return sigma * noise + (1.0 - sigma) * image
        top = abs(sigma - sigma_top) <= 1e-6 * sigma_top
        return noise * (math.sqrt(1.0 + sigma * sigma) if top and sgm else sigma) + image
    return scale


def call_padded(model, xs, sigma, batch, **kwargs):
    """The web UI's denoiser on fewer than ``batch`` samples: its conditioning is made for ``batch`` images, so pad,
    then keep the first ones."""
    m = xs.shape[0]
    if m < batch:
        xs, sigma = torch_cat_pad(xs, batch), torch_cat_pad(sigma.reshape(-1), batch)
    return model(xs, sigma, **kwargs)[:m]


def fit_on_first_use(model, x, sigmas, extra_args, name, env, sd_model, family, cfg, settings):
    """Calibrate this txt2img run's own setting (prompt, cfg, schedule) at a small batch, save it, return it with its
    path. ``settings``: batch_size, fine_steps and afs (the web UI's options; only txt2img runs, from pure noise,
    come here, which afs assumes)."""
    import torch
    from calibrated_samplers import hosts
    batch = x.shape[0]
    s0 = float(sigmas[0])
    noise = hosts.first_use_noise(settings["batch_size"], x.shape[1:], settings.get("seed", 0), x)
    states = start_state(family, env.sgm_noise_multiplier(), s0)(s0, noise, torch.zeros_like(noise))
    step = getattr(model, "step", None)  # the web UI's denoiser counts its calls (prompt editing): keep it
    try:
        cal, path = hosts.first_use(
            name, lambda xs, sigma: call_padded(model, xs, sigma, batch, **extra_args), sigmas, states,
            folder=env.folder(), cfg=cfg, fingerprint=model_fingerprint(sd_model), shape=tuple(x.shape[1:]),
            afs=bool(settings.get("afs", False)), info={"made_by": "web UI first-use calibration"},
            family=family.name, shift=family.shift, fine_steps=int(settings["fine_steps"]), chunk_size=batch,
            end_to_end=False, sigma_min=model_sigma_min(model))
    finally:
        if step is not None:
            model.step = step
    print(f"[Calibrated Samplers] {labels()[name]}: calibrated this run's setting on first use, wrote {path}")
    return cal, path


def calibration_run(model, x, sigmas, extra_args, job, env, p):
    """Calibrate instead of sampling: the web UI has prepared the model and the negative prompt for this batch."""
    from calibrated_samplers import hosts
    from calibrated_samplers.calibration.end_to_end import normal_tensors, normal_weights
    from calibrated_samplers.calibration.entries import denoise_schedule, img2img_schedule
    sd_model = env.sd_model()
    _, family = model_family(sd_model)
    s0 = float(sigmas[0])
    start = start_state(family, env.sgm_noise_multiplier(), s0)
    noise = job.noise.to(x.device, x.dtype)
    batch = x.shape[0]
    # the web UI made the weights and the conditioning under inference mode; the end-to-end stage needs normal ones
    net = env.denoiser_module(sd_model)
    if net is not None:
        normal_weights(net)
    conds = [normal_tensors(env.conds(p, prompt, batch)) for prompt in job.prompts]
    fixed = {k: normal_tensors(v) for k, v in extra_args.items() if k not in ("cond",)}

    def denoiser(xs, sigma, prompt=0):
        return call_padded(model, xs, sigma, batch, cond=conds[prompt], **fixed)

    conditions = [{"prompt": k} for k in range(len(job.prompts))]

    def with_cfg(value):
        fixed["cond_scale"] = value
        return denoiser, conditions
    range_options = None if job.spread is None else {
        "schedule": env.schedule(p), "noise_scaling": start, "denoise_rules": (denoise_schedule, img2img_schedule)}
    hosts.run(job, denoiser, sigmas, start(s0, noise, noise.new_zeros(noise.shape)), noise, conditions, family,
              float(extra_args.get("cond_scale", 1.0)), model_fingerprint(sd_model), with_cfg, range_options,
              chunk_size=batch, sigma_min=model_sigma_min(model), network=net)
    return x


def torch_cat_pad(t, n):
    import torch
    return torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])


# ------------------------------------------------------------------------------------------ the web UI
class WebUI:
    """The web UI's state, read through its ``modules``."""

    def sd_model(self):
        from modules import shared
        return shared.sd_model

    def sgm_noise_multiplier(self):
        from modules import shared
        return bool(getattr(shared.opts, "sgm_noise_multiplier", False))

    def conds(self, p, prompt, batch):
        from modules import prompt_parser, shared
        prompts = prompt_parser.SdConditioning([prompt] * batch, width=p.width, height=p.height)
        return prompt_parser.get_multicond_learned_conditioning(shared.sd_model, prompts, p.steps)

    def first_use(self):
        """None, or the settings of first-use calibration when the web UI's option turns it on."""
        from modules import shared
        if not getattr(shared.opts, "calibrated_samplers_first_use", False):
            return None
        return {"batch_size": int(getattr(shared.opts, "calibrated_samplers_first_use_batch", 16)), "fine_steps": 6,
                "afs": bool(getattr(shared.opts, "calibrated_samplers_first_use_afs", False))}

    def schedule(self, p):
        """n -> the sigmas the web UI samples ``p`` on at n steps (its scheduler and options)."""
        from modules import sd_samplers
        sampler = sd_samplers.create_sampler(p.sampler_name, p.sd_model)
        return lambda n: sampler.get_sigmas(p, int(n)).cpu().double()

    def denoiser_module(self, sd_model):
        """The torch module that holds the denoiser's weights (Forge's unet model, A1111's model), or None."""
        forge = getattr(sd_model, "forge_objects", None)
        module = forge.unet.model if forge is not None else getattr(sd_model, "model", None)
        return module if hasattr(module, "modules") else None

    def schedulers(self):
        """The scheduler names and labels the web UI knows (its 'Schedule type' list)."""
        from modules import sd_schedulers
        return [s.label for s in sd_schedulers.schedulers] + [s.name for s in sd_schedulers.schedulers
                                                                if s.name != s.label]

    def folder(self):
        from modules import paths
        return os.path.join(paths.models_path, FOLDER)


def library_for(folder):
    from calibrated_samplers.calibration.library import Library

    def paths():
        if not os.path.isdir(folder):
            return []
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    return Library(paths)


def register(library, env):
    """Add the pack's samplers to the web UI's list once: Forge's add_sampler, else A1111's lists."""
    from calibrated_samplers.samplers import SAMPLERS
    from modules import sd_samplers, sd_samplers_common, sd_samplers_kdiffusion
    existing = {s.name for s in sd_samplers.all_samplers}
    added = []
    for name, label in labels().items():
        if label in existing:
            continue
        fn = make_sampler(name, library, env)
        options = {"second_order": True} if SAMPLERS[name].nfe_per_step == 2 else {}
        data = sd_samplers_common.SamplerData(
            label, lambda model, fn=fn: sd_samplers_kdiffusion.KDiffusionSampler(fn, model), [name], options)
        if hasattr(sd_samplers, "add_sampler"):
            sd_samplers.add_sampler(data)
        else:
            sd_samplers.all_samplers.append(data)
            sd_samplers.all_samplers_map[label] = data
        added.append(label)
    if added and not hasattr(sd_samplers, "add_sampler"):
        sd_samplers.set_samplers()
    return added


def calibrate_in_webui(env, method, steps, scheduler, cfg, width, height, prompts, negative_prompt="",
                       batch_size=32, fine_steps=10, seed=0, filename="", chunk_size=4, overwrite=False,
                       on_progress=None, more_steps="", cfg_list="", denoise_list="", end_to_end=True, afs=False):
    """Calibrate the loaded checkpoint (under the web UI's queue lock); returns (Calibration or CalibrationSet,
    path). ``on_progress(done, total)``: also told of each step of the work (the tab's progress bar).
    ``more_steps``, ``cfg_list``, ``denoise_list``: one file for several settings (calibration.requests); denoise
    values are fitted as img2img and as hires fix cut the schedule. ``afs``: the analytic first step (the file's
    runs make one model call fewer; txt2img only, so a denoise list below 1 is refused)."""
    import torch
    from modules import call_queue, processing, shared
    from calibrated_samplers import hosts
    from calibrated_samplers.calibration.progress import TimeLeft
    from calibrated_samplers.calibration.requests import (check_entries, check_request, output_path, parse_cfgs,
                                                          parse_denoises, parse_steps)
    calibrated = calibrated_methods()
    if method not in calibrated:
        raise ValueError(f"method must be one of {calibrated}, got {method!r}")
    prompts = [q for q in (prompts if isinstance(prompts, (list, tuple)) else [prompts]) if q and q.strip()]
    if not prompts:
        raise ValueError("give at least one prompt to calibrate on")
    filename = filename or f"{method}_{steps}_{scheduler}_cfg{cfg:g}"
    check_request(steps=steps, cfg=cfg, width=width, height=height, batch_size=batch_size, prompts=len(prompts),
                  filename=filename)
    spread = {"steps": parse_steps(more_steps, steps), "cfgs": parse_cfgs(cfg_list, cfg),
              "denoises": parse_denoises(denoise_list)}
    check_entries(**spread, afs=afs)  # refused now, not after the web UI has started its run
    if sum(len(v) for v in spread.values()) == 3:
        spread = None  # one setting: a plain file, as before
    known = env.schedulers()
    if scheduler not in known:  # the web UI would quietly run its Automatic instead, under this file's label
        raise ValueError(f"unknown scheduler {scheduler!r}: use one of {', '.join(known)}")
    folder = env.folder()
    path = output_path(folder, filename, overwrite)
    # one estimate for the web UI's text and the caller's (the tab's bar), which carries the planned evaluations
    g, left = torch.Generator().manual_seed(int(seed)), getattr(on_progress, "time_left", None) or TimeLeft()

    def progress(done, total):
        shared.state.sampling_step, shared.state.sampling_steps = done, total
        shared.state.textinfo = f"Calibrated Samplers: calibrating {method}, {left.text(done, total)}"
        if on_progress is not None:
            on_progress(done, total)
    progress.time_left = left  # where the host puts the planned evaluations (hosts.announce_plan)

    with call_queue.queue_lock:
        # again under the lock: a calibration to the same name may have finished while this one waited
        path = output_path(folder, filename, overwrite)
        if shared.sd_model is None:
            raise ValueError("no checkpoint is loaded")
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompts[0], negative_prompt=negative_prompt, steps=int(steps),
            cfg_scale=float(cfg), width=int(width), height=int(height), sampler_name=labels()[method],
            scheduler=scheduler, batch_size=max(1, min(int(chunk_size), int(batch_size))), n_iter=1, seed=int(seed),
            do_not_save_samples=True, do_not_save_grid=True)
        forge = getattr(shared.sd_model, "forge_objects", None)
        channels = int(forge.vae.latent_channels if forge is not None
                       else getattr(shared.sd_model, "latent_channels", 4))  # A1111's SD3: 16
        factor = 8  # as processing.py
        noise = torch.randn((int(batch_size), channels, int(height) // factor, int(width) // factor), generator=g)
        counts = spread["steps"] if spread else [steps]
        info = {"made_by": "web UI calibrate", "schedule": f"{scheduler}, {', '.join(map(str, counts))} steps",
                "seed": int(seed), "prompts": len(prompts), "latent_shape": list(noise.shape[1:])}
        fit_options = {"fine_steps": int(fine_steps), "end_to_end": bool(end_to_end)}
        if afs:  # only then: files made without it stay as they were
            fit_options["afs"] = True
        job = hosts.Job(method, noise, prompts, fit_options, info, progress, lambda: bool(shared.state.interrupted),
                        spread, announce=lambda text: print(f"[Calibrated Samplers] {method}: {text}"))
        started = time.time()
        run_job(job, p).save(path, replace=bool(overwrite))
    what = (f"{len(job.result)} calibrations: {job.result.summary()}" if spread else f"{steps} steps, cfg {cfg:g}")
    print(f"[Calibrated Samplers] wrote {path} ({job.result.method}, {scheduler}, {what}) "
          f"in {time.time() - started:.0f} s")
    for message in hosts.warnings_of(job.result):
        print(f"[Calibrated Samplers] {method}: {message}")
    return job.result, path


def run_job(job, p):
    """The web UI's own run of ``p`` with ``job`` pending: its sampler calibrates instead of sampling. Returns the
    result; raises InterruptedError where the web UI's Interrupt stopped it (then nothing is written)."""
    from modules import processing, shared
    from calibrated_samplers.calibration import CalibrationCancelled
    _pending.job = job
    shared.state.begin(job="calibrated_samplers")
    try:
        processing.process_images(p)
    except CalibrationCancelled:  # the interrupt came during the calibration, not before the web UI's sampling
        job.result = None
    finally:
        _pending.job = None
        shared.state.end()
    if job.result is None:
        raise InterruptedError("calibration was interrupted: nothing was written")
    return job.result


def add_api(app, env, library):
    from fastapi import HTTPException
    from pydantic import BaseModel

    class CalibrateRequest(BaseModel):
        method: str = "iia_dpmpp_2m"
        steps: int = 8
        scheduler: str = "Karras"
        cfg: float = 5.0
        width: int = 512
        height: int = 512
        prompts: list[str] = ["a photo"]
        negative_prompt: str = ""
        batch_size: int = 32
        fine_steps: int = 10
        seed: int = 0
        filename: str = ""
        chunk_size: int = 4
        overwrite: bool = False
        more_steps: str = ""
        cfg_list: str = ""
        denoise_list: str = ""
        end_to_end: bool = True
        afs: bool = False

    def calibrate_route(req: CalibrateRequest):
        from calibrated_samplers import hosts
        from calibrated_samplers.calibration.file import CalibrationSet
        try:
            result, path = calibrate_in_webui(env, **req.dict())
        except InterruptedError as e:
            raise HTTPException(status_code=409, detail=str(e))
        except (ValueError, FileExistsError) as e:
            raise HTTPException(status_code=400, detail=str(e))
        cal = result.primary() if isinstance(result, CalibrationSet) else result
        return {"file": os.path.basename(path), "path": path, "hash": file_hash(path), "method": cal.method,
                "entries": len(result) if isinstance(result, CalibrationSet) else 1,
                "serves": result.summary() if isinstance(result, CalibrationSet) else None,
                "sigmas": [float(s) for s in cal.sigmas], "fingerprint": cal.info.get("fingerprint"),
                "residual_before": None if cal.residual_before is None else cal.residual_before.tolist(),
                "residual_after": None if cal.residual_after is None else cal.residual_after.tolist(),
                "warnings": hosts.warnings_of(result)}

    def list_route():
        return [{"file": os.path.basename(p), "method": getattr(c, "method", None),
                 "error": str(c) if isinstance(c, Exception) else None} for p, c in library.entries()]

    app.add_api_route("/calibrated-samplers/calibrate", calibrate_route, methods=["POST"])
    app.add_api_route("/calibrated-samplers/files", list_route, methods=["GET"])


def run_from_tab(env, label, steps, scheduler, cfg, width, height, prompts, negative, batch_size, fine_steps, seed,
                 filename, overwrite, progress=None, more_steps="", cfg_list="", denoise_list="", afs=False):
    """The tab's Calibrate button: the method by its name in the sampler list, prompts one per line;
    returns (message, residual picture or None). ``progress(fraction, desc=...)``: Gradio's progress bar."""
    from calibrated_samplers import hosts
    from calibrated_samplers.calibration.picture import residual_image
    from calibrated_samplers.calibration.progress import TimeLeft
    names = labels()
    method = {v: k for k, v in names.items()}.get(label, label)

    left = TimeLeft()

    def on_progress(done, total):
        if progress is not None and total:
            progress(done / total, desc=f"calibrating {names.get(method, method)}: {left.text(done, total)}")
    on_progress.time_left = left
    try:
        result, path = calibrate_in_webui(env, method, steps, scheduler, cfg, width, height, prompts.splitlines(),
                                          negative, batch_size, fine_steps, seed, filename, overwrite=overwrite,
                                          on_progress=on_progress, more_steps=more_steps, cfg_list=cfg_list,
                                          denoise_list=denoise_list, afs=bool(afs))
    except (ValueError, FileExistsError, InterruptedError) as e:
        return f"Not calibrated: {e}", None
    warned = "".join(f" Warning: {m}." for m in hosts.warnings_of(result))
    if hasattr(result, "entries"):
        return (f"Wrote {path}: {len(result)} calibrations, {result.summary()}{warned}",
                (residual_image(result.primary()).numpy() * 255).astype("uint8"))
    return f"Wrote {path}{warned}", (residual_image(result).numpy() * 255).astype("uint8")


def ui_tab(env):
    """The 'Calibrated Samplers' tab: the same calibration as the API route, for people."""
    import gradio as gr
    from modules import sd_schedulers, shared
    names = labels()
    methods = [names[m] for m in calibrated_methods()]  # as the sampler list shows them
    schedulers = [s.label for s in sd_schedulers.schedulers]

    def run(method, steps, scheduler, cfg, width, height, prompts, negative, batch_size, fine_steps, seed, filename,
            overwrite, more_steps, cfg_list, denoise_list, afs, progress=gr.Progress()):
        return run_from_tab(env, method, steps, scheduler, cfg, width, height, prompts, negative, batch_size,
                            fine_steps, seed, filename, overwrite, progress, more_steps, cfg_list, denoise_list, afs)

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column():
                method = gr.Dropdown(methods, value=names["iia_dpmpp_2m"], label="Method")
                steps = gr.Slider(1, 50, value=8, step=1, label="Steps")
                scheduler = gr.Dropdown(schedulers, value="Karras" if "Karras" in schedulers else schedulers[0], label="Schedule type")
                cfg = gr.Slider(1, 30, value=5.0, step=0.5, label="CFG scale (sample at this one)")
                width = gr.Slider(64, 2048, value=512, step=8, label="Width")
                height = gr.Slider(64, 2048, value=512, step=8, label="Height")
                prompts = gr.Textbox(lines=4, label="Prompts (one per line)")
                negative = gr.Textbox(label="Negative prompt")
                batch_size = gr.Slider(3, 256, value=32, step=1, label="Noises")
                fine_steps = gr.Slider(1, 50, value=10, step=1, label="Reference sub-steps per step")
                seed = gr.Number(value=0, precision=0, label="Seed")
                filename = gr.Textbox(label="File name (models/calibrated_samplers/<name>.safetensors)")
                overwrite = gr.Checkbox(False, label="Overwrite")
                afs = gr.Checkbox(False, label="Analytic first step (the first step calls no model: one call fewer "
                                         "per image; txt2img only)")
                with gr.Accordion("More settings in the same file (each costs a calibration)", open=False):
                    more_steps = gr.Textbox(label="More step counts (e.g. 4-12 or 6, 10, 20)")
                    cfg_list = gr.Textbox(label="CFG values (e.g. 3, 5.5, 8, or 3-8 for three): between them it "
                                                "interpolates")
                    denoise_list = gr.Textbox(label="Denoising strengths for img2img and hires fix (e.g. 1, 0.7, 0.5)")
                with gr.Row():
                    go = gr.Button("Calibrate", variant="primary")
                    stop = gr.Button("Interrupt")
            with gr.Column():
                status = gr.Textbox(label="Result")
                picture = gr.Image(label="Held-out error per step and at the end, base and calibrated")
        go.click(run, [method, steps, scheduler, cfg, width, height, prompts, negative, batch_size, fine_steps, seed,
                       filename, overwrite, more_steps, cfg_list, denoise_list, afs], [status, picture])
        # the calibration checks the web UI's interrupt flag between chunks and then writes nothing
        stop.click(lambda: shared.state.interrupt(), [], [])
    return [(tab, "Calibrated Samplers", "calibrated_samplers")]


def add_settings():
    import gradio as gr
    from modules import shared
    section = ("calibrated_samplers", "Calibrated Samplers")
    shared.opts.add_option("calibrated_samplers_first_use", shared.OptionInfo(
        False, "Calibrate on first use: a txt2img run with a calibrated sampler that no file fits is calibrated on its "
        "own prompt, cfg and schedule first (slower once), saved, then sampled", section=section))
    shared.opts.add_option("calibrated_samplers_first_use_batch", shared.OptionInfo(
        16, "Noises for a first-use calibration", gr.Slider, {"minimum": 3, "maximum": 256, "step": 1},
        section=section))
    shared.opts.add_option("calibrated_samplers_first_use_afs", shared.OptionInfo(
        False, "First-use calibrations with the analytic first step (one model evaluation fewer per image at the same "
        "steps; a file already saved for the setting is used as it is)", section=section))


def setup():
    """Runs when the web UI imports this file; a no-op anywhere else."""
    try:
        from modules import script_callbacks, sd_samplers  # noqa: F401
    except ImportError:
        return None
    load_pack()
    env = WebUI()
    library = library_for(env.folder())
    os.makedirs(env.folder(), exist_ok=True)
    added = register(library, env)
    script_callbacks.on_app_started(lambda demo, app: add_api(app, env, library))
    script_callbacks.on_ui_tabs(lambda: ui_tab(env))
    add_settings()  # now, not in on_ui_settings: an API-only web UI never builds the settings page
    if added:
        print(f"[Calibrated Samplers] added {len(added)} samplers; calibrations in {env.folder()}")
    return added


setup()
