"""Fitting a calibration: the stages of ``calibrate()`` (``STAGES``); each kind's own per-step fit is in ``kinds/``
(IIA coefficients by least squares, AMED (r, c, a) by search with c in closed form).

Both fits walk the schedule once, step by step, along the *calibrated* trajectory (later steps are fitted on
the states sampling will see). At step i every noise takes the sampler's step and is compared with a target:

- ``target="trajectory"`` (default): the state at sigma_{i+1} of a teacher solve from the same initial noise
  (the base solver over ``fine_steps`` sub-steps of every interval), as AMED trains its students;
- ``target="local"``: the base solver over ``fine_steps`` sub-steps of [sigma_i, sigma_{i+1}] from the
  calibrated state and history (the IIA paper's).

The batch is split into a fitting share and a held-out share (``holdout``), per condition. The fit sees only
the fitting share; the held-out share decides every choice the fit makes (the IIA ridge, AMED's search result)
and whether a step's correction is kept at all: a step that does not lower the held-out residual falls back
to the base update. At the end the held-out share is sampled end to end against the teacher's endpoint with
the calibration at each of ``STRENGTHS`` (0 is the base solver; for ``amed_ipndm``, whose fit changes a solver
option, the base solver with the caller's options is a candidate too), and the best is kept (so a calibration
never makes its own held-out noises worse).

Memory: per-sample states (the current state, the step history, the teacher) live on ``storage_device``;
the model only ever sees ``chunk_size`` samples at a time and the statistics are accumulated chunk by chunk
in float64, so the peak memory of the model side does not grow with the batch.
"""
import inspect
import math
import time
from types import SimpleNamespace

import torch

from ..samplers import SAMPLERS, Family, calibrated
from ..samplers.core import Denoiser, prepare, sigma_list
from . import end_to_end as E
from .batch import check_cancel, split_chunks, split_sizes
from .file import Calibration
from .kinds import KINDS
from .kinds.base import flat
from .teacher import SharedView, Teacher
from .teacher import evaluations as teacher_evaluations
from .requests import check_request

TARGETS = ("trajectory", "local")
STRENGTHS = (1.0, 0.75, 0.5, 0.25, 0.0)
BUDGET_FACTOR = 8.0  # the end-to-end stage's default budget, in multiples of the per-step fit's evaluations
E2E_UNITS = 100  # progress units of the end-to-end stage (its length is known only as a budget)


# --------------------------------------------------------------------------------------------------
# Per-sample state kept for the whole batch, worked on chunk by chunk
# --------------------------------------------------------------------------------------------------

class _CachedDenoiser(Denoiser):
    """Remembers the evaluation at this step's own sigma, which every AMED candidate shares."""

    def __init__(self, *args, cached=None):
        super().__init__(*args)
        self.cached = cached  # (sigma, x, D)

    def __call__(self, x, sigma):
        c = self.cached
        if c is not None and sigma == c[0] and x is c[1]:
            return c[2]
        return super().__call__(x, sigma)


# --------------------------------------------------------------------------------------------------
# The fit driver
# --------------------------------------------------------------------------------------------------

class _Run:
    """Everything one calibration carries: the batch, its chunks, the teacher and the bookkeeping."""

    def __init__(self, model, sigmas, noise, conditions, family, chunk_size, holdout, storage_device,
                 progress, cancel, sigma_min=None):
        self.model, self.family, self.sigma_min = model, family, sigma_min
        self.sig = sigma_list(sigmas)
        self.n_steps = len(self.sig) - 1
        x = prepare(noise)[0]
        self.device = x.device
        self.storage = torch.device(storage_device) if storage_device is not None else x.device
        self.sigmas = sigmas.detach().to(self.device)
        self.x = x.to(self.storage)
        self.x0 = self.x.clone()
        self.conditions = conditions
        self.chunk_size = int(chunk_size)
        self.chunks = split_chunks(x.shape[0], len(conditions), holdout, chunk_size)
        self.progress, self.cancel = progress, cancel
        self.done, self.total = 0, 0
        self.sample_evaluations = 0
        self.model_calls = 0

    def denoiser(self, chunk, x, cached=None):
        return _CachedDenoiser(self.model, x, self.sigmas, self.conditions[chunk.group], cached=cached)

    def count(self, ev, chunk):
        self.model_calls += ev.calls
        self.sample_evaluations += ev.calls * chunk.n

    def tick(self):
        self.check_cancel()
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def tick_to(self, done):
        while self.done < min(done, self.total):
            self.tick()

    def check_cancel(self):
        check_cancel(self.cancel)


