"""The teacher a calibration fits to: the base solver over ``fine_steps`` equal sub-steps (in log sigma) of each
interval of the schedule, run for one calibration (``Teacher``) or once for the union of several schedules
(``SharedTeacher``, read by a calibration through ``SharedView``)."""
import math

import torch

from ..samplers import Family
from ..samplers import base as B
from ..samplers.core import HISTORY_KEPT, Denoiser, prepare, remember
from .batch import check_cancel, split_chunks, take_records


def sub_grid(a, b, fine_steps, sigma_min=None):
    """``fine_steps`` equal sub-steps of [a, b] in log sigma.

    Into sigma = 0: equal sub-steps in log sigma down to ``sigma_min`` (the smallest sigma the model is defined
    at), then the final step to 0 from there, as every sampler's last step does; with no ``sigma_min`` (a model
    defined everywhere, like the analytic mixture) equal sub-steps in sigma all the way.
    """
    if b > 0:
        grid = [math.exp(math.log(a) + (math.log(b) - math.log(a)) * j / fine_steps) for j in range(fine_steps + 1)]
    elif sigma_min is None:
        grid = [a + (b - a) * j / fine_steps for j in range(fine_steps + 1)]
    elif a <= sigma_min * (1 + 1e-6) or fine_steps == 1:
        grid = [a, b]
    else:
        grid = sub_grid(a, sigma_min, fine_steps - 1) + [b]
    grid[0], grid[-1] = a, b
    return grid


def evaluations(base, sig, fine_steps, sigma_min=None):
    """Model evaluations per noise of the teacher through the schedule ``sig`` (floats): the base solver over each
    interval's sub-grid, its history carried across intervals (S-PNDM's two-evaluation start happens once)."""
    per_step = B.BASE_STEPS[base][1]
    count = 0
    for a, b in zip(sig, sig[1:]):
        grid = sub_grid(a, b, fine_steps, sigma_min)
        count += (len(grid) - 1) * per_step - (1 if per_step == 2 and grid[-1] == 0 else 0)
    first = sub_grid(sig[0], sig[1], fine_steps, sigma_min) if len(sig) > 1 else [0, 0]
    return count + (1 if base == "spndm" and first[1] > 0 else 0)


def sub_solve(step_fn, ev, x, a, b, fine_steps, hist, family, options, sigma_min=None):
    """The teacher solver over ``fine_steps`` sub-steps of [a, b], continuing ``hist``; returns (x, hist)."""
    grid = sub_grid(a, b, fine_steps, sigma_min)
    sub_hist = list(hist)
    for j in range(len(grid) - 1):
        x, q = step_fn(ev, x, j, grid, sub_hist, family, **options)
        remember(sub_hist, q)
    return x, sub_hist


def teacher_options(base, options=None):
    """The base solver's options as a teacher: ``max_order`` kept, and the exact variable-step weights for a
    multistep solver, whose sub-grid is not uniform."""
    kept = {k: v for k, v in (options or {}).items() if k in ("max_order",)}
    if base in ("ipndm", "spndm"):
        kept["variable_step"] = True
    return kept


class Teacher:
    """The base solver over ``fine_steps`` sub-steps of each interval, advanced alongside the fit.

    Its state and history are kept per chunk (on the storage device), so it can run for any subset of chunks.
    """

    def __init__(self, run, base, fine_steps, options):
        self.run, self.fine_steps = run, fine_steps
        self.step_fn = B.BASE_STEPS[base][0]
        self.options = teacher_options(base, options)
        self.states = {}  # chunk index -> (x, hist)

    def advance(self, i, chunks):
        """Move the teacher of ``chunks`` (indices into run.chunks) to sigma_{i+1}; returns their states."""
        run, out = self.run, []
        for j in chunks:
            ch = run.chunks[j]
            x, hist = self.states.get(j, (run.x0[ch.sl], []))
            x = x.to(run.device)
            ev = run.denoiser(ch, x)
            x, hist = sub_solve(self.step_fn, ev, x, run.sig[i], run.sig[i + 1], self.fine_steps,
                                 take_records(hist, slice(None), run.device), run.family, self.options, run.sigma_min)
            run.count(ev, ch)
            x = x.to(run.storage)
            self.states[j] = (x, take_records(hist[-HISTORY_KEPT:], slice(None), run.storage))
            out.append(x)
            run.tick()
        return out

    def endpoint(self):
        """The teacher's final states over the whole batch (NaN where it did not run)."""
        if len(self.states) != len(self.run.chunks):
            x = torch.full_like(self.run.x0, float("nan"))
        else:
            x = torch.empty_like(self.run.x0)
        for j, (xt, _) in self.states.items():
            x[self.run.chunks[j].sl] = xt
        return x

    def local(self, i, x, hist, ev):
        """The fine solve of [sigma_i, sigma_{i+1}] from a calibrated state (the IIA paper's target)."""
        return sub_solve(self.step_fn, ev, x, self.run.sig[i], self.run.sig[i + 1], self.fine_steps, hist,
                          self.run.family, self.options, self.run.sigma_min)[0]


class SharedView:
    """A run's teacher read from a SharedTeacher (one fine solve shared by several schedules)."""

    def __init__(self, run, shared):
        self.run, self.shared = run, shared
        self.states = {}

    def advance(self, i, chunks):
        run, x, out = self.run, self.shared.at(self.run.sig[i + 1]), []
        for j in chunks:
            xs = x[run.chunks[j].sl].to(run.storage)
            self.states[j] = (xs, None)
            out.append(xs)
            run.tick()
        return out

    def endpoint(self):
        return self.shared.at(self.run.sig[-1]).to(self.run.storage)


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
        options = teacher_options(base)
        x_all, _ = prepare(states)
        chunks = split_chunks(x_all.shape[0], len(conditions), holdout, chunk_size)
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
                check_cancel(cancel)
                x, hist = sub_solve(step_fn, ev, x, a, b, n, hist, fam, options, sigma_min)
                hist = take_records(hist[-HISTORY_KEPT:], slice(None), x.device)
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
