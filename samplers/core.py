"""Shared plumbing for every sampler: model families, the model call, the step loop, calibration lookup.

Pure torch (plus numpy for quadrature). Never imports ComfyUI.
"""
import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.utils.checkpoint

try:  # progress bars are a nicety; tqdm ships with ComfyUI, A1111 and k-diffusion but is not a dependency
    from tqdm.auto import trange as _trange
except ImportError:  # pragma: no cover
    _trange = None


# --------------------------------------------------------------------------------------------------
# Scalars: a schedule or a coefficient is a python float when sampling, a 0-d tensor that carries gradients
# when the end-to-end calibration differentiates through the same step code.
# --------------------------------------------------------------------------------------------------

def _either(float_fn, tensor_fn):
    def fn(v):
        return tensor_fn(v) if torch.is_tensor(v) else float_fn(v)
    fn.__name__ = float_fn.__name__
    return fn


log, exp, expm1, log1p = (_either(getattr(math, n), getattr(torch, n)) for n in ("log", "exp", "expm1", "log1p"))


def hypot(a, b):
    return torch.hypot(torch.as_tensor(a), torch.as_tensor(b)) if torch.is_tensor(a) or torch.is_tensor(b) \
        else math.hypot(a, b)


# --------------------------------------------------------------------------------------------------
# Model families
# --------------------------------------------------------------------------------------------------

class Family:
    """How the sampler's x-space relates to data x0 and noise n, for a given sigma.

    ``ve``: x = x0 + sigma * n (eps, v-prediction, EDM and x0 models in k-diffusion/ComfyUI coordinates).
    ``flow``: x = (1 - sigma) * x0 + sigma * n (rectified flow / ComfyUI CONST: SD3, Flux, Wan), sigma in (0, 1].
    In both, dx/dsigma = (x - D) / sigma, so polynomial solvers in sigma need no family knowledge; the
    exponential integrators need alpha(sigma) and the half-log-SNR log(alpha / sigma).
    ``shift`` is the flow time shift the schedule was made with; it only identifies the schedule.
    """

    NAMES = ("ve", "flow")
    ALIASES = {"eps": "ve", "v": "ve", "v_prediction": "ve", "edm": "ve", "x0": "ve", "ve": "ve",
               "flow": "flow", "const": "flow", "rectified_flow": "flow"}
    # A flow schedule starting exactly at sigma = 1 has alpha = 0 and an infinite log-SNR; exponential
    # integrators take the log-SNR of a sigma this close to 1 instead (ComfyUI's offset_first_sigma_for_snr).
    FLOW_SIGMA_CAP = 1.0 - 1e-4

    def __init__(self, name="ve", shift=1.0):
        key = str(name).lower()
        if key not in self.ALIASES:
            raise ValueError(f"unknown model family {name!r}: use one of {sorted(self.ALIASES)}")
        self.name = self.ALIASES[key]
        self.shift = float(shift)

    @classmethod
    def of(cls, family, shift=None):
        if isinstance(family, Family):
            return family if shift is None else Family(family.name, shift)
        return cls("ve" if family is None else family, 1.0 if shift is None else shift)

    def __eq__(self, other):
        return isinstance(other, Family) and (self.name, self.shift) == (other.name, other.shift)

    def __repr__(self):
        return f"Family({self.name!r}, shift={self.shift:g})"

    def alpha(self, sigma):
        return 1.0 if self.name == "ve" else 1.0 - sigma

    def half_log_snr(self, sigma):
        """log(alpha / sigma) (a float, or a 0-d tensor for a tensor sigma); +inf at sigma = 0."""
        if sigma <= 0:
            return math.inf
        if self.name == "ve":
            return -log(sigma)
        s = min(sigma, self.FLOW_SIGMA_CAP)
        return log1p(-s) - log(s)

    def sigma_at(self, half_log_snr):
        """Inverse of half_log_snr."""
        if self.name == "ve":
            return exp(-half_log_snr)
        return 1.0 / (1.0 + exp(half_log_snr))

    def eps(self, x, denoised, sigma):
        """The noise estimate n = (x - alpha * x0) / sigma."""
        return (x - self.alpha(sigma) * denoised) / sigma

    def max_sigma(self):
        return 1.0 if self.name == "flow" else math.inf


