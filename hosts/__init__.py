"""What ComfyUI and the web UIs do with the pack, written once. Each UI's adapter (``nodes/runtime.py``,
``scripts/calibrated_samplers.py``) says only what is its own: how it scales a start state, calls its denoiser,
reports progress, shows a warning, cancels, and names its samplers and schedulers.

- ``find``: the file a sampling run uses, or a first-use fit where no file fits the run (or only one fitted at
  another image size), and what to warn of;
- ``first_use``: that fit, on the run's own model and setting, saved where the next run finds it;
- ``Job`` and ``run``: a Calibrate node's or tab's request, which the UI's sampling picks up instead of sampling
  (the UI has then prepared the model and the prompts), fitted as one file or as a range file.

``sigma_min`` (the smallest sigma the model is defined at) is passed by both UIs wherever their model says it:
ComfyUI's ``model_sampling.sigma_min``, the web UIs' k-diffusion wrapper's ``sigma_min``. A sampler's step into
sigma = 0 denoises at the last positive sigma, so the teacher must end there too rather than integrate below the
model's smallest sigma, where a discrete model is queried outside what it was trained on.
"""
import logging
import os

import torch

from ..calibration import calibrate
from ..calibration.engine import plan
from ..calibration.progress import planned_text
from ..calibration.library import first_use_path, no_match_message, other_size, short_no_match, size_note
from ..calibration.ranges import calibrate_range, plan_range
from ..samplers import SAMPLERS

log = logging.getLogger("calibrated_samplers")


def find(name, library, sigmas, family, fingerprint, cfg, shape, fit=None):
    """(calibration, path, notes, warnings) for a run of ``name`` with latents of ``shape`` (no batch). With
    ``fit`` (() -> (calibration, path)), a run no file fits, or whose file was fitted at another image size (it did
    measurably worse: library.SIZE_TOLERANCE), is fitted now. ``notes`` say why no file fitted; ``warnings``, for
    the console, name unreadable files and a size mismatch."""
    calibration, path, notes = library.find(name, sigmas, family, fingerprint, cfg, shape)
    damaged = library.unreported_damage()  # named in the no-match message, or in the warnings
    if calibration is not None and fit is not None and other_size(calibration, shape):
        log.info("[Calibrated Samplers] %s: %s was fitted at another image size; calibrating this one", name,
                 os.path.basename(path))
        calibration = None
    if calibration is None and fit is not None:
        calibration, path = fit()
    if calibration is None:
        return None, None, notes, []
    size_warning = size_note(calibration, shape, os.path.basename(path))
    return calibration, path, notes, damaged + ([size_warning] if size_warning else [])


def missing(name, sigmas, cfg, notes, how, fix, shown=None, shown_short=None):
    """(console message, short message) for a run of ``name`` that no file fits: ``how`` (console) and ``fix`` (the
    UI's words) say what to do; ``shown``, ``shown_short``: the sampler as the UI names it."""
    shown = shown or name
    return (no_match_message(shown, SAMPLERS[name].uncalibrated, sigmas, cfg, notes, how),
            short_no_match(shown_short or shown, sigmas, cfg, notes, fix))


def first_use_noise(batch_size, shape, seed, like):
    """The first-use fit's noises: ``batch_size`` unit normals of ``shape`` from ``seed``, as ``like``'s device and
    dtype (the same on every UI and device)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((int(batch_size),) + tuple(shape), generator=g).to(like.device, like.dtype)


def first_use(method, denoiser, sigmas, states, *, folder, cfg, fingerprint, shape, afs=False, info=None,
              **options):
    """Calibrate ``method`` on a run's own setting from ``states`` (its start states), save it in ``folder`` under
    the name the next run at this setting finds, and return (calibration, path). Two runs that fit the same setting
    at once are both valid: the first file written stays. ``options``: ``calibrate``'s."""
    path = first_use_path(folder, method, sigmas, cfg, fingerprint["id"], afs, tuple(shape))
    log.info("[Calibrated Samplers] %s: no file fits this run; calibrating it now on %d noises (saved as %s)",
             method, states.shape[0], os.path.basename(path))
    if afs:  # only then: files made without it stay as they were
        options["afs"] = True
    say_plan(method, plan(sigmas, method, states.shape[0], **options), options.get("progress"))
    info = dict(info or {}, cfg=cfg, fingerprint=fingerprint["id"], fingerprint_detail=fingerprint,
                latent_shape=list(shape))
    cal = calibrate(denoiser, sigmas, method, states, info=info, **options)
    try:
        cal.save(path, replace=False)
    except FileExistsError:
        pass
    return cal, path


