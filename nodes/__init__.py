"""ComfyUI adapters over ``samplers`` and ``calibration``: the only place that imports ComfyUI.

``mappings()`` registers the models folder and the KSampler dropdown entries and returns the node classes; the
pack's ``__init__`` calls it only inside ComfyUI. The modules import ``comfy`` lazily, so their logic is
testable without it.
"""


def mappings():
    from .pack import mappings as build
    return build()
