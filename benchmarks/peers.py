"""The published few-step methods a user would otherwise pick, fitted on the same model, noises and evaluations.

- ``gits_schedule``: GITS (Chen et al., "A Geometric Perspective on Optimal Timesteps", ICML 2024): the time steps
  by dynamic programming over a fine grid, each candidate step's cost being the error of one DDIM step from the
  teacher's state at its start to the teacher's state at its end (averaged over the calibration noises). The
  plain DPM-Solver++(2M) or iPNDM then samples on that schedule, as GITS applies its schedule to other solvers.
- LD3-style (Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025): the time steps learned by
  gradient descent through the plain solver against the teacher's endpoint. That is this pack's end-to-end stage
  with the solver's own parameters held at the base solver's (``calibrate(..., learn_params=False)``), so both
  use the same teacher, noises, optimiser and held-out early stopping: ``ld3_calibration``.

Both keep the requested first and last positive sigma, as the pack's learned schedules do.
"""
import math

import torch

from calibrated_samplers.calibration import calibrate
from calibrated_samplers.samplers import SAMPLERS, Family
from calibrated_samplers.samplers.base import exp_update


def _per_noise(x):
    return x.flatten(1).to(torch.float64)


def gits_schedule(model, sigmas, noise, conditions, family="ve", shift=1.0, grid_points=64, chunk=64):
    """A GITS schedule with the same count and ends as ``sigmas`` (ending at 0 or at its last sigma).

    Returns (sigmas, model evaluations per noise spent). ``noise``: initial states at sigmas[0]; ``conditions``:
    one extra_args per condition, the batch split evenly over them as calibrate() does.
    """
    fam = Family.of(family, shift)
    sig = [float(s) for s in sigmas]
    zero = sig[-1] == 0
    first, last = sig[0], sig[-2] if zero else sig[-1]
    n_points = len(sig) - (1 if zero else 0)  # positive sigmas in the schedule, both ends included
    grid = [math.exp(math.log(first) + (math.log(last) - math.log(first)) * j / (grid_points - 1))
            for j in range(grid_points)]
    grid[0], grid[-1] = first, last
    cost = torch.zeros(grid_points, grid_points, dtype=torch.float64)
    per = noise.shape[0] // len(conditions)
    teacher_step = SAMPLERS["iia_dpmpp_2m"]  # DPM-Solver++(2M) on the fine grid: the teacher trajectory
    for c, cond in enumerate(conditions):
        for a in range(c * per, (c + 1) * per, chunk):
            x = noise[a:min(a + chunk, (c + 1) * per)].to(torch.float64)
            states, denoised = [], []

            def record(d):
                states.append(_per_noise(d["x"]))
                denoised.append(d["denoised"].to(torch.float64))

            end = teacher_step(model, x, torch.tensor(grid, dtype=torch.float64), extra_args=cond, disable=True,
                               callback=record, family=fam.name, shift=fam.shift)
            states.append(_per_noise(end))  # the state at the last grid point
            for j in range(grid_points - 1):
                xj = states[j].reshape(x.shape)
                for k in range(j + 1, grid_points):
                    step = exp_update(xj, denoised[j], grid[j], grid[k], fam)  # one DDIM step j -> k
                    cost[j, k] += (_per_noise(step) - states[k]).norm(dim=1).sum()
    # dynamic programme: best[k][m] = least cost of reaching grid point k in m steps from point 0
    steps = n_points - 1
    inf = float("inf")
    best = [[inf] * (steps + 1) for _ in range(grid_points)]
    back = [[-1] * (steps + 1) for _ in range(grid_points)]
    best[0][0] = 0.0
    for m in range(1, steps + 1):
        for k in range(1, grid_points):
            for j in range(k):
                v = best[j][m - 1] + float(cost[j, k])
                if v < best[k][m]:
                    best[k][m], back[k][m] = v, j
    path, k = [grid_points - 1], grid_points - 1
    for m in range(steps, 0, -1):
        k = back[k][m]
        path.append(k)
    chosen = [grid[j] for j in reversed(path)] + ([0.0] if zero else [])
    return torch.tensor(chosen, dtype=torch.float64), grid_points - 1


def ld3_calibration(model, sigmas, sampler, noise, conditions, **options):
    """The plain ``sampler``'s time steps learned end to end, nothing else (a Calibration sampling on them)."""
    return calibrate(model, sigmas, sampler, noise, conditions, learn_params=False, learn_sigmas=True, **options)