def warnings_of(result):
    """What a user must hear about a finished calibration (a Calibration or a range's CalibrationSet): each stage
    that was skipped and why (the end-to-end stage where the device's memory could not hold it), once each."""
    entries = getattr(result, "entries", [result])
    found = [e.info.get("end_to_end", {}).get("skipped") for e in entries]
    return list(dict.fromkeys(m for m in found if m))


class Job:
    """A calibration request that the UI's sampling picks up instead of sampling. ``prompts``: what the UI's adapter
    makes its conditions from; ``spread``: None, or ``calibrate_range``'s steps, cfgs, denoises (and what the UI adds
    to them); ``first_noise``: the noises the UI's sampling was started with, where it scales them (ComfyUI);
    ``announce(text)``: where the UI's console says what the job will spend, if not the logger's info."""

    def __init__(self, method, noise, prompts, fit_options, info, progress=None, cancel=None, spread=None,
                 first_noise=None, announce=None):
        self.method, self.noise, self.prompts, self.fit_options, self.info = method, noise, prompts, fit_options, info
        self.progress, self.cancel, self.spread, self.first_noise = progress, cancel, spread, first_noise
        self.announce = announce
        self.result = self.planned = None


def announce_plan(job, sigmas, conditions, spread, options):
    """Say what ``job`` will spend before it starts (the console; the UI's progress text, where its ``progress``
    carries a ``time_left``: calibration.progress.TimeLeft), and keep it as ``job.planned``."""
    if spread is None:
        planned = plan(sigmas, job.method, job.noise.shape[0], conditions, **options)
    else:
        spread = dict(spread)
        planned = plan_range(spread.pop("schedule"), job.method, job.noise.shape[0], conditions, **spread, **options)
    job.planned = planned
    say_plan(job.method, planned, job.progress, job.announce)
    return planned


def say_plan(method, planned, progress, announce=None):
    """``planned`` (engine.plan's dict) in words: to ``announce`` (else the logger), and as the note of the UI's
    progress text where ``progress`` carries a ``time_left`` (calibration.progress.TimeLeft)."""
    text = planned_text(planned)
    if announce is not None:
        announce(text)
    else:
        log.info("[Calibrated Samplers] %s: %s", method, text)
    left = getattr(progress, "time_left", None)
    if left is not None:
        left.note = text


def run(job, denoiser, sigmas, states, noise, conditions, family, cfg, fingerprint, with_cfg, range_options=None,
        **options):
    """Fit ``job`` (one Calibration from ``states``, or a range file from the unit ``noise``) with ``denoiser`` and
    ``conditions`` at the run's ``cfg``; sets and returns ``job.result``. ``with_cfg(value) -> (denoiser,
    conditions)`` sets the UI's guidance for a range file, and is set back to ``cfg`` after; ``range_options``: what
    the UI adds to ``calibrate_range`` (its schedule, start states, denoise rules); ``options``: both fits'."""
    info = dict(job.info, cfg=cfg, fingerprint=fingerprint["id"], fingerprint_detail=fingerprint)
    common = dict(family=family.name, shift=family.shift, progress=job.progress, cancel=job.cancel, **options)
    spread = None if job.spread is None else dict(job.spread, **(range_options or {}))
    announce_plan(job, sigmas, conditions, spread, dict(options, family=family.name, shift=family.shift,
                                                        **job.fit_options))
    if job.spread is None:
        job.result = calibrate(denoiser, sigmas, job.method, states, conditions, info=info, **common,
                               **job.fit_options)
        return job.result
    try:
        job.result = calibrate_range(denoiser, spread.pop("schedule"), job.method, noise, with_cfg=with_cfg,
                                     info=dict(info, primary={"steps": len(sigmas) - 1, "cfg": cfg}), **common,
                                     **spread, **job.fit_options)
    finally:
        with_cfg(cfg)
    return job.result
