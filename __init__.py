"""Calibrated Samplers: fast ODE samplers calibrated to your own diffusion model.

This file is the ComfyUI entry point. It imports without ComfyUI (tests, A1111/Forge, plain Python use the
``samplers`` and ``calibration`` subpackages directly); the node adapters load only inside ComfyUI.
"""
import sys

__version__ = "0.1.0"

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./nodes/web"  # the frontend extension: wider nodes where file names are long

# ComfyUI has imported its own ``comfy`` package before it loads custom nodes; anywhere else we stay inert.
if "comfy" in sys.modules and "comfy.samplers" in sys.modules:
    from .nodes import mappings as _mappings

    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _mappings()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
