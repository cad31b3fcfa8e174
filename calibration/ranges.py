"""Range calibration: one file (a CalibrationSet) that serves several step counts, denoise values and a cfg range
(which entry serves a run: entries.py).

``calibrate_range`` fits every (steps, denoise, cfg) entry with ``calibrate``. At full denoise every step count
starts from the same noise, so one teacher solve per cfg serves them all: it is run once over the union of the
schedules' sigmas (``SharedTeacher``, sub-stepped as finely as the densest schedule's own teacher would be) and
every entry reads its targets from it. Below full denoise the run starts from an image plus noise: the images are
``data`` if given, else samples of the model itself at that cfg (the set's longest full-denoise entry, or the base
solver on a fine schedule), re-noised with noise independent of the noise that made them.
"""
import time

import torch

from ..samplers import SAMPLERS, Family
from .batch import check_cancel, split_chunks
from .engine import calibrate, plan
from .entries import denoise_schedule
from .file import CalibrationSet
from .requests import check_afs, check_request
from .teacher import SharedTeacher


# --------------------------------------------------------------------------------------------------
# Fitting a range
# --------------------------------------------------------------------------------------------------

def _noised(x0, noise, sigma, family):
    return Family.of(family).alpha(float(sigma)) * x0 + float(sigma) * noise


def _checked(sampler, steps, denoises, cfgs, afs):
    """The step counts (ascending), denoise values (descending) and cfgs (in order, once each), after checking."""
    steps = sorted({int(n) for n in steps})
    denoises = sorted({1.0 if d is None else float(d) for d in denoises}, reverse=True)
    cfgs = list(dict.fromkeys(None if c is None else float(c) for c in cfgs))
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be whole numbers of at least 1, got {steps}")
    if not denoises or not all(0 < d <= 1 for d in denoises):
        raise ValueError(f"denoise values must be in (0, 1], got {denoises}")
    check_afs(denoises, afs)
    if SAMPLERS.get(sampler) is None or SAMPLERS[sampler].kind == "plain":
        raise ValueError(f"{sampler!r} is not a calibrated sampler")
    return steps, denoises, cfgs


def calibrate_range(model, schedule, sampler, noise, extra_args=None, *, steps=(8,), cfgs=(None,), denoises=(1.0,),
                    with_cfg=None, data=None, noise_scaling=None, denoise_rules=(denoise_schedule,), family=None,
                    shift=None, fine_steps=10, share_teacher=True, chunk_size=32, holdout=0.25, sigma_min=None,
                    progress=None, cancel=None, info=None, **settings):
    """Fit ``sampler`` at every step count in ``steps``, denoise in ``denoises`` and cfg in ``cfgs``; returns a
    CalibrationSet (or the one Calibration when there is a single entry).

    ``schedule(n)``: the n-step sigmas of the scheduler the user samples with (denoise is applied here, as ComfyUI
    does: ``denoise_schedule``). ``noise``: unit-normal noise (N, ...), scaled here to each schedule's first sigma.
    ``with_cfg(cfg) -> (model, extra_args)``: the model and conditions at a cfg (default: ``model`` and ``extra_args``
    whatever the cfg, which is then only recorded). ``data``: clean latents (N, ...) for denoise below 1 (default: the
    model's own samples). ``noise_scaling(sigma, noise, image)``: a run's start state (default alpha(sigma) * image +
    sigma * noise; ComfyUI's model_sampling.noise_scaling scales pure noise at the schedule's maximum sigma
    differently). ``denoise_rules``: how a UI cuts a schedule for denoise below 1 (``denoise_schedule``: ComfyUI and
    hires fix; ``img2img_schedule``: the web UIs' img2img); each distinct schedule they give is an entry.
    ``share_teacher``: one teacher solve per cfg for all full-denoise step counts. The remaining keywords are
    ``calibrate``'s, used for every entry; each entry's ``info`` records its cfg, steps and denoise.
    """
    steps, denoises, cfgs = _checked(sampler, steps, denoises, cfgs, settings.get("afs"))
    fam = Family.of(family, shift)
    noise = noise.detach()
    first_args = extra_args if with_cfg is None or cfgs[0] is None else with_cfg(cfgs[0])[1]
    check_request(batch_size=int(noise.shape[0]), holdout=holdout,
                  prompts=len(first_args) if isinstance(first_args, (list, tuple)) else 1)
    start = noise_scaling or (lambda sigma, n, image: _noised(image, n, sigma, fam))
    schedules = _schedules(schedule, steps, denoises, denoise_rules)
    full = [sig for d, _, sig in schedules if d == 1.0]
    # every full-denoise schedule starts from the same state when they share a first sigma: one teacher for all
    shared = share_teacher and len(full) > 1 and all(
        abs(float(sig[0]) - float(full[0][0])) <= 1e-9 * float(full[0][0]) for sig in full)
    started = time.perf_counter()
    total = len(cfgs) * (len(schedules) + (1 if shared else 0))
    done = [0]

    def part():  # one job's progress, as a share of all of them
        return None if progress is None else (lambda a, b: progress(done[0] * 1000 + int(1000 * a / max(b, 1)),
                                                                     total * 1000))

    entries, shared_evaluations, dedicated_teacher, per_sample = [], 0.0, 0.0, 0.0
    for cfg in cfgs:
        m, args = (model, extra_args) if with_cfg is None or cfg is None else with_cfg(cfg)
        conditions = list(args) if isinstance(args, (list, tuple)) else [args or {}]
        teacher = None
        if shared:
            teacher = SharedTeacher(m, start(full[0][0], noise, torch.zeros_like(noise)), conditions, full,
                                    SAMPLERS[sampler].base, fine_steps, fam, sigma_min, chunk_size, holdout, part(),
                                    cancel)
            shared_evaluations += teacher.evaluations
            done[0] += 1
        clean = None
        for d, n, sig in schedules:
            check_cancel(cancel)
            if d < 1.0 and clean is None:
                clean = _clean_latents(m, conditions, noise, schedule, steps, entries, cfg, sampler, fam,
                                       fine_steps, chunk_size, data, holdout, start)
                per_sample += clean[1]
            # below full denoise: a clean image (``data`` or the model's own) re-noised with other noise than made it
            states = (start(sig[0], noise.roll(1, 0), clean[0]) if d < 1.0 else
                      start(sig[0], noise, torch.zeros_like(noise)))
            use = teacher if (teacher is not None and d == 1.0 and teacher.covers(sig)) else None
            meta = dict(info or {}, cfg=cfg, steps=n, denoise=d)
            cal = calibrate(m, sig, sampler, states, conditions, family=fam.name, shift=fam.shift,
                            fine_steps=fine_steps, chunk_size=chunk_size, holdout=holdout, sigma_min=sigma_min,
                            progress=part(), cancel=cancel, info=meta, shared_teacher=use, **settings)
            per_sample += cal.info["model_evaluations_per_sample"]
            if use is not None:
                dedicated_teacher += use.dedicated_cost(n)
            entries.append(cal)
            done[0] += 1
    per_sample += shared_evaluations
    summary = dict(info or {}, steps=steps, cfgs=cfgs, denoises=denoises, fine_steps=int(fine_steps),
                   batch=int(noise.shape[0]), model_evaluations_per_sample=round(per_sample, 2),
                   shared_teacher_evaluations_per_sample=round(shared_evaluations, 2),
                   teacher_evaluations_saved_per_sample=round(dedicated_teacher - shared_evaluations, 2),
                   seconds=round(time.perf_counter() - started, 3))
    if len(entries) == 1:
        entries[0].info.update(model_evaluations_per_sample=per_sample)
        return entries[0]
    return CalibrationSet(entries, summary)