# --------------------------------------------------------------------------------------------------
# Model call and loop
# --------------------------------------------------------------------------------------------------

def work_dtype(dtype):
    """Internal math runs in at least float32 whatever the model or latent precision."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class Denoiser:
    """Calls a k-diffusion-style denoiser ``model(x, sigma * s_in, **extra_args) -> x0`` and counts calls.

    Outputs are cast to the working dtype, so fp16/bf16 models do not degrade the solver's arithmetic.
    """

    def __init__(self, model, x, sigmas, extra_args=None):
        self.model = model
        self.extra_args = {} if extra_args is None else extra_args
        self.s_in = x.new_ones([x.shape[0]], dtype=sigmas.dtype)
        self.sigmas = sigmas
        self.dtype = work_dtype(x.dtype)
        self.calls = 0

    def __call__(self, x, sigma):
        """Evaluate at the float ``sigma`` (grid values round-trip exactly to the caller's sigma dtype)."""
        s = torch.as_tensor(sigma, dtype=self.sigmas.dtype, device=self.sigmas.device)
        self.calls += 1
        return self.model(x, s * self.s_in, **self.extra_args).to(self.dtype)


def steps(n, disable):
    if _trange is None or disable:
        return range(n)
    return _trange(n, disable=disable)


def sigma_list(sigmas):
    """The schedule as python floats in float64: step coefficients are computed once, on the CPU."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor with at least two entries (start and end)")
    sig = sigmas.detach().to("cpu", torch.float64).tolist()
    if any(not math.isfinite(s) or s < 0 for s in sig):
        raise ValueError(f"sigmas must be finite and non-negative, got {sig}")
    if any(b >= a for a, b in zip(sig, sig[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {sig}")
    if sig[-2] <= 0:
        raise ValueError("only the last sigma may be zero")
    return sig


def prepare(x):
    """Working copy of the initial state: float32 or better, never aliased with the caller's tensor."""
    return x.to(work_dtype(x.dtype)).clone(), x.dtype


def report(callback, x, i, sigmas, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})


# --------------------------------------------------------------------------------------------------
# Multistep coefficients
# --------------------------------------------------------------------------------------------------

_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(48)


def lagrange_integrals(nodes, a, b, weight=None):
    """w_j = int_a^b weight(t) * l_j(t) dt for the Lagrange basis l_j on ``nodes``.

    Gauss-Legendre with 48 points in float64: exact for polynomial weights, and to machine precision
    for the smooth exponential weights the exponential integrators use over any step they take. With
    tensor nodes or ends (a schedule being learned) the same sum runs in torch and returns 0-d tensors.
    """
    if any(torch.is_tensor(v) for v in (a, b, *nodes)):
        gauss_nodes, gauss_weights = (torch.from_numpy(v) for v in (_GAUSS_NODES, _GAUSS_WEIGHTS))
        total = lambda v: v.sum()  # noqa: E731
    else:
        gauss_nodes, gauss_weights, total = _GAUSS_NODES, _GAUSS_WEIGHTS, lambda v: float(np.sum(v))
        nodes = np.asarray(nodes, dtype=np.float64)
    t = 0.5 * (b - a) * gauss_nodes + 0.5 * (a + b)
    wq = 0.5 * (b - a) * gauss_weights
    if weight is not None:
        wq = wq * weight(t)
    out = []
    for j, tj in enumerate(nodes):
        lj = 1.0
        for m, tm in enumerate(nodes):
            if m != j:
                lj = lj * (t - tm) / (tj - tm)
        out.append(total(wq * lj))
    return out


