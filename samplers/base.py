"""The base solvers, as single steps that the calibrated samplers build on.

A step is ``step(ev, x, i, sig, hist, family, **opts) -> (x_next, q)``: ``ev`` evaluates the denoiser,
``sig`` is the schedule as python floats, ``hist`` the ``q`` records of earlier steps (newest last), and
``q`` records what this step computed (state ``x``, denoised ``D``, direction ``d`` and solver-specific
quantities) for later steps and for IIA's basis vectors. Every step ends at sigma = 0 with a first-order
update that needs no evaluation there, as k-diffusion's samplers do.
"""
from .core import adams_bashforth, exp, expm1, log


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def exp_update(x, denoised, s, s_next, family):
    """First-order exponential-integrator (DDIM) step in data prediction: exact for constant ``denoised``."""
    h = family.half_log_snr(s_next) - family.half_log_snr(s)
    return (s_next / s) * x - family.alpha(s_next) * expm1(-h) * denoised


def dpmpp_2m_denoised(D, D_prev, s_prev, s, s_next, family):
    """DPM-Solver++(2M)'s extrapolated data prediction for the step s -> s_next (Lu et al. 2022)."""
    lam = family.half_log_snr
    h, h_last = lam(s_next) - lam(s), lam(s) - lam(s_prev)
    r = h_last / h
    return (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * D_prev


def euler(ev, x, i, sig, hist, family):
    """Euler in sigma, which is DDIM for every family (Song et al. 2021)."""
    D = ev(x, sig[i])
    d = to_d(x, sig[i], D)
    return x + (sig[i + 1] - sig[i]) * d, {"x": x, "D": D, "d": d, "s": sig[i]}


def heun(ev, x, i, sig, hist, family):
    """Heun's second-order method in sigma (Karras et al. 2022, Algorithm 1); Euler into sigma = 0."""
    D = ev(x, sig[i])
    d = to_d(x, sig[i], D)
    q = {"x": x, "D": D, "d": d, "s": sig[i]}
    h = sig[i + 1] - sig[i]
    if sig[i + 1] == 0:
        q["dh"] = d
        return x + h * d, q
    x2 = x + h * d
    D2 = ev(x2, sig[i + 1])
    q["D2"], q["dh"] = D2, (d + to_d(x2, sig[i + 1], D2)) / 2
    return x + h * q["dh"], q


def dpm_2(ev, x, i, sig, hist, family):
    """k-diffusion's DPM-Solver-2: midpoint in log sigma (Lu et al. 2022); Euler into sigma = 0."""
    D = ev(x, sig[i])
    d = to_d(x, sig[i], D)
    q = {"x": x, "D": D, "d": d, "s": sig[i]}
    if sig[i + 1] == 0:
        return x + (sig[i + 1] - sig[i]) * d, q
    s_mid = exp(0.5 * (log(sig[i]) + log(sig[i + 1])))
    x2 = x + (s_mid - sig[i]) * d
    q["D2"] = ev(x2, s_mid)
    return x + (sig[i + 1] - sig[i]) * to_d(x2, s_mid, q["D2"]), q


def dpmpp_2m(ev, x, i, sig, hist, family):
    """DPM-Solver++(2M) with the family's half-log-SNR (Lu et al. 2022); first order first and into 0."""
    D = ev(x, sig[i])
    q = {"x": x, "D": D, "d": to_d(x, sig[i], D), "s": sig[i]}
    Dx = D
    if hist and sig[i + 1] > 0:
        Dx = dpmpp_2m_denoised(D, hist[-1]["D"], hist[-1]["s"], sig[i], sig[i + 1], family)
    return exp_update(x, Dx, sig[i], sig[i + 1], family), q


def pndm_step(x, d, i, sig, hist, max_order, variable_step):
    """x + sum_j w_j d_{i-j}: iPNDM's fixed weights, or exact variable-step Adams-Bashforth in sigma."""
    prev = list(reversed(hist[-(max_order - 1):])) if max_order > 1 else []
    ds = [d] + [q["d"] for q in prev]
    ss = [sig[i]] + [q["s"] for q in prev]
    w = adams_bashforth(ss, sig[i + 1], variable_step)
    inc = sum(wj * dj for wj, dj in zip(w, ds))
    return x + inc, inc


def ipndm(ev, x, i, sig, hist, family, max_order=4, variable_step=False):
    """iPNDM (Zhang & Chen 2022): Adams-Bashforth in sigma with warm start, order up to ``max_order``.

    ``variable_step=True`` uses the exact weights for the actual, non-uniform sigma spacing (k-diffusion's
    ``lms``), instead of the fixed uniform-grid weights the papers use.
    """
    D = ev(x, sig[i])
    d = to_d(x, sig[i], D)
    x_next, inc = pndm_step(x, d, i, sig, hist, max_order, variable_step)
    dc = inc / (sig[i + 1] - sig[i])
    return x_next, {"x": x, "D": D, "d": d, "s": sig[i], "dc": dc, "Dc": x - sig[i] * dc}


def spndm(ev, x, i, sig, hist, family, variable_step=False):
    """S-PNDM (Liu et al. 2022): a pseudo improved Euler (Heun) first step, then 2-step Adams-Bashforth."""
    if not hist:
        x_next, q = heun(ev, x, i, sig, hist, family)
        q["dc"] = q["dh"]
    else:
        x_next, q = ipndm(ev, x, i, sig, hist, family, max_order=2, variable_step=variable_step)
        return x_next, q
    q["Dc"] = x - sig[i] * q["dc"]
    return x_next, q


# name -> (step, model evaluations per step, one-line description)
BASE_STEPS = {
    "euler": (euler, 1, "Euler / DDIM"),
    "heun": (heun, 2, "Heun (EDM)"),
    "dpm_2": (dpm_2, 2, "DPM-Solver-2"),
    "dpmpp_2m": (dpmpp_2m, 1, "DPM-Solver++(2M)"),
    "ipndm": (ipndm, 1, "iPNDM"),
    "spndm": (spndm, 1, "S-PNDM"),
}