def plan_range(schedule, sampler, noises, extra_args=None, *, steps=(8,), cfgs=(None,), denoises=(1.0,),
               denoise_rules=(denoise_schedule,), with_cfg=None, data=None, noise_scaling=None, share_teacher=True,
               **keywords):
    """What ``calibrate_range`` with these arguments will spend, before any model call: ``engine.plan``'s dict summed
    over the entries, each planned as a calibration of its own (a shared teacher spends less; the model's own
    samples that start runs below full denoise, one sampling run per noise and cfg, are not counted)."""
    steps, denoises, cfgs = _checked(sampler, steps, denoises, cfgs, keywords.get("afs"))
    plans = [plan(sig, sampler, noises, extra_args, **keywords)
             for _, _, sig in _schedules(schedule, steps, denoises, denoise_rules)] * len(cfgs)
    stages = {}
    for p in plans:
        for name, spent in p["stages"].items():
            stages[name] = stages.get(name, 0.0) + spent
    per_noise = sum(p["per_noise"] for p in plans)
    return {"stages": stages, "per_noise": per_noise, "noises": int(noises), "total": per_noise * int(noises),
            "upper_bound": True, "entries": len(plans), "time_limit": plans[0]["time_limit"]}


def _schedules(schedule, steps, denoises, rules):
    """(denoise, steps, sigmas) for every distinct schedule the rules make."""
    out = []
    for d in denoises:
        for n in steps:
            for rule in (rules if d < 1.0 else rules[:1]):
                sig = rule(schedule, n, d)
                if not any(len(sig) == len(o[2]) and torch.allclose(sig, o[2], rtol=1e-9, atol=0) for o in out):
                    out.append((d, n, sig))
    return out


def _clean_latents(model, conditions, noise, schedule, steps, entries, cfg, sampler, family, fine_steps,
                   chunk_size, data, holdout, start):
    """(images, evaluations per sample) to start denoise < 1 runs from: ``data``, else the model's own samples."""
    if data is not None:
        return torch.as_tensor(data).expand_as(noise).to(noise.dtype), 0.0
    fn = SAMPLERS[sampler]
    done = [c for c in entries if c.info.get("cfg") == cfg and c.info.get("denoise") == 1.0]
    if done:
        calibration = max(done, key=lambda c: c.steps)
        sig = calibration.sigmas
    else:  # no full-denoise entry to sample with: the base solver on a fine schedule
        sig = torch.as_tensor(schedule(max(steps) * max(2, fine_steps // 2)), dtype=torch.float64)
        calibration = None
    out = torch.empty_like(noise)
    calls = 0
    for ch in split_chunks(noise.shape[0], len(conditions), holdout, chunk_size):
        with torch.no_grad():
            x = start(sig[0], noise[ch.sl], torch.zeros_like(noise[ch.sl]))
            out[ch.sl] = fn(model, x, sig, extra_args=conditions[ch.group], disable=True,
                            calibration=calibration, family=family.name, shift=family.shift).to(out.dtype)
        calls += fn.evaluations(sig) * ch.n
    return out, calls / noise.shape[0]