IPNDM_WEIGHTS = ([1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def adams_bashforth(sig_hist, sig_next, variable_step):
    """Weights on d_i, d_{i-1}, ... for x_{i+1} = x_i + sum_j w_j d_{i-j}, ``sig_hist`` newest first.

    ``variable_step=False`` gives iPNDM's fixed weights times (sigma_next - sigma_i); True gives the exact
    variable-step Adams-Bashforth weights in sigma (integrals of the Lagrange basis on the actual nodes).
    """
    order = len(sig_hist)
    if not variable_step or order == 1:
        h = sig_next - sig_hist[0]
        return [h * w for w in IPNDM_WEIGHTS[order - 1]]
    return lagrange_integrals(sig_hist, sig_hist[0], sig_next)


# --------------------------------------------------------------------------------------------------
# Calibration lookup
# --------------------------------------------------------------------------------------------------

class CalibrationMismatch(ValueError):
    """A calibration was made for another method, schedule or model family than the one sampling."""
    __module__ = "calibrated_samplers"  # what UIs print as its type: short and the same wherever the pack lives


SIGMA_RTOL = 1e-4


def _floats(sigmas):
    return [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]


def _same_schedule(a, b):
    a, b = _floats(a), _floats(b)
    return len(a) == len(b) and all(abs(u - v) <= SIGMA_RTOL * max(abs(u), abs(v), 1e-8) for u, v in zip(a, b))


def check_calibration(calibration, method, sig, family):
    """Raise CalibrationMismatch naming the first field that differs between the file and this run."""
    cal_method = getattr(calibration, "method", None)
    if cal_method is not None and cal_method != method:
        raise CalibrationMismatch(
            f"calibration is for sampler {cal_method!r}, not {method!r}: pick {cal_method!r} or calibrate {method!r}")
    cal_sig = getattr(calibration, "sigmas", None)
    learned = getattr(calibration, "sample_sigmas", None)
    if learned is not None and _same_schedule(learned, sig):
        cal_sig = None  # the run was given the schedule the calibration samples on (its SIGMAS output)
    if cal_sig is not None:
        cal_sig = _floats(cal_sig)
        if len(cal_sig) != len(sig):
            raise CalibrationMismatch(
                f"calibration was made for {len(cal_sig) - 1} steps, this run has {len(sig) - 1}: "
                "use the same step count and scheduler, or calibrate for this schedule")
        for k, (a, b) in enumerate(zip(cal_sig, sig)):
            if abs(a - b) > SIGMA_RTOL * max(abs(a), abs(b), 1e-8):
                raise CalibrationMismatch(
                    f"calibration sigmas differ from this run's at step {k} ({a:.6g} vs {b:.6g}): "
                    "use the same scheduler and denoise, or calibrate for this schedule")
    cal_family = getattr(calibration, "family", None)
    if cal_family is not None:
        cal_family = Family.of(cal_family, getattr(calibration, "shift", None))
        if cal_family.name != family.name:
            raise CalibrationMismatch(
                f"calibration is for a {cal_family.name} model, this model is {family.name}")


def merge_options(calibration, options):
    """Solver options a calibration was fitted with, overridden by nothing: a conflict is an error."""
    fitted = {} if calibration is None or isinstance(calibration, Mapping) else dict(getattr(calibration, "options", {}) or {})
    for k, v in options.items():
        if k in fitted and fitted[k] != v:
            raise CalibrationMismatch(
                f"calibration was fitted with {k}={fitted[k]!r}, this run asks for {k}={v!r}: "
                "drop the option or calibrate with it")
    return {**fitted, **options}


def calibration_params(calibration, method, sig, family, names, optional=()):
    """The per-step parameters a sampler needs as lists of floats, or None for an uncalibrated run.

    ``optional`` names may be absent (they are None in the result then).

    ``calibration`` is None, a mapping name -> tensor (raw parameters, for experiments), or an object with
    ``.params`` (a mapping) and optional ``.method``, ``.sigmas``, ``.family`` / ``.shift``, ``.options`` that
    are checked against this run (see calibration.Calibration).
    """
    if calibration is None:
        return None
    if isinstance(calibration, Mapping):
        params = calibration
    else:
        check_calibration(calibration, method, sig, family)
        params = calibration.params
    missing = [n for n in names if n not in params]
    if missing:
        raise CalibrationMismatch(f"calibration for {method!r} lacks parameters {missing}")
    out = {n: None for n in optional}
    n_steps = len(sig) - 1
    for n in list(names) + [n for n in optional if n in params]:
        p = torch.as_tensor(params[n]).detach().to("cpu", torch.float64)
        if p.ndim == 0 or p.shape[0] != n_steps:
            raise CalibrationMismatch(
                f"calibration parameter {n!r} has shape {tuple(p.shape)}, expected {n_steps} steps first")
        out[n] = p.tolist()
    return out


def sampling_sigmas(calibration, sigmas):
    """The schedule a run samples on: the calibration's learned sigmas where it has them (same count, same first
    and last sigma as the requested ones it was checked against), else the run's own."""
    learned = None if calibration is None or isinstance(calibration, Mapping) else getattr(
        calibration, "sample_sigmas", None)
    if learned is None:
        return sigmas
    return torch.as_tensor(learned, dtype=torch.float64).to(sigmas.device, sigmas.dtype)


# --------------------------------------------------------------------------------------------------
# The step loop every sampler shares
# --------------------------------------------------------------------------------------------------

HISTORY_KEPT = 4  # the deepest multistep rule (4th-order Adams-Bashforth) looks back three steps


def remember(hist, q, keep=HISTORY_KEPT):
    """Append a step's record (or each of its intermediate points' records) and drop what no rule reads."""
    hist.extend(q.pop("records", None) or [q])
    del hist[:-keep]


def integrate(step, ev, x, sig, family, callback=None, sigmas=None, disable=True, checkpoint=False):
    """Drive ``step`` (see samplers.base) over the schedule ``sig`` (floats, or 0-d tensors being learned).

    ``checkpoint``: keep no activations of a step for the backward pass and recompute them there (the end-to-end
    calibration differentiates through whole trajectories: memory stays that of one step, not of all of them).
    """
    hist, keep = [], getattr(step, "history_kept", HISTORY_KEPT)
    for i in steps(len(sig) - 1, disable):
        if checkpoint and torch.is_grad_enabled():
            # the step gets a snapshot of the history: the list itself grows before the recomputation runs
            x_next, q = torch.utils.checkpoint.checkpoint(step, ev, x, i, sig, tuple(hist), family, use_reentrant=False)
        else:
            x_next, q = step(ev, x, i, sig, hist, family)
        report(callback, x, i, sigmas, q["D"])
        remember(hist, q, keep)
        x = x_next
    return x


def run(step, model, x, sigmas, extra_args=None, callback=None, disable=None, family=None):
    """Sample: ``step`` over the schedule ``sigmas``; returns the final state in the caller's dtype."""
    sig = sigma_list(sigmas)
    x, in_dtype = prepare(x)
    ev = Denoiser(model, x, sigmas, extra_args)
    return integrate(step, ev, x, sig, Family.of(family), callback, sigmas, disable).to(in_dtype)


def calibrated_sampler(name, stepper, param_names, optional_params=()):
    """The sampling function of a calibrated method, k-diffusion's convention plus ``calibration``, ``family``,
    ``shift`` and solver options. ``stepper(params, options)`` makes the step function for per-step parameters
    (None: the base solver); the end-to-end calibration calls the same ``stepper`` with tensors that learn.
    """
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, calibration=None, family=None,
               shift=None, **options):
        fam = Family.of(family, shift)
        options = merge_options(calibration, {k: v for k, v in options.items() if v is not None})
        params = calibration_params(calibration, name, sigma_list(sigmas), fam, param_names, optional_params)
        return run(stepper(params, options), model, x, sampling_sigmas(calibration, sigmas), extra_args, callback,
                   disable, fam)

    sample.stepper = stepper
    return sample
