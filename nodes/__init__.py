"""ComfyUI adapters over ``samplers`` and ``calibration``: the only place that imports ComfyUI.

Imported by the pack's ``__init__`` only inside ComfyUI; the modules import ``comfy`` lazily, so their logic
is testable without it.
"""
from .pack import mappings

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings()
