"""AMED (Zhou et al., CVPR 2024): each step evaluates the model once more at an intermediate time
s = sigma_next^r * sigma^(1 - r) (queried at a * s) and scales its final direction by c.

``amed`` is AMED-Solver; ``amed_euler``, ``amed_dpm_2``, ``amed_ipndm`` and ``amed_dpmpp_2m`` are AMED-Plugin
on those bases, the multistep ones running on the refined grid {sigma_0, s_0, sigma_1, s_1, ...} with the
midpoint values in their history. Per step: x_next = A + c * B, where A and B depend on (r, a) only; the
calibration fits c in closed form from that split. Uncalibrated (r, c, a) = (1/2, 1, 1): ``amed`` and
``amed_dpm_2`` are DPM-Solver-2, the plugins are their base solver on the grid with geometric midpoints.
Into sigma = 0 a step is one plain base step with no intermediate evaluation.
"""
from functools import partial

import torch

from . import base as B
from .core import CalibrationMismatch, calibrated_sampler, expm1, hypot, sigma_list
from .registry import register

DEFAULTS = {"r": 0.5, "c": 1.0, "a": 1.0}


def afs_denoised(x, sigma, family):
    """Analytical first step: the x0 for which d = x / sqrt(1 + sigma^2) in variance-exploding coordinates.

    Written in the family's own coordinates and stable at flow's sigma = 1 (alpha = 0, where it is 0).
    """
    alpha = family.alpha(sigma)
    norm = hypot(alpha, sigma)
    return x * (alpha / (norm * (norm + sigma)))


def _first_substep(kind, x, d, D, s, s_to, hist, family, opts):
    if kind == "ipndm":
        return B.pndm_step(x, d, 0, [s, s_to], hist, opts.get("max_order", 4), opts.get("variable_step", False))[0]
    if kind == "dpmpp_2m":
        Dx = B.dpmpp_2m_denoised(D, hist[-1]["D"], hist[-1]["s"], s, s_to, family) if hist and s_to > 0 else D
        return B.exp_update(x, Dx, s, s_to, family)
    return x + (s_to - s) * d


STEP_RULE = "0 < r <= 1 and a > 0"  # what every AMED step needs, where it is sampled and where a file is loaded


def valid_steps(r, a):
    """Whether the steps' ``r`` and ``a`` (numbers or tensors of them) all keep STEP_RULE."""
    r, a = torch.as_tensor(r), torch.as_tensor(a)
    return bool(((r > 0) & (r <= 1) & (a > 0)).all())


def amed_parts(kind, ev, x, i, sig, hist, family, r, a, afs, **opts):
    """One AMED step split as (A, B, records): x_next = A + c * B (B is None into sigma = 0)."""
    s, s_next = sig[i], sig[i + 1]
    D = afs_denoised(x, s, family) if (afs and i == 0) else ev(x, sig[i])
    d = B.to_d(x, s, D)
    q = {"x": x, "D": D, "d": d, "s": s}
    if s_next == 0:
        return _first_substep(kind, x, d, D, s, s_next, hist, family, opts), None, [q]
    if not valid_steps(r, a):
        raise CalibrationMismatch(f"AMED step {i}: need {STEP_RULE}, got r={r}, a={a}")
    s_mid = s_next ** r * s ** (1 - r)
    y = _first_substep(kind, x, d, D, s, s_mid, hist, family, opts)
    D_mid = ev(y, a * s_mid)
    d_mid = B.to_d(y, s_mid, D_mid)
    qm = {"x": y, "D": D_mid, "d": d_mid, "s": s_mid}
    if kind == "amed":
        return x, (s_next - s) * d_mid, [q, qm]
    if kind == "euler":
        return y, (s_next - s_mid) * d_mid, [q, qm]
    if kind == "dpm_2":
        return x, (s_next - s) * (d_mid / (2 * r) + (1 - 1 / (2 * r)) * d), [q, qm]
    if kind == "ipndm":
        _, inc = B.pndm_step(y, d_mid, 0, [s_mid, s_next], list(hist) + [q],
                             opts.get("max_order", 4), opts.get("variable_step", False))
        return y, inc, [q, qm]
    # dpmpp_2m: c scales only the model-output term of the second sub-step, as the AMED reference does
    Dx = B.dpmpp_2m_denoised(D_mid, D, s, s_mid, s_next, family)
    h = family.half_log_snr(s_next) - family.half_log_snr(s_mid)
    return (s_next / s_mid) * y, -family.alpha(s_next) * expm1(-h) * Dx, [q, qm]


PLUGINS = {  # name: (base solver, label, docstring)
    "amed": ("dpm_2", "AMED-Solver", "AMED-Solver: one learned intermediate time and direction scale per step."),
    "amed_euler": ("euler", "AMED Euler", "AMED-Plugin on Euler/DDIM."),
    "amed_dpm_2": ("dpm_2", "AMED DPM2", "AMED-Plugin on DPM-Solver-2."),
    "amed_ipndm": ("ipndm", "AMED iPNDM", "AMED-Plugin on iPNDM, on the grid refined by the learned intermediate times."),
    "amed_dpmpp_2m": ("dpmpp_2m", "AMED DPM++ 2M", "AMED-Plugin on DPM-Solver++(2M), on the refined grid."),
}


def amed_step(kind, table, afs, opts, ev, x, i, sig, hist, family):
    r, c, a = (table[k][i] for k in ("r", "c", "a")) if table else (0.5, 1.0, 1.0)
    A, B_, records = amed_parts(kind, ev, x, i, sig, hist, family, r, a, afs, **opts)
    q = dict(records[0], records=records)
    return (A if B_ is None else A + c * B_), q


def amed_evaluations(sigmas, afs=False, **options):
    sig = sigma_list(sigmas)
    n = len(sig) - 1
    return 2 * n - (1 if sig[-1] == 0 else 0) - (1 if afs else 0)


def stepper(kind, params, options):
    """The step function for ``params`` ({"r", "c", "a"}: per-step floats or tensors, or None) and solver options."""
    options = dict(options)
    afs = bool(options.pop("afs", False))
    return partial(amed_step, kind, params, afs, options)


for _name, (_base, _label, _doc) in PLUGINS.items():
    _sample = calibrated_sampler(_name, partial(stepper, "amed" if _name == "amed" else _base), ["r", "c", "a"])
    _sample.__doc__ = _doc
    register(_name, _sample, base=_base, nfe_per_step=2, label=_label,
             evaluations=amed_evaluations, kind="amed", params=("r", "c", "a"),
             uncalibrated=("DPM-Solver-2" if _base == "dpm_2" else
                           f"{_base} on the schedule with each step's geometric-mean sigma added (2 evaluations a step)"))