# --------------------------------------------------------------------------------------------------
# End-to-end check on the held-out share
# --------------------------------------------------------------------------------------------------

def _endpoint_check(run, method, params, kind, teacher_end, candidates, family, sigmas=None):
    """Held-out endpoint RMSE against the teacher for each candidate (strength, options), in order, sampled on the
    run's schedule or on ``sigmas``."""
    held = [ch for ch in run.chunks if ch.held_out]
    fn = SAMPLERS[method]
    sigmas = run.sigmas if sigmas is None else sigmas.to(run.device, run.sigmas.dtype)
    out = []
    for strength, options in candidates:
        cal = kind.scaled(params, strength) if strength else None
        evaluations = fn.evaluations(sigmas, **options)
        err, count = 0.0, 0
        for ch in held:
            x = run.x0[ch.sl].to(run.device)
            end = fn(run.model, x, sigmas, extra_args=run.conditions[ch.group], disable=True, calibration=cal,
                     family=family.name, shift=family.shift, **options)
            run.model_calls += evaluations
            run.sample_evaluations += evaluations * ch.n
            err += float((flat(end) - flat(teacher_end[ch.sl].to(run.device))).pow(2).sum())
            count += end.numel()
            run.tick()
        out.append(math.sqrt(err / count))
    return out


END_FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # raised last positive sigmas the start schedule is chosen among
PROBE_NOISES = 64


def _raised_end(model, sigmas, noise, conditions, family, sampler, base, fine_steps, holdout, chunk_size,
                storage_device, cancel, sigma_min, options, progress=None, later_units=0):
    """The requested schedule with its last positive sigma raised by the one of ``END_FACTORS`` whose plain base
    solver ends closest to the teacher on a probe of fit noises (never held-out ones), the spacing between
    rescaled in log sigma; returns (sigmas, info). ``progress(done, total)`` is told of each chunk's step and solve,
    the total counting ``later_units`` for the stages after it; ``info["progress_units"]`` is what it used.

    At few steps the best last sigma is often far above the model's sigma_min (the step into 0 only denoises),
    further than the end-to-end stage's gradient steps would carry it from there."""
    picks, start = [], 0
    for size, n_probe in zip(split_sizes(int(noise.shape[0]), len(conditions)),
                             _probe_sizes(int(noise.shape[0]), len(conditions), holdout)):
        picks.append(noise[start:start + n_probe])
        start += size
    probe = _Run(model, sigmas, torch.cat(picks), conditions, family, chunk_size, 0.0, storage_device, progress,
                 cancel, None if sigma_min is None else float(sigma_min))
    candidates = _end_candidates(sigmas)
    probe.total = len(probe.chunks) * (probe.n_steps + len(candidates)) + later_units
    teacher = Teacher(probe, base, fine_steps, options)
    for i in range(probe.n_steps):
        teacher.advance(i, range(len(probe.chunks)))
    target = teacher.endpoint()
    per_noise = [_plain_errors(probe, sampler, cand, target, options) for _, cand in candidates]
    scores = [math.sqrt(float(e.mean())) for e in per_noise]
    best = min(range(len(scores)), key=lambda k: (scores[k], k))
    # a raise must beat the requested end by more than the probe's own noise (one standard error of the paired
    # per-noise difference, the stage's rule): where a few noises that end in another mode carry the error, the
    # factors differ by luck, and a raise chosen so is as likely to be worse on other noises
    if best and not E.significantly_lower(per_noise[best], per_noise[0], 1.0):
        best = 0
    info = {"factors": [f for f, _ in candidates], "probe_rmse": [round(e, 6) for e in scores],
            "chosen_factor": candidates[best][0], "probe_noises": int(probe.x0.shape[0]),
            "sample_evaluations": probe.sample_evaluations, "model_calls": probe.model_calls,
            "progress_units": probe.done}
    return candidates[best][1], info


