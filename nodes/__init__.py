"""ComfyUI adapters over ``samplers`` and ``calibration``: the only place that imports ComfyUI.

The Calibrate node, the sampler nodes and the KSampler dropdown registration are the ComfyUI-nodes issue;
until they land the pack registers no nodes.
"""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
