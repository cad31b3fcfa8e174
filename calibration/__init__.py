"""Calibrations: per-step parameters fitted to a model, and their file (imports samplers/, never ComfyUI).

``calibrate(model, sigmas, sampler=NAME, noise=BATCH, extra_args=None, **options)`` fits one and returns a
``Calibration``, which is what the samplers' ``calibration=`` argument takes; ``Calibration.save(path)``
writes the safetensors file and ``load(path)`` reads and validates one. ``python -m
calibrated_samplers.calibration --help`` is the command line (calibrate, inspect, plot).
"""
from .batch import CalibrationCancelled
from .engine import calibrate
from .file import Calibration, CalibrationFileError, load

__all__ = ["calibrate", "Calibration", "CalibrationCancelled", "CalibrationFileError", "load"]
