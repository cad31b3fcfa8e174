"""Range calibration: one file (a CalibrationSet) that serves several step counts, denoise values and a cfg range.

A run's schedule (its sigmas) picks the entries fitted for it: the step count and denoise are in the sigmas, so
no other key is needed and a schedule the set was not fitted for is never served by a near one. Among those
entries the run's cfg picks one fitted at that cfg, or the two fitted cfgs around it, whose parameters (and
learned time steps) are interpolated linearly in cfg; outside the fitted cfg range nothing is served and the
reason says which range was fitted.

``calibrate_range`` fits every (steps, denoise, cfg) entry with ``calibrate``. At full denoise every step count
starts from the same noise, so one teacher solve per cfg serves them all: it is run once over the union of the
schedules' sigmas (``SharedTeacher``, sub-stepped as finely as the densest schedule's own teacher would be) and
every entry reads its targets from it. Below full denoise the run starts from an image plus noise: the images are
``data`` if given, else samples of the model itself at that cfg (the set's longest full-denoise entry, or the base
solver on a fine schedule), re-noised with noise independent of the noise that made them.
"""
import math
import time

import torch

from ..samplers import SAMPLERS, CalibrationMismatch, Family
from ..samplers import base as B
from ..samplers._core import HISTORY_KEPT, Denoiser, check_calibration, prepare, sigma_list
from .engine import CalibrationCancelled, _chunks, _sub_solve, _take, calibrate
from .file import Calibration, CalibrationSet
from .library import CFG_TOLERANCE
from .requests import check_afs, check_request


def denoise_schedule(schedule, steps, denoise=1.0):
    """The sigmas of ``steps`` steps at ``denoise``, as ComfyUI's KSampler and BasicScheduler (and the web UIs' hires
    fix) make them: the last ``steps + 1`` sigmas of the schedule for int(steps / denoise) steps. ``schedule(n)``
    gives n-step sigmas."""
    if denoise is None or denoise >= 1.0:
        return torch.as_tensor(schedule(steps), dtype=torch.float64)
    if not 0.0 < denoise:
        raise ValueError(f"denoise must be above 0, got {denoise}")
    full = torch.as_tensor(schedule(int(steps / min(denoise, 0.999))), dtype=torch.float64)
    return full[-(steps + 1):]


def img2img_schedule(schedule, steps, denoise=1.0):
    """The sigmas of A1111/Forge img2img at ``steps`` and ``denoise`` (without "fixed steps"): the last
    int(denoise * steps) + 1 steps of the ``steps``-step schedule. (Their hires fix cuts as ComfyUI does.)"""
    full = torch.as_tensor(schedule(steps), dtype=torch.float64)
    if denoise is None or denoise >= 1.0:
        return full
    kept = int(min(denoise, 0.999) * steps)
    return full[steps - kept - 1:]


def _span(values, fmt="{:g}"):
    values = sorted(set(values))
    if len(values) > 2 and all(b - a == 1 for a, b in zip(values, values[1:])):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(fmt.format(v) for v in values)


def describe_entries(entries):
    """"steps 4-12 at denoise 1, cfg 3-8 (3 fitted values)" for a list of Calibrations."""
    steps = [c.steps for c in entries]
    denoise = [float(c.info.get("denoise", 1.0)) for c in entries]
    cfgs = sorted({float(c.info["cfg"]) for c in entries if c.info.get("cfg") is not None})
    cfg_text = "any cfg" if not cfgs else (f"cfg {cfgs[0]:g}" if len(cfgs) == 1 else
                                           f"cfg {cfgs[0]:g}-{cfgs[-1]:g} ({len(cfgs)} fitted values)")
    return f"steps {_span(steps)} at denoise {_span(denoise)}, {cfg_text}"


def interpolate(low, high, cfg):
    """The calibration for ``cfg`` between two entries fitted at cfgs around it (same schedule): every parameter
    and learned time step linear in cfg."""
    c0, c1 = float(low.info["cfg"]), float(high.info["cfg"])
    w = (float(cfg) - c0) / (c1 - c0)
    params = {}
    for k in set(low.params) | set(high.params):
        a, b = low.params.get(k), high.params.get(k)
        if a is None or b is None:  # an IIA time scale one side did not learn: the other side's default is 1
            a = torch.ones_like(b) if a is None else a
            b = torch.ones_like(a) if b is None else b
        params[k] = (1 - w) * a + w * b
    learned = None
    if low.sample_sigmas is not None or high.sample_sigmas is not None:
        # a convex mix of two decreasing schedules with the same ends is decreasing with the same ends
        learned = (1 - w) * low.sampling_sigmas + w * high.sampling_sigmas
    info = dict(low.info, cfg=float(cfg), interpolated={"cfg": [c0, c1], "weight": round(w, 6)})
    return Calibration(low.method, low.sigmas, params, low.family, low.shift, low.options, info, sample_sigmas=learned)


