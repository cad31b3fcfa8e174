"""Calibrated fast ODE samplers in k-diffusion's calling convention. Pure torch; never imports ComfyUI.

``SAMPLERS[name](model, x, sigmas, extra_args=None, callback=None, disable=None, calibration=None, **options)``
where ``model(x, sigma * s_in, **extra_args)`` returns the denoised x0. Each function carries the registry
facts: ``.base`` (the solver it reduces to without calibration), ``.nfe_per_step``, ``.evaluations(sigmas)``,
``.kind`` ("iia", "amed" or "plain") and ``.params`` (per-step parameter names). Options common to all:
``family`` ("eps"/"v"/"edm" = x0 + sigma n, or "flow" = (1 - sigma) x0 + sigma n) and ``shift``.
"""
from . import amed, gddim, iia  # noqa: F401  (registration)
from .core import CalibrationMismatch, Family
from .registry import SAMPLERS, calibrated, steps_for_evaluations

for _name, _fn in SAMPLERS.items():
    globals()[f"sample_{_name}"] = _fn

__all__ = ["SAMPLERS", "calibrated", "steps_for_evaluations", "Family", "CalibrationMismatch"] + [f"sample_{n}" for n in SAMPLERS]
