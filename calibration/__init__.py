"""Calibrations: per-step parameters fitted to a model, and their file (imports samplers/, never ComfyUI).

``Calibration`` is what the samplers' ``calibration=`` argument takes; ``Calibration.save(path)`` writes the
safetensors file and ``load(path)`` reads and validates one. The fitting itself (``calibrate``) is the
calibration-engine issue and is not built yet.
"""
from .file import Calibration, CalibrationFileError, load

__all__ = ["Calibration", "CalibrationFileError", "load"]