def select(cset, sigmas, family=None, cfg=None):
    """(Calibration, None) for the run, or (None, why). ``cfg`` None accepts any fitted cfg (the middle one)."""
    sig = sigma_list(sigmas) if torch.is_tensor(sigmas) else [float(s) for s in sigmas]
    fam = Family.of(cset.family if family is None else family)
    fitting = []
    for cal in cset.entries:
        try:
            check_calibration(cal, cset.method, sig, fam)
            fitting.append(cal)
        except CalibrationMismatch as e:
            if str(e).startswith("calibration is for a"):  # the family: the same for every entry
                return None, str(e)
    if not fitting:
        return None, (f"holds {describe_entries(cset.entries)}; none was fitted for this run's schedule "
                      f"({len(sig) - 1} steps, sigmas {sig[0]:.4g} ... {sig[-1]:.4g}): use one of those step "
                      "counts and denoise values with the scheduler it was made with, or calibrate for this one")
    fitted = sorted(((float(c.info["cfg"]), c) for c in fitting if c.info.get("cfg") is not None),
                    key=lambda p: p[0])
    if cfg is None:
        return (fitted[len(fitted) // 2][1] if fitted else fitting[-1]), None
    if not fitted:
        return None, "records no cfg"
    cfg = float(cfg)
    for made, cal in fitted:
        if abs(made - cfg) <= CFG_TOLERANCE:
            return cal, None
    below = [p for p in fitted if p[0] < cfg]
    above = [p for p in fitted if p[0] > cfg]
    if not below or not above:
        span = f"cfg {fitted[0][0]:g}" if len(fitted) == 1 else f"cfg {fitted[0][0]:g}-{fitted[-1][0]:g}"
        return None, (f"was fitted for {span} at this schedule, this run uses cfg {cfg:g}: use a cfg in that "
                      "range, or calibrate a range that includes it")
    low, high = below[-1][1], above[0][1]
    if low.options != high.options:  # fitted with different solver options: no mix of the two is either
        return (low if cfg - below[-1][0] <= above[0][0] - cfg else high), None
    return interpolate(low, high, cfg), None


# --------------------------------------------------------------------------------------------------
# One teacher solve for every step count
# --------------------------------------------------------------------------------------------------

class SharedTeacher:
    """The base solver's fine solve from one batch of initial states through the union of several schedules'
    sigmas, kept at every one of them, so calibrations of those schedules read their targets from it.

    Each interval of the union lies inside one interval of the densest schedule and gets as many sub-steps as
    its share of that interval's ``fine_steps`` (at least one), so no schedule's targets are coarser than its
    own teacher's would be.
    """

    def __init__(self, model, states, conditions, schedules, base, fine_steps, family, sigma_min=None,
                 chunk_size=32, holdout=0.25, progress=None, cancel=None):
        self.fine_steps = int(fine_steps)
        self.points = sorted({float(s) for sig in schedules for s in sig}, reverse=True)
        densest = max(schedules, key=len)
        dense = [float(s) for s in densest]
        fam = Family.of(family)
        step_fn = B.BASE_STEPS[base][0]
        options = {"variable_step": True} if base in ("ipndm", "spndm") else {}
        x_all, _ = prepare(states)
        chunks = _chunks(x_all.shape[0], len(conditions), holdout, chunk_size)
        self.states = {self.points[0]: x_all.clone()}
        for s in self.points[1:]:
            self.states[s] = torch.empty_like(x_all)
        self.evaluations = 0  # per sample
        sub_steps = [self._sub_steps(a, b, dense) for a, b in zip(self.points, self.points[1:])]
        total, done = len(chunks) * len(sub_steps), 0
        for ch in chunks:
            x, hist = x_all[ch.sl], []
            ev = Denoiser(model, x, torch.tensor(self.points, dtype=torch.float64), conditions[ch.group])
            for (a, b), n in zip(zip(self.points, self.points[1:]), sub_steps):
                if cancel is not None and cancel():
                    raise CalibrationCancelled("calibration cancelled; nothing was saved")
                x, hist = _sub_solve(step_fn, ev, x, a, b, n, hist, fam, options, sigma_min)
                hist = _take(hist[-HISTORY_KEPT:], slice(None), x.device)
                self.states[b][ch.sl] = x
                done += 1
                if progress is not None:
                    progress(done, total)
            self.evaluations += ev.calls * ch.n
        self.evaluations /= x_all.shape[0]
        self.per_sub_step = self.evaluations / max(1, sum(sub_steps))

    def _sub_steps(self, a, b, dense):
        for hi, lo in zip(dense, dense[1:]):
            if hi >= a and b >= lo:
                if b <= 0:  # into sigma = 0: sub-stepped as every schedule's own teacher does it
                    return self.fine_steps
                share = math.log(a / b) / math.log(hi / (lo if lo > 0 else b))
                return max(1, math.ceil(self.fine_steps * share - 1e-9))
        raise ValueError(f"sigma interval [{a}, {b}] lies outside the densest schedule")

    def _point(self, sigma):
        """The kept sigma equal to ``sigma`` (up to rounding), or None."""
        sigma = float(sigma)
        return next((p for p in self.states if abs(p - sigma) <= 1e-12 * max(1.0, p)), None)

    def covers(self, sigmas):
        return all(self._point(s) is not None for s in sigmas)

    def at(self, sigma):
        p = self._point(sigma)
        if p is None:
            raise KeyError(f"the shared teacher has no state at sigma {float(sigma)}")
        return self.states[p]

    def dedicated_cost(self, n_steps):
        """Evaluations per sample a dedicated teacher of ``n_steps`` steps would spend."""
        return n_steps * self.fine_steps * self.per_sub_step


# --------------------------------------------------------------------------------------------------
# Fitting a range
# --------------------------------------------------------------------------------------------------

def _noised(x0, noise, sigma, family):
    return Family.of(family).alpha(float(sigma)) * x0 + float(sigma) * noise


def calibrate_range(model, schedule, sampler, noise, extra_args=None, *, steps=(8,), cfgs=(None,), denoises=(1.0,),
                    with_cfg=None, data=None, noise_scaling=None, denoise_rules=(denoise_schedule,), family=None,
                    shift=None, fine_steps=10, share_teacher=True,
                    chunk_size=32, holdout=0.25, sigma_min=None, progress=None, cancel=None, info=None, **settings):
    """Fit ``sampler`` at every step count in ``steps``, denoise in ``denoises`` and cfg in ``cfgs``; returns a
    CalibrationSet (or the one Calibration when there is a single entry).

    ``schedule(n)``: the n-step sigmas of the scheduler the user samples with (denoise is applied here, as
    ComfyUI does: ``denoise_schedule``). ``noise``: unit-normal noise (N, ...), scaled here to each schedule's
    first sigma. ``with_cfg(cfg) -> (model, extra_args)``: the model and conditions at a cfg (default: ``model``
    and ``extra_args`` whatever the cfg, which is then only recorded). ``data``: clean latents (N, ...) for
    denoise below 1 (default: the model's own samples). ``noise_scaling(sigma, noise, image)``: a run's start
    state (default alpha(sigma) * image + sigma * noise; ComfyUI's model_sampling.noise_scaling scales pure noise at
    the schedule's maximum sigma differently). ``denoise_rules``: how a UI cuts a schedule for denoise below 1
    (``denoise_schedule``: ComfyUI and hires fix; ``img2img_schedule``: the web UIs' img2img); each distinct
    schedule they give is an entry. ``share_teacher``: one teacher solve per cfg for all
    full-denoise step counts. The remaining keywords are ``calibrate``'s, used for every entry; each entry's
    ``info`` records its cfg, steps and denoise.
    """
    steps = sorted({int(n) for n in steps})
    denoises = sorted({1.0 if d is None else float(d) for d in denoises}, reverse=True)
    cfgs = list(dict.fromkeys(None if c is None else float(c) for c in cfgs))
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be whole numbers of at least 1, got {steps}")
    if not denoises or not all(0 < d <= 1 for d in denoises):
        raise ValueError(f"denoise values must be in (0, 1], got {denoises}")
    check_afs(denoises, settings.get("afs"))
    if SAMPLERS.get(sampler) is None or SAMPLERS[sampler].kind == "plain":
        raise ValueError(f"{sampler!r} is not a calibrated sampler")
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

    entries, shared_evaluations, dedicated_teacher = [], 0.0, 0.0
    per_sample = 0.0
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
            if cancel is not None and cancel():
                raise CalibrationCancelled("calibration cancelled; nothing was saved")
            if d < 1.0:
                if clean is None:
                    clean = _clean_latents(m, conditions, noise, schedule, steps, entries, cfg, sampler, fam,
                                           fine_steps, chunk_size, data, holdout, start)
                    per_sample += clean[1]
                states = start(sig[0], noise.roll(1, 0), clean[0])
            else:
                states = start(sig[0], noise, torch.zeros_like(noise))
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
    for ch in _chunks(noise.shape[0], len(conditions), holdout, chunk_size):
        with torch.no_grad():
            x = start(sig[0], noise[ch.sl], torch.zeros_like(noise[ch.sl]))
            out[ch.sl] = fn(model, x, sig, extra_args=conditions[ch.group], disable=True,
                            calibration=calibration, family=family.name, shift=family.shift).to(out.dtype)
        calls += fn.evaluations(sig) * ch.n
    return out, calls / noise.shape[0]
