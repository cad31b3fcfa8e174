"""gDDIM (Zhang, Tao & Chen, ICLR 2023): exponential-integrator multistep steps in the half-log-SNR,
with exact variable-step coefficients, an optional corrector and the stochastic lambda form.

In variance-exploding coordinates (x / alpha, sigma / alpha) the lambda-family of reverse SDEs is linear in x
with the data prediction D as its input; holding D to the Lagrange polynomial through the last ``order``
predictions (in the half-log-SNR v) and integrating exactly gives, with kappa = 1 + lam^2 and h = v' - v,

    x' = (sigma'/sigma) e^{-lam^2 h} x + alpha' sum_j b_j D_{i-j} + sigma' sqrt(1 - e^{-2 lam^2 h}) z,
    b_j = int_v^{v'} kappa e^{-kappa (v' - u)} l_j(u) du.

lam = 0, order 1 is DDIM; lam = 1, order 1 is DDIM with eta = 1 (the gDDIM paper's lambda form; exactly
k-diffusion's dpmpp_2m_sde first-order step with eta = lam^2). The coefficients depend only on the
schedule, so they are computed once per call; gDDIM needs no calibration. The corrector (Adams-Moulton
with the new point, as UniPC does) reuses the evaluation at the predicted state for the next step, so it
costs no extra evaluation; the last step is never corrected, and a step into sigma = 0 is first order (x = D).
"""
import math

import numpy as np
import torch

from .core import Family, lagrange_integrals, prepare, report, sigma_list, steps, Denoiser
from .registry import register


def step_coefficients(sig, family, i, n_nodes, lam, new_point=False):
    """(state factor, data weights b_j newest first, noise std) for step i with ``n_nodes`` nodes.

    ``new_point``: the nodes start at step i+1 (the corrector) instead of step i.
    """
    v = [family.half_log_snr(s) for s in sig]
    s, s_next = sig[i], sig[i + 1]
    if s_next == 0:
        return 0.0, [1.0], 0.0
    h = v[i + 1] - v[i]
    kappa = 1.0 + lam * lam
    first = i + 1 if new_point else i
    nodes = [v[first - j] for j in range(n_nodes)]
    weights = lagrange_integrals(nodes, v[i], v[i + 1], lambda u: kappa * np.exp(-kappa * (v[i + 1] - u)))
    alpha_next = family.alpha(s_next)
    factor = (s_next / s) * math.exp(-lam * lam * h)
    noise_std = s_next * math.sqrt(-math.expm1(-2 * lam * lam * h))
    return factor, [alpha_next * b for b in weights], noise_std


def coefficient_table(sig, family, order, lam, corrector):
    """Every step's predictor (and corrector) coefficients for this schedule, computed once."""
    if not 1 <= order <= 4:
        raise ValueError(f"gddim order must be 1 to 4, got {order}")
    table = []
    for i in range(len(sig) - 1):
        k = min(order, i + 1)
        pred = step_coefficients(sig, family, i, k, lam)
        corr = None
        if corrector and i + 2 < len(sig):  # the last step is never corrected: that would cost an evaluation
            corr = step_coefficients(sig, family, i, min(k + 1, i + 2), lam, new_point=True)
        table.append((pred, corr))
    return table


def seeded_noise(x, seed):
    """Gaussian noise from a CPU generator: the same numbers on every device for the same seed."""
    if seed is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)


def sample_gddim(model, x, sigmas, extra_args=None, callback=None, disable=None, calibration=None,
                 family=None, shift=None, order=2, corrector=True, lam=0.0, noise_sampler=None, seed=None,
                 s_noise=1.0):
    """gDDIM: exponential-integrator multistep (order 1-4) in the half-log-SNR, optional corrector, lambda noise."""
    if calibration is not None:
        raise ValueError("gddim needs no calibration: its coefficients come from the schedule alone")
    fam = Family.of(family, shift)
    sig = sigma_list(sigmas)
    table = coefficient_table(sig, fam, order, lam, corrector)
    x, in_dtype = prepare(x)
    ev = Denoiser(model, x, sigmas, extra_args)
    if lam != 0 and noise_sampler is None:
        noise_sampler = seeded_noise(x, seed if seed is not None else ev.extra_args.get("seed"))
    history = []  # data predictions D_i, D_{i-1}, ... newest first
    D_next = None
    for i in steps(len(sig) - 1, disable):
        D = ev(x, sig[i]) if D_next is None else D_next
        history.insert(0, D)
        del history[5:]
        report(callback, x, i, sigmas, D)
        (factor, b, noise_std), corr = table[i]
        drift = factor * x + sum(bj * Dj for bj, Dj in zip(b, history))
        z = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise if noise_std > 0 else None
        x_next = drift if z is None else drift + noise_std * z
        D_next = None
        if corr is not None:
            D_next = ev(x_next, sig[i + 1])
            factor, b, _ = corr
            x_next = factor * x + sum(bj * Dj for bj, Dj in zip(b, [D_next] + history))
            if z is not None:
                x_next = x_next + noise_std * z
        x = x_next
    return x.to(in_dtype)


register("gddim", sample_gddim, base="gddim", nfe_per_step=1, kind="plain", label="gDDIM",
         evaluations=lambda sigmas, **options: len(sigma_list(sigmas)) - 1)
