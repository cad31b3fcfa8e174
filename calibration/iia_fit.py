"""Fitting IIA coefficients: per-step least squares, sequential along the calibrated trajectory.

At step i every noise of the batch takes the variant's base step (giving x_base and the basis vectors g_k);
the target y is either the same base solver over ``fine_steps`` sub-steps of [sigma_i, sigma_i+1] from the
same state and history (``target="local"``, the paper's), or the state of a fine teacher solve from the same
initial noise (``target="trajectory"``, as AMED trains its students; calibration-notes.md). The coefficients
solve (G + ridge * mean(diag G) I) c = q with G = sum <g_k, g_l>, q = sum <g_k, y - x_base> accumulated in
float64 over the fitting share of the batch; the held-out share measures the step's residual with and without
the correction, and a step whose correction does not help there falls back to the base update. All noises
then advance with the corrected update, so later steps are fitted on the states sampling will see.

Work in progress (calibration-engine issue): everything is held in memory at once (no chunking yet).
"""
import torch

from ..samplers import base as B
from ..samplers._core import Denoiser, Family, prepare, remember, sigma_list
from ..samplers.iia import VARIANT_BY_NAME


def _sub_solve(step_fn, ev, x, sig, i, fine_steps, hist, family, options):
    """The base solver over ``fine_steps`` equal sub-steps in log sigma (linear into sigma = 0)."""
    a, b = sig[i], sig[i + 1]
    if b > 0:
        grid = torch.logspace(torch.log10(torch.tensor(a)), torch.log10(torch.tensor(b)), fine_steps + 1,
                              dtype=torch.float64).tolist()
    else:
        grid = torch.linspace(a, b, fine_steps + 1, dtype=torch.float64).tolist()
    grid[0], grid[-1] = a, b
    sub_hist = list(hist)
    for j in range(fine_steps):
        x, q = step_fn(ev, x, j, grid, sub_hist, family, **options)
        remember(sub_hist, q)
    return x, sub_hist


def _flat(t):
    return t.reshape(t.shape[0], -1).to(torch.float64)


def fit_iia(model, sigmas, method, noise, extra_args=None, family=None, shift=None, fine_steps=10,
            target="local", history=None, ridge=1e-6, holdout=0.25, progress=None, **options):
    """Return (coeffs, residual_before, residual_after, fallback) for IIA variant ``method``."""
    variant = VARIANT_BY_NAME[method]
    step_fn = B.BASE_STEPS[variant.base][0]
    fam = Family.of(family, shift)
    sig = sigma_list(sigmas)
    depth = variant.max_depth if history is None else int(history)
    if not 0 <= depth <= variant.max_depth:
        raise ValueError(f"{method} supports history depth 0 to {variant.max_depth}, got {depth}")
    n_steps, n_coeffs = len(sig) - 1, variant.n_terms * (depth + 1)
    x, _ = prepare(noise)
    n_hold = int(round(holdout * x.shape[0]))
    if x.shape[0] - n_hold < 1 or (holdout > 0 and n_hold < 1):
        raise ValueError(f"a batch of {x.shape[0]} noises cannot be split {1 - holdout:.0%}/{holdout:.0%}")
    fit = slice(0, x.shape[0] - n_hold)
    ev = Denoiser(model, x, sigmas, extra_args)
    teacher = None
    if target == "trajectory":
        teacher = [x]
        t_hist, xt = [], x
        for i in range(n_steps):
            xt, t_hist = _sub_solve(step_fn, ev, xt, sig, i, fine_steps, t_hist, fam, options)
            teacher.append(xt)
    elif target != "local":
        raise ValueError(f"target must be 'local' or 'trajectory', got {target!r}")
    coeffs = torch.zeros(n_steps, n_coeffs, dtype=torch.float64)
    before = torch.zeros(n_steps, dtype=torch.float64)
    after = torch.zeros(n_steps, dtype=torch.float64)
    fallback = torch.zeros(n_steps, dtype=torch.float64)
    hist = []
    for i in range(n_steps):
        x_base, q = step_fn(ev, x, i, sig, hist, fam, **options)
        y = teacher[i + 1] if teacher is not None else _sub_solve(step_fn, ev, x, sig, i, fine_steps, hist, fam, options)[0]
        basis = variant.basis(q, hist, fam, depth)
        live = [k for k, g in enumerate(basis) if g is not None]
        rho = _flat(y - x_base)
        c = torch.zeros(n_coeffs, dtype=torch.float64)
        if live:
            g = torch.stack([_flat(basis[k]) for k in live], dim=1)  # (B, K, D)
            gram = torch.einsum("bkd,bld->kl", g[fit], g[fit])
            rhs = torch.einsum("bkd,bd->k", g[fit], rho[fit])
            scale = gram.diagonal().mean().clamp_min(1e-300)
            sol = torch.linalg.solve(gram + ridge * scale * torch.eye(len(live), dtype=torch.float64), rhs)
            c[live] = sol
        check = slice(fit.stop, None) if n_hold else fit
        corr = torch.zeros_like(rho) if not live else torch.einsum("k,bkd->bd", c[live], g)
        before[i] = rho[check].pow(2).sum(1).mean()
        after[i] = (rho[check] - corr[check]).pow(2).sum(1).mean()
        if live and not after[i] < before[i]:
            c.zero_()
            fallback[i] = 1
            after[i] = before[i]
            corr = torch.zeros_like(rho)
        coeffs[i] = c
        x_next = x_base + corr.reshape(x_base.shape).to(x_base.dtype)
        remember(hist, q)
        x = x_next
        if progress is not None:
            progress(i + 1, n_steps)
    return coeffs, before, after, fallback, ev.calls
