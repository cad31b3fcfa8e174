"""Improved Integration Approximation (Zhang, Chen et al., ICLR 2024): a base step plus fitted multiples
of quantities the step already computed.

Every variant is ``x_next = base_step(x, history) + sum_k coeffs[i, k] * g_k``; a variant only declares its
base step and how to read its basis vectors ``g_k`` off the step records. ``terms(q, prev, family)`` gives
the vectors of one step record ``q`` (``prev`` is the record before it); with history depth r the basis is
the terms of steps i, i-1, ..., i-r, so the coefficient table has ``n_terms * (r + 1)`` columns and the
depth is read off its shape. A vector that does not exist at a step (no history yet, no second evaluation
into sigma = 0) is None and its coefficient must be zero.
"""
from functools import partial

import torch

from . import base as B
from .core import HISTORY_KEPT, CalibrationMismatch, calibrated_sampler, sigma_list
from .amed import afs_denoised
from .registry import register


class Variant:
    """A base step and its basis: ``terms`` of this step's record (``n_terms`` vectors) and, for each of up to
    ``max_depth`` earlier steps, ``older`` terms of its record (``n_older`` vectors; default: the same terms)."""

    def __init__(self, name, base, terms, n_terms, max_depth, doc, other_bases=None, older=None):
        self.name, self.base, self.terms, self.n_terms, self.max_depth, self.doc = (
            name, base, terms, n_terms, max_depth, doc)
        self.older, self.n_older = older or (terms, n_terms)
        self.other_bases = dict(other_bases or {})  # basis name -> (terms, n_terms, max_depth[, (older, n_older)])

    @property
    def bases(self):
        return ["default"] + sorted(self.other_bases)

    def with_basis(self, basis):
        """This variant with another of its bases (the ``basis`` solver option), or itself for None/"default"."""
        if basis in (None, "default"):
            return self
        if basis not in self.other_bases:
            raise CalibrationMismatch(f"{self.name} has no basis {basis!r}; choose one of {self.bases}")
        terms, n_terms, max_depth, *older = self.other_bases[basis]
        return Variant(self.name, self.base, terms, n_terms, max_depth, self.doc, older=older[0] if older else None)

    def columns(self, depth):
        return self.n_terms + self.n_older * depth

    def depth(self, n_columns):
        depth, rem = divmod(n_columns - self.n_terms, self.n_older)
        if rem or not 0 <= depth <= self.max_depth:
            raise CalibrationMismatch(
                f"{self.name} takes {self.n_terms} coefficients for its step plus {self.n_older} per earlier step, "
                f"at most {self.max_depth} earlier steps; got {n_columns} per step")
        return depth

    def correct(self, x_next, coeffs, q, hist, family, depth, step):
        """``x_next + sum_k coeffs[k] * g_k``; a nonzero coefficient on a missing basis vector is an error."""
        for k, (c, g) in enumerate(zip(coeffs, self.basis(q, hist, family, depth))):
            if g is None:
                if c != 0:
                    raise CalibrationMismatch(
                        f"{self.name} step {step}: coefficient {k} is {float(c):g} but its basis vector does not "
                        "exist at this step (no history or no second evaluation); the file is inconsistent")
                continue
            if torch.is_tensor(c) or c != 0:  # a coefficient being learned counts even at zero: it needs its gradient
                x_next = x_next + c * g
        return x_next

    def basis(self, q, hist, family, depth):
        records = [q] + list(reversed(hist))
        out = []
        for k in range(depth + 1):
            terms, n = (self.terms, self.n_terms) if k == 0 else (self.older, self.n_older)
            if k < len(records):
                out += terms(records[k], records[k + 1] if k + 1 < len(records) else None, family)
            else:
                out += [None] * n
        return out


def _diff(a, b):
    return None if a is None or b is None else a - b


def _ddim_terms(q, prev, family):
    eps = family.eps(q["x"], q["D"], q["s"])
    if prev is None:
        return [None, None]
    return [q["D"] - prev["D"], eps - family.eps(prev["x"], prev["D"], prev["s"])]


def _cfg_terms(q, prev, family):
    return [family.eps(q["x"], q["D"], q["s"])]


def _state_terms(q, prev, family):
    return [q["x"], q["D"]]


def _heun_direction_terms(q, prev, family):
    return [q["dh"]]


def _edm_terms(q, prev, family):
    return [q["x"] - q["D"], _diff(q.get("D2"), q["D"])]


def _ddim_paper_terms(q, prev, family):
    return [q["D"], family.eps(q["x"], q["D"], q["s"])]


def _denoised_terms(q, prev, family):
    return [q["D"]]


def _direction_terms(q, prev, family):
    return [q["d"]]


def _pndm_terms(q, prev, family):
    if prev is None:
        return [None, None]
    return [q["Dc"] - prev["Dc"], q["dc"] - prev["dc"]]