def _probe_sizes(n, n_groups, holdout):
    """The probe's noises per condition: the first of its fit noises, PROBE_NOISES in all at most."""
    return [min(size - int(round(holdout * size)), max(1, PROBE_NOISES // n_groups))
            for size in split_sizes(n, n_groups)]


def _end_candidates(sigmas):
    """(factor, schedule) for each of END_FACTORS that leaves the steps room (a quarter of the span, in log sigma)."""
    sig, out = [float(s) for s in sigmas], []
    for factor in END_FACTORS:
        if factor > 1 and math.log(sig[0] / (sig[-2] * factor)) < 0.25 * math.log(sig[0] / sig[-2]):
            break
        out.append((factor, raised_schedule(sigmas, factor)))
    return out


def raised_schedule(sigmas, factor):
    """``sigmas`` (ending in 0) with the last positive sigma times ``factor``, the spacing between rescaled in log
    sigma and the first sigma kept; factor 1 is the requested schedule exactly."""
    if factor == 1:
        return sigmas.detach().cpu().clone()
    sig = [float(s) for s in sigmas]
    logs = torch.tensor([math.log(s) for s in sig[:-1]], dtype=torch.float64)
    scaled = logs[0] - (logs[0] - logs) * (logs[0] - math.log(sig[-2] * factor)) / float(logs[0] - logs[-1])
    cand = torch.cat([scaled.exp(), torch.zeros(1, dtype=torch.float64)])
    cand[0] = sig[0]
    return cand.to(sigmas.dtype)


def _plain_errors(probe, sampler, sig, target, options):
    """Per-noise mean squared error of ``sampler`` uncalibrated (its base solver) on ``sig`` against ``target``."""
    fn = SAMPLERS[sampler]
    evaluations = fn.evaluations(sig, **options)
    out = []
    for ch in probe.chunks:
        end = fn(probe.model, probe.x0[ch.sl].to(probe.device), sig.to(probe.device),
                 extra_args=probe.conditions[ch.group], disable=True, family=probe.family.name,
                 shift=probe.family.shift, **options)
        probe.model_calls += evaluations
        probe.sample_evaluations += evaluations * ch.n
        out.append((flat(end) - flat(target[ch.sl].to(probe.device))).pow(2).mean(1).cpu())
        probe.tick()
    return torch.cat(out)


def _best_variant(model, sigmas, sampler, noise, extra_args, progress, settings, variants):
    """Calibrate once per solver-option variant; keep the one with the lowest held-out endpoint error."""
    results = []
    for k, variant in enumerate(variants):
        part = None if progress is None else (
            lambda done, total, k=k: progress(k * total + done, len(variants) * total))
        results.append(calibrate(model, sigmas, sampler, noise, extra_args, progress=part, **settings, **variant))
    scores = [min(e["rmse"] for e in cal.info["endpoint_rmse_held_out"]) for cal in results]
    best = results[min(range(len(results)), key=lambda k: scores[k])]
    best.info["variants"] = [{**variant, "rmse": score} for variant, score in zip(variants, scores)]
    best.info["model_calls"] = sum(cal.info["model_calls"] for cal in results)
    best.info["model_evaluations_per_sample"] = sum(cal.info["model_evaluations_per_sample"] for cal in results)
    best.info["seconds"] = round(sum(cal.info["seconds"] for cal in results), 3)
    return best


# --------------------------------------------------------------------------------------------------
# The stages of calibrate(): each reads and extends the calibration's state ``st``; one that returns a
# Calibration ends the calibration with it
# --------------------------------------------------------------------------------------------------

def _checked(sampler, sigmas, noise, extra_args, settings):
    """The sampler's registry entry, the sigmas as a tensor and the conditions, after checking the arguments."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; calibrated samplers are {sorted(calibrated())}")
    fn = SAMPLERS[sampler]
    if fn.kind == "plain":
        raise ValueError(f"{sampler} needs no calibration: its coefficients come from the schedule itself")
    if settings["target"] not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {settings['target']!r}")
    if int(settings["fine_steps"]) < 1:
        raise ValueError(f"fine_steps must be at least 1, got {settings['fine_steps']}")
    holdout = settings["holdout"]
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if settings["learn_sigmas"] not in (True, False, "interior"):
        raise ValueError(f"learn_sigmas must be True, False or 'interior', got {settings['learn_sigmas']!r}")
    if int(settings["chunk_size"]) < 1:
        raise ValueError(f"chunk_size must be at least 1, got {settings['chunk_size']}")
    if not torch.is_tensor(noise) or noise.ndim < 2:
        raise ValueError("noise must be a batch tensor (N, ...) of initial states scaled to sigmas[0]")
    if not torch.is_tensor(sigmas):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    conditions = list(extra_args) if isinstance(extra_args, (list, tuple)) else [extra_args or {}]
    conditions = [c if c is not None else {} for c in conditions]
    if not conditions:
        raise ValueError("extra_args is an empty list: give at least one condition (or None)")
    check_request(batch_size=int(noise.shape[0]), prompts=len(conditions), holdout=holdout)
    return fn, sigmas, conditions


def progress_units(count):
    """Declares a stage's share of the progress bar: ``count(st)`` units, known once the plan has run."""
    def declare(stage):
        stage.units = count
        return stage
    return declare


def planned_evaluations(count):
    """Declares what a stage will spend before it runs (``plan()``): ``count(st, before)`` model-evaluation
    equivalents per noise (a backward pass counts two), ``before`` being what the stages before it spend."""
    def declare(stage):
        stage.evaluations = count
        return stage
    return declare


def _wants_probe(st):
    return (st.end_to_end and st.validate and st.holdout > 0 and st.learn_sigmas is True
            and st.shared_teacher is None and float(st.sigmas[-1]) == 0 and len(st.sigmas) >= 3)


def _probe_evaluations(st):
    """Per calibration noise: the probe's teacher and each raised end's plain solve, on the probe's noises."""
    probe = sum(_probe_sizes(int(st.noise.shape[0]), len(st.conditions), st.holdout))
    sig = [float(s) for s in st.sigmas]
    fn = SAMPLERS[st.sampler]
    per_probe = teacher_evaluations(st.fn.base, sig, int(st.fine_steps), st.sigma_min) + sum(
        fn.evaluations(cand, **st.options) for _, cand in _end_candidates(st.sigmas))
    return probe * per_probe / st.noise.shape[0]


def _units_after_probe(st):
    """The progress units of the stages after the probe, as _plan counts them (on a copy of the state; a raise the
    probe chooses adds the requested schedule's check to them)."""
    twin = SimpleNamespace(**vars(st))
    twin.progress, twin.start_schedule = None, None
    _plan(twin)
    return twin.run.total - twin.probe_units


@progress_units(lambda st: st.probe_units)
@planned_evaluations(lambda st, before: _probe_evaluations(st) if st.wants_probe else 0.0)
def _raised_start(st):
    """Start from a raised last positive sigma where the plain solver ends closer to the teacher (_raised_end)."""
    if st.wants_probe:
        with torch.no_grad():
            st.sigmas, st.start_schedule = _raised_end(
                st.model, st.sigmas, st.noise, st.conditions, st.fam, st.sampler, st.fn.base, int(st.fine_steps),
                st.holdout, int(st.chunk_size), st.storage_device, st.cancel, st.sigma_min, st.options, st.progress,
                _units_after_probe(st))
        st.probe_units = st.start_schedule.pop("progress_units")


def _plan(st):
    """The batch's run, which stages will run, their progress units and the teacher."""
    st.afs = bool(st.options.get("afs", False))
    st.solver_options = {k: v for k, v in st.options.items() if k not in ("afs", "basis")}
    run = st.run = _Run(st.model, st.sigmas, st.noise, st.conditions, st.fam, int(st.chunk_size), st.holdout,
                        st.storage_device, st.progress, st.cancel,
                        None if st.sigma_min is None else float(st.sigma_min))
    if st.start_schedule is not None:
        run.sample_evaluations += st.start_schedule.pop("sample_evaluations")
        run.model_calls += st.start_schedule.pop("model_calls")
    n_chunks = len(run.chunks)
    st.held = held = [j for j, ch in enumerate(run.chunks) if ch.held_out]
    st.end_to_end = bool(st.end_to_end and st.validate and held and (st.learn_params or st.learn_sigmas))
    # schedule-only (LD3-style) runs keep the base solver's parameters
    st.sequential = sequential = st.learn_params or not st.end_to_end
    st.kind.setup(st)
    st.teacher_chunks = n_chunks if (st.target == "trajectory" and sequential) or st.end_to_end else (
        len(held) if st.validate else 0)
    st.raised = st.start_schedule is not None and not torch.equal(run.sigmas.cpu().to(torch.float64), st.requested)
    run.done = st.probe_units  # the probe reported its share of the bar already
    run.total = sum(stage.units(st) for stage in STAGES if hasattr(stage, "units"))
    if st.shared_teacher is not None and (st.target != "trajectory" or not st.shared_teacher.covers(run.sig)):
        st.shared_teacher = None
    st.teacher = (Teacher(run, st.fn.base, int(st.fine_steps), st.options) if st.shared_teacher is None
                  else SharedView(run, st.shared_teacher))
    st.fit_info, st.scales = {}, {}
    st.before = st.after = st.fallback = None
    st.endpoint, st.strength, st.sample_sigmas = None, 1.0, None


def _fit_evaluations(st):
    """The teacher on the noises it runs for (none with a shared teacher), and the fit's own steps (with a local
    target, each step's fine solve too)."""
    run = st.run
    teacher = teacher_evaluations(st.fn.base, run.sig, int(st.fine_steps), run.sigma_min)
    taught = 1.0 if st.teacher_chunks == len(run.chunks) else _held_share(st) if st.teacher_chunks else 0.0
    fit = (st.kind.fit_evaluations(st) + (teacher if st.target == "local" else 0)) if st.sequential else 0
    return fit + (teacher * taught if st.shared_teacher is None else 0.0)


@progress_units(lambda st: (st.kind.fit_units(st.run.n_steps, len(st.run.chunks), 1 if st.run.sig[-1] == 0 else 0)
                            if st.sequential else 0) + st.run.n_steps * st.teacher_chunks)  # the fit, the teacher
@planned_evaluations(lambda st, before: _fit_evaluations(st))
def _per_step_fit(st):
    """Each step's parameters fitted in turn to the teacher (or the base solver's, for a schedule-only fit)."""
    run = st.run
    with torch.no_grad():
        if st.sequential:
            st.params, st.before, st.after, st.fallback = st.kind.fit(st)
        else:
            st.params = st.kind.neutral(st)
        if st.teacher_chunks and len(st.teacher.states) < st.teacher_chunks:  # endpoints the fit did not need
            for i in range(run.n_steps):
                st.teacher.advance(i, range(len(run.chunks)) if st.end_to_end else st.held)


def _held_share(st):
    return sum(st.run.chunks[j].n for j in st.held) / st.noise.shape[0]


def _strength_candidates(st):
    """(strength, solver options) the strength check samples the held-out noises with."""
    candidates = [(strength, st.options) for strength in (STRENGTHS if st.sequential else (0.0,))]
    if st.user_options != st.options:  # the plain sampler as the user would run it is a candidate too
        candidates.append((0.0, st.user_options))
    return candidates


@progress_units(lambda st: len(_strength_candidates(st)) * len(st.held) if st.validate else 0)
@planned_evaluations(lambda st, before: len(_strength_candidates(st)) * _held_share(st)
                     * SAMPLERS[st.sampler].evaluations(st.run.sigmas, **st.options) if st.validate else 0.0)
def _strength_check(st):
    """The fit scaled towards the base solver (and the plain sampler as asked), judged on the held-out noises."""
    if not (st.validate and st.held):
        return
    with torch.no_grad():
        candidates = _strength_candidates(st)
        errors = _endpoint_check(st.run, st.sampler, st.params, st.kind, st.teacher.endpoint(), candidates,
                                 st.fam)
        st.endpoint = [{"strength": strength, "options": dict(opts), "rmse": e}
                       for (strength, opts), e in zip(candidates, errors)]
        best = min(range(len(candidates)), key=lambda k: (errors[k], -candidates[k][0]))
        st.strength, st.options = candidates[best]
        if st.strength != 1.0:
            st.params = st.kind.scaled(st.params, st.strength)
        if st.strength == 0.0 and st.fallback is not None:
            st.fallback = torch.ones_like(st.fallback)


def _start_cost(st, spent):
    """What the stages before the end-to-end one cost per noise (``spent``), a shared teacher counted as a
    dedicated one would have cost: the end-to-end budget's unit."""
    return spent + (st.shared_teacher.dedicated_cost(st.run.n_steps) if st.shared_teacher is not None else 0.0)


def _budget(st, start_cost):
    """The end-to-end stage's budget per noise: the caller's, else BUDGET_FACTOR times what came before it."""
    return BUDGET_FACTOR * start_cost if st.budget is None else float(st.budget)


@progress_units(lambda st: E2E_UNITS if st.end_to_end else 0)
@planned_evaluations(lambda st, before: _budget(st, _start_cost(st, before)) if st.end_to_end else 0.0)
def _end_to_end(st):
    """Every step's parameters (and the time steps) learned jointly through the sampler (end_to_end.py).

    calibrate()'s keywords for it:
    ``end_to_end``: after the per-step fit, learn all steps' parameters jointly through the sampler and the
    model against the teacher's endpoint (end_to_end.py; needs ``validate`` and a held-out share).
    ``learn_sigmas``: let that stage move the time steps too (the file then samples on them): every sigma between
    the first and the last, and into sigma = 0 the last positive one as well (never below ``sigma_min``);
    ``"interior"`` keeps the last positive sigma as requested. With ``True`` (and no ``shared_teacher``) the fit
    also starts from a raised last positive sigma where the plain solver ends closer to the teacher on a probe of
    fit noises (``_raised_end``; ``info["start_schedule"]``); the file then samples on its own schedule.
    ``learn_params=False``: keep the sampler's own parameters at the base solver's (no per-step fit); with
    ``learn_sigmas`` only the time steps are learned (an LD3-style schedule for the plain solver).
    ``budget``: model-evaluation equivalents per noise that stage may spend (a backward pass counts two;
    default ``BUDGET_FACTOR`` times what the per-step fit spent); ``time_limit``: seconds, optional.
    ``optimizer``: "adam" (``fit_batch`` fit noises per step, by default a share of the fit noises that keeps the
    number of steps whatever the batch (``end_to_end.default_batch``: 16 from 192 fit noises up, 2 from 24 down;
    ``"all"``: every fit noise), ``learning_rate`` decayed over the budget) or
    "lbfgs" (full batch). ``learning_rate``: None (the default) measures Adam's rate on the model itself, the rate
    at which its first step moves the fit noises' endpoints by ``step_fraction`` (default
    ``end_to_end.STEP_FRACTION``) of their error against the teacher (a fixed rate is too large on one model and too
    small on another); a number fixes it.
    """
    if not st.end_to_end:
        return
    run = st.run
    sequential_cost = _start_cost(st, run.sample_evaluations / st.noise.shape[0])
    limit = _budget(st, sequential_cost)
    # the learned last positive sigma stays above the model's sigma_min or, for a model defined at every sigma,
    # the requested one: a raised start may come back down, never below what the user's schedule allows
    requested = st.requested
    floor = run.sigma_min if run.sigma_min is not None else (float(requested[-2]) if len(requested) > 2 else None)
    learn = E.Learnable(st.fn.kind, st.params, run.sig, learn_params=st.learn_params,
                        learn_sigmas=bool(st.learn_sigmas), scales=st.scales.get("coeffs"), device=run.device,
                        floor=floor, learn_end=st.learn_sigmas != "interior")
    start = run.done
    stage = E.Stage(run, st.sampler, st.options, learn, st.teacher.endpoint(), lr=st.learning_rate,
                    batch=st.fit_batch, network=st.network,
                    step_fraction=E.STEP_FRACTION if st.step_fraction is None else st.step_fraction,
                    budget=limit, time_limit=st.time_limit,
                    progress=lambda spent: run.tick_to(start + min(E2E_UNITS, int(E2E_UNITS * spent / limit))))
    e2e = st.fit_info["end_to_end"] = stage.optimise(st.optimizer)
    e2e.update(budget=round(limit, 2), learn_sigmas=learn.learn_sigmas, learn_params=bool(st.learn_params),
               start_evaluations_per_sample=round(sequential_cost, 2))
    run.tick_to(start + E2E_UNITS)
    if e2e["best_round"] > 0:
        st.params, st.sample_sigmas = learn.values()
        if st.fallback is not None:
            st.fallback = st.kind.unchanged_steps(st.params)
    st.endpoint = (st.endpoint or []) + [{"stage": "end_to_end", "options": dict(st.options),
                                          "rmse": e2e["held_out_rmse"]}]


@progress_units(lambda st: len(st.held) if st.raised else 0)  # the plain solver on the requested schedule
@planned_evaluations(lambda st, before: _held_share(st) * SAMPLERS[st.sampler].evaluations(st.requested, **st.options)
                     if st.raised else 0.0)
def _requested_check(st):
    """The base a calibration must never end worse than is the plain solver on the schedule the user asked for,
    not only on the raised one the probe (on fit noises) preferred: the same held-out noises judge both."""
    if not st.raised:
        return None
    run, start_schedule = st.run, st.start_schedule
    with torch.no_grad():
        plain = _endpoint_check(run, st.sampler, st.params, st.kind, st.teacher.endpoint(),
                                [(0.0, st.user_options)], st.fam, st.requested)[0]
    start_schedule["requested_held_out_rmse"] = plain
    start_schedule["kept_requested"] = plain < st.fit_info["end_to_end"]["held_out_rmse"]
    if start_schedule["kept_requested"] and not st.learn_params:  # a schedule-only fit: the plain solver as asked
        st.params, st.sample_sigmas = st.kind.neutral(st, like=st.params), None
        st.options, st.strength = st.user_options, 0.0
    elif start_schedule["kept_requested"]:
        # the raise did worse: fit the requested schedule step by step instead (its own held-out check keeps it
        # no worse than that plain solver); the progress bar has reached its end and waits for it
        cal = calibrate(st.model, st.asked, st.sampler, st.noise, st.extra_args,
                        **dict(st.settings, end_to_end=False), **st.user_options)
        per_sample = run.sample_evaluations / st.noise.shape[0]
        cal.info["start_schedule"] = start_schedule
        cal.info["raised_attempt"] = {"end_to_end": st.fit_info["end_to_end"],
                                      "model_evaluations_per_sample": per_sample}
        cal.info["model_evaluations_per_sample"] += per_sample
        cal.info["model_calls"] += run.model_calls
        cal.info["seconds"] = round(time.perf_counter() - st.started, 3)
        return cal
    return None


STAGES = (_raised_start, _plan, _per_step_fit, _strength_check, _end_to_end, _requested_check)


def _calibration_file(st):
    """The Calibration the stages made, with what they recorded."""
    run, noise = st.run, st.noise
    meta = dict(st.info or {})
    meta.update({
        "fine_steps": int(st.fine_steps), "target": st.target,
        "teacher": f"{st.fn.base} x {int(st.fine_steps)} sub-steps"
        + (" (shared with the other step counts)" if st.shared_teacher is not None else ""),
        "sigma_min": st.sigma_min,
        "batch": int(noise.shape[0]), "conditions": len(st.conditions), "holdout": st.holdout,
        "chunk_size": int(st.chunk_size), "model_evaluations_per_sample": run.sample_evaluations / noise.shape[0],
        "model_calls": run.model_calls, "seconds": round(time.perf_counter() - st.started, 3),
        "strength": st.strength, "endpoint_rmse_held_out": st.endpoint,
        **st.fit_info,
    })
    meta.update(st.kind.file_info(st))
    sample_sigmas = st.sample_sigmas
    if st.start_schedule is not None:
        meta["start_schedule"] = st.start_schedule
        if sample_sigmas is None and st.raised and not st.start_schedule["kept_requested"]:
            sample_sigmas = run.sigmas.detach().cpu().to(torch.float64)
    return Calibration(st.sampler, st.requested, st.params, family=st.fam.name, shift=st.fam.shift,
                       options=st.options, info=meta, sample_sigmas=sample_sigmas, residual_before=st.before,
                       residual_after=st.after, fallback=st.fallback)


# --------------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------------

def _state(model, sigmas, sampler, noise, extra_args, progress, settings, options):
    """The calibration's state before its first stage, after checking the arguments, and the solver-option
    variants to search over (none, or each calibrated in turn: _best_variant)."""
    fn, sigmas, conditions = _checked(sampler, sigmas, noise, extra_args, settings)
    user_options = dict(options)  # as the user asked: the plain sampler the fit must beat runs with these
    variants = KINDS[fn.kind].variants(sampler, options)
    if variants and not (settings["validate"] and settings["holdout"] > 0):
        options.update(variants[0])
        variants = []
    st = SimpleNamespace(**settings, settings=settings, model=model, sampler=sampler, fn=fn, kind=KINDS[fn.kind],
                         noise=noise, extra_args=extra_args, conditions=conditions, progress=progress,
                         fam=Family.of(settings["family"], settings["shift"]), asked=sigmas, sigmas=sigmas,
                         requested=sigmas.detach().cpu().to(torch.float64), user_options=user_options,
                         options=options, started=time.perf_counter(), start_schedule=None)
    st.wants_probe, st.probe_units = _wants_probe(st), 0
    return st, variants


def plan(sigmas, sampler, noises, extra_args=None, **keywords):
    """What ``calibrate`` with these arguments (``noises``: the batch size) will spend, before any model call: a
    dict of the model-evaluation equivalents (a backward pass counts two) per noise of each stage, ``per_noise``,
    ``noises`` and ``total``, whether that is an ``upper_bound``, and the end-to-end stage's ``time_limit`` (seconds or
    None: it stops there if sooner than its budget). Exact for IIA without the raised-end probe; with
    it, planned at the highest raise the probe may choose (a raise it rejects after the end-to-end stage fits the
    requested schedule again, which is not planned); for AMED an upper bound (its search tries at most every
    refinement); a search over solver-option variants (amed_ipndm) calibrates each."""
    bound = inspect.signature(calibrate).bind(None, sigmas, sampler, torch.zeros(int(noises), 1), extra_args,
                                              **keywords)
    bound.apply_defaults()
    args = dict(bound.arguments)
    options = args.pop("options")
    settings = {k: v for k, v in args.items() if k not in ("model", "sigmas", "sampler", "noise", "extra_args",
                                                             "progress")}
    st, variants = _state(None, args["sigmas"], sampler, args["noise"], extra_args, None, settings, options)
    stages, before = {}, 0.0
    for stage in STAGES:
        if stage is _plan:
            if st.wants_probe:  # the probe may raise the end: planned at the highest raise, and the recheck after
                st.sigmas = _end_candidates(st.sigmas)[-1][1]
            _plan(st)
            st.raised = st.wants_probe
        elif hasattr(stage, "evaluations"):
            stages[stage.__name__.strip("_").replace("_", " ")] = spent = stage.evaluations(st, before)
            before += spent
    runs = max(1, len(variants))
    return {"stages": {k: runs * v for k, v in stages.items()}, "per_noise": runs * before, "noises": int(noises),
            "total": runs * before * int(noises),
            "upper_bound": st.fn.kind == "amed" or st.wants_probe, "variants": runs,
            "time_limit": st.time_limit if st.end_to_end else None}


def calibrate(model, sigmas, sampler, noise, extra_args=None, *, family=None, shift=None, fine_steps=10,
              target="trajectory", history=None, ridge=None, holdout=0.25, chunk_size=32, validate=True,
              sigma_min=None, end_to_end=True, learn_params=True, learn_sigmas=True, budget=None, time_limit=None,
              optimizer="adam", learning_rate=None, fit_batch=None, step_fraction=None, storage_device=None,
              progress=None, cancel=None, info=None, shared_teacher=None, network=None, **options):
    """Fit ``sampler``'s per-step parameters to ``model`` on the schedule ``sigmas``; returns a ``Calibration``.

    ``noise``: the batch of initial states (already scaled to sigmas[0], as a sampler receives them).
    ``extra_args``: one dict of model keyword arguments, or a list of them (one per prompt/condition); the
    batch is split evenly over the conditions. ``family``/``shift``: the model family, as for the samplers.
    ``fine_steps``: teacher sub-steps per interval. ``target``: "trajectory" or "local" (module docstring).
    ``history``: IIA history depth r (default: the variant's deepest). ``ridge``: IIA ridge, relative to the
    Gram diagonal (default: chosen on the held-out share). ``holdout``: held-out share of each condition's
    noises. ``chunk_size``: samples per model call. ``validate``: the end-to-end held-out check.
    ``sigma_min``: the smallest sigma the model is defined at (ComfyUI's ``model_sampling.sigma_min``): the
    teacher's step into sigma = 0 is sub-stepped down to it and ends there as the sampler's last step does;
    None for a model defined at every sigma.
    ``storage_device``: where per-sample states wait between chunks (e.g. "cpu" to spare GPU memory).
    ``network``: the ``torch.nn.Module`` inside ``model`` (a UI's UNet or DiT): in the end-to-end stage's backward
    pass each of its blocks recomputes its activations instead of keeping them (blocks.py), for a peak near an
    inference call's; the module is left as it was.
    ``end_to_end``, ``learn_params``, ``learn_sigmas``, ``budget``, ``time_limit``, ``optimizer``, ``fit_batch``,
    ``learning_rate``, ``step_fraction``: the end-to-end stage after the per-step fit (``_end_to_end``).
    ``shared_teacher``: a teacher.SharedTeacher that already solved from these initial states through this
    schedule's sigmas (with ``target="trajectory"``): the fit reads its targets there instead of solving again;
    the default budget still counts the teacher a dedicated calibration would have run.
    ``progress(done, total)`` and ``cancel() -> bool`` are called between chunks. ``info``: extra metadata
    for the file (cfg, seed, model fingerprint...). Remaining ``options`` are solver options (``afs``,
    ``max_order``, ``variable_step``) saved with the calibration and used by the sampler.
    """
    settings = dict(family=family, shift=shift, fine_steps=fine_steps, target=target, history=history, ridge=ridge,
                    holdout=holdout, chunk_size=chunk_size, validate=validate, sigma_min=sigma_min,
                    end_to_end=end_to_end, learn_params=learn_params, learn_sigmas=learn_sigmas, budget=budget,
                    time_limit=time_limit, optimizer=optimizer, learning_rate=learning_rate, fit_batch=fit_batch,
                    step_fraction=step_fraction,
                    storage_device=storage_device, cancel=cancel, info=info, shared_teacher=shared_teacher,
                    network=network)
    st, variants = _state(model, sigmas, sampler, noise, extra_args, progress, settings, options)
    if variants:  # a search over solver options: one calibration per variant
        return _best_variant(model, st.asked, sampler, noise, extra_args, progress, dict(settings, **options), variants)
    for stage in STAGES:
        done = stage(st)
        if done is not None:  # the stage made the whole calibration (a recheck that fitted another schedule)
            return done
    return _calibration_file(st)
