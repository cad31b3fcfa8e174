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

- ``pas_calibration`` / ``pas_sample``: PAS (Wang et al., ICML 2025), a PCA-basis correction of each step's
  direction with about four coordinates per step, for plain Euler (DDIM) and iPNDM (benchmarks/pas.py).
"""
import math

import torch

from calibrated_samplers.calibration import calibrate
from calibrated_samplers.calibration.batch import split_sizes  # the pack's batch split
from calibrated_samplers.calibration.teacher import sub_grid  # the pack's teacher grid
from calibrated_samplers.samplers import SAMPLERS, Family
from calibrated_samplers.samplers.base import exp_update


def _per_noise(x):
    return x.flatten(1).to(torch.float64)


def _teacher(model, x, grid, cond, fam):
    """DPM-Solver++(2M) over the fine ``grid`` from ``x``: the states at every grid point (per noise, float64) and
    the denoised estimates at all but the last."""
    states, denoised = [], []

    def record(d):
        states.append(_per_noise(d["x"]))
        denoised.append(d["denoised"].to(torch.float64))

    end = SAMPLERS["iia_dpmpp_2m"](model, x, torch.tensor(grid, dtype=torch.float64), extra_args=cond, disable=True,
                                   callback=record, family=fam.name, shift=fam.shift)
    states.append(_per_noise(end))  # the callback saw every grid point but the last
    return states, denoised


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
    for c, cond in enumerate(conditions):
        for a in range(c * per, (c + 1) * per, chunk):
            x = noise[a:min(a + chunk, (c + 1) * per)].to(torch.float64)
            states, denoised = _teacher(model, x, grid, cond, fam)
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


# --------------------------------------------------------------------------------------------------
# PAS-style correction (Wang et al., "Diffusion Sampling Correction via Approximately 10 Parameters", ICML 2025)
# --------------------------------------------------------------------------------------------------
# Per step, the model's direction d is replaced by sum_k c_k u_k over a per-sample orthonormal basis: u_1 = d / |d|,
# then the leading principal directions of the trajectory so far ({x_T, d_0, ..., d_i}, centred), orthogonalised
# against the earlier ones and signed toward x_i - x_T. The few coordinates c of each step are fitted step by step
# along the corrected trajectory against the teacher's state at the step's end, and a step keeps its correction only
# where it lowers that error (PAS's adaptive search). Differences from the paper: the coordinates are the exact
# least-squares optimum of the squared error (the paper runs SGD on an L1 loss), and the teacher is this file's
# DPM-Solver++(2M) on a fine grid (as for GITS) rather than Heun.
PAS_COMPONENTS = 4
PAS_ORDER = 3  # iPNDM's order with PAS (the paper's recommendation)


def _pas_basis(x, x_T, d, buffer):
    """(B, K, D) float64: the per-sample orthonormal basis the coordinates multiply."""
    u = [_per_noise(d) / _per_noise(d).norm(dim=1, keepdim=True).clamp_min(1e-30)]
    data = torch.stack([_per_noise(v) for v in [x_T, *buffer, d]], 1)
    _, _, vh = torch.linalg.svd(data - data.mean(1, keepdim=True), full_matrices=False)
    toward = _per_noise(x) - _per_noise(x_T)
    for j in range(min(PAS_COMPONENTS - 1, data.shape[1] - 1)):
        v = vh[:, j]
        for w in u:
            v = v - (v * w).sum(1, keepdim=True) * w
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        u.append(torch.where((toward * v).sum(1, keepdim=True) >= 0, v, -v))
    return torch.stack(u, 1)


def _pas_weights(i, sig, base):
    """Weights on d_i, d_{i-1}, ... of the step sig[i] -> sig[i+1] (Euler, or iPNDM's fixed ones)."""
    from calibrated_samplers.samplers.core import IPNDM_WEIGHTS
    h = sig[i + 1] - sig[i]
    order = 1 if base == "euler" else min(i + 1, PAS_ORDER)
    return [h * w for w in IPNDM_WEIGHTS[order - 1]]


def _pas_step(model, x, i, sig, x_T, buffer, extra_args, base, coords):
    """One step; returns (x_next, the direction used, the basis, the part of x_next without this step's direction,
    this step's weight on it)."""
    D = model(x, x.new_ones(x.shape[0]) * sig[i], **extra_args).to(torch.float64)
    d = (x - D) / sig[i]
    U = _pas_basis(x, x_T, d, buffer)
    w = _pas_weights(i, sig, base)
    rest = x + sum(wj * dj for wj, dj in zip(w[1:], reversed(buffer)))  # the earlier directions' part
    used = d if coords is None else torch.einsum("bkd,k->bd", U[:, :len(coords)], coords).reshape(d.shape)
    return rest + w[0] * used, used, U, rest, w[0]


def pas_sample(model, x, sigmas, coords, extra_args=None, base="euler"):
    """Euler or iPNDM with the PAS-style corrections ``coords`` (one tensor of coordinates per step, or None)."""
    sig, x = [float(s) for s in sigmas], x.to(torch.float64)
    x_T, buffer = x, []
    for i in range(len(sig) - 1):
        x, used, *_ = _pas_step(model, x, i, sig, x_T, buffer, extra_args or {}, base, coords[i])
        buffer.append(used)
    return x


def pas_calibration(model, sigmas, noise, conditions, family="ve", shift=1.0, sigma_min=None, base="euler",
                    fine_steps=10):
    """The per-step coordinates for ``pas_sample`` (None where a step keeps the plain direction), fitted on ``noise``;
    returns (coords, model evaluations per noise)."""
    fam = Family.of(family, shift)
    sig = [float(s) for s in sigmas]
    fine, at = [sig[0]], [0]
    for a, b in zip(sig, sig[1:]):
        fine += sub_grid(a, b, fine_steps, sigma_min)[1:]
        at.append(len(fine) - 1)
    sizes = split_sizes(noise.shape[0], len(conditions))  # the batch split over the conditions as calibrate() does
    starts = [sum(sizes[:c]) for c in range(len(conditions))]
    groups = [(noise[a:a + n].to(torch.float64), cond) for a, n, cond in zip(starts, sizes, conditions)]
    targets = []
    for x, cond in groups:
        states, _ = _teacher(model, x, fine, cond, fam)
        targets.append([states[j] for j in at[1:]])
    evaluations = len(fine) - 1
    xs = [x for x, _ in groups]
    buffers = [[] for _ in groups]
    coords = []
    for i in range(len(sig) - 1):
        K = min(PAS_COMPONENTS, i + 2)
        G = torch.zeros(K, K, dtype=torch.float64)
        r = torch.zeros(K, dtype=torch.float64)
        plain_err, parts = 0.0, []
        for g, (x0, cond) in enumerate(groups):
            x_next, d, U, rest, w0 = _pas_step(model, xs[g], i, sig, x0, buffers[g], cond, base, None)
            Bk = w0 * U[:, :K]
            y = _per_noise(targets[g][i]) - _per_noise(rest)
            G += torch.einsum("bkd,bld->kl", Bk, Bk)
            r += torch.einsum("bkd,bd->k", Bk, y)
            plain_err += float((_per_noise(x_next) - _per_noise(targets[g][i])).pow(2).sum())
            parts.append((d, U, rest, w0))
        evaluations += 1
        c = torch.linalg.lstsq(G, r).solution
        fitted_err = sum(float(((_per_noise(rest) + w0 * torch.einsum("bkd,k->bd", U[:, :K], c))
                                - _per_noise(targets[g][i])).pow(2).sum())
                         for g, (d, U, rest, w0) in enumerate(parts))
        keep = fitted_err < plain_err
        coords.append(c if keep else None)
        for g, (d, U, rest, w0) in enumerate(parts):
            used = torch.einsum("bkd,k->bd", U[:, :K], c).reshape(d.shape) if keep else d
            buffers[g].append(used)
            xs[g] = rest + w0 * used
    return coords, evaluations