VARIANTS = [
    Variant("iia_ddim", "euler", _ddim_terms, 2, 0,
            "IIA-DDIM: Euler/DDIM plus the x0- and eps-differences with the previous step.",
            {"paper": (_ddim_paper_terms, 2, 1)}),
    Variant("iia_ddim_cfg", "euler", _cfg_terms, 1, 0,
            "IIA-DDIM for guided sampling: one coefficient on the guided eps."),
    Variant("iia_dpmpp_2m", "dpmpp_2m", _state_terms, 2, 9,
            "IIA-DPM-Solver++(2M): DPM-Solver++(2M) plus the state and x0.",
            {"full": (_state_terms, 2, 9, (_denoised_terms, 1))}),
    Variant("biia_edm", "heun", _heun_direction_terms, 1, 1,
            "BIIA-EDM: Heun plus its averaged direction of this (and the previous) step."),
    Variant("iia_edm", "heun", _edm_terms, 2, 1,
            "IIA-EDM: Heun plus x - D and D' - D of this (and the previous) step."),
    Variant("iia_ipndm", "ipndm", _pndm_terms, 2, 0,
            "IIA-iPNDM: iPNDM plus the differences of its combined x0 and direction.",
            {"paper": (_direction_terms, 1, 3)}),
    Variant("iia_spndm", "spndm", _pndm_terms, 2, 0,
            "IIA-SPNDM: S-PNDM plus the differences of its combined x0 and direction.",
            {"paper": (_direction_terms, 1, 1)}),
]


def base_evaluations(base, sigmas, afs=False, **options):
    sig = sigma_list(sigmas)
    n = len(sig) - 1
    last_free = 1 if sig[-1] == 0 else 0
    per_step = B.BASE_STEPS[base][1]
    if per_step == 2:
        count = 2 * n - last_free
    elif base == "spndm":
        count = n + (1 if sig[1] > 0 else 0)
    else:
        count = n
    return count - (1 if afs else 0)  # the analytic first step answers one call without the model


class AnalyticFirst:
    """The denoiser with its first call answered without the model (AFS, as AMED uses it: Zhou et al. 2024): at the
    first sigma the model sees nearly pure noise, and its output there is close to the analytic one for data of
    zero mean and unit variance. A two-evaluation base step still calls the model for its second evaluation."""

    def __init__(self, ev, family):
        self.ev, self.family, self.answered = ev, family, False

    def __call__(self, x, sigma):
        if self.answered:
            return self.ev(x, sigma)
        self.answered = True
        return afs_denoised(x, sigma, self.family)


class TimeScaled:
    """The denoiser queried at ``scale`` times the sigma a step asks for (AMED's ``a``): the network's time is
    learned apart from the integration grid, which corrects its bias at few steps."""

    def __init__(self, ev, scale):
        self.ev, self.scale = ev, scale

    def __call__(self, x, sigma):
        return self.ev(x, self.scale * sigma)


def iia_step(base_step, variant, coeffs, scales, afs, ev, x, i, sig, hist, family):
    """The base step (its model queried at ``scales[i]`` times its sigmas; with ``afs`` the first step's denoised is
    the analytic one), then the fitted multiples of its basis vectors (``coeffs``: one row per step, or None)."""
    if scales is not None:
        ev = TimeScaled(ev, scales[i])
    if afs and i == 0:
        ev = AnalyticFirst(ev, family)
    x_next, q = base_step(ev, x, i, sig, hist, family)
    if coeffs is not None:
        x_next = variant.correct(x_next, coeffs[i], q, hist, family, variant.depth(len(coeffs[i])), i)
    return x_next, q


def stepper(variant, params, options):
    """The step function for ``params`` ({"coeffs": rows of floats or a tensor, "a": optional time scales}, or
    None) and solver options."""
    options = dict(options)
    v = variant.with_basis(options.pop("basis", None))
    afs = bool(options.pop("afs", False))
    coeffs = None if params is None else params["coeffs"]
    scales = None if params is None else params.get("a")
    step = partial(iia_step, partial(B.BASE_STEPS[variant.base][0], **options), v, coeffs, scales, afs)
    if coeffs is not None:  # a table of the wrong width is refused before any model call
        step.history_kept = max(HISTORY_KEPT, v.depth(len(coeffs[0])) + 1)
    return step


LABELS = {"iia_ddim": "IIA DDIM", "iia_ddim_cfg": "IIA DDIM CFG", "iia_dpmpp_2m": "IIA DPM++ 2M", "biia_edm": "BIIA Heun",
          "iia_edm": "IIA Heun", "iia_ipndm": "IIA iPNDM", "iia_spndm": "IIA S-PNDM"}

for _v in VARIANTS:
    _sample = calibrated_sampler(_v.name, partial(stepper, _v), ["coeffs"], ["a"])
    _sample.__doc__ = _v.doc
    register(_v.name, _sample, base=_v.base, nfe_per_step=B.BASE_STEPS[_v.base][1],
             evaluations=partial(base_evaluations, _v.base), kind="iia", params=("coeffs",), optional_params=("a",),
             label=LABELS[_v.name])
VARIANT_BY_NAME = {v.name: v for v in VARIANTS}
