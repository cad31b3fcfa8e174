"""A calibration's per-step residuals as an image tensor, drawn with torch alone (UIs have no matplotlib).

One slot per step, left to right from the noisiest: a grey bar for the held-out residual of the base update,
a green bar beside it for the calibrated one (red where the step fell back to the base). Bar heights are
log-scaled over the range of all values, so every step stays readable. ``python -m
calibrated_samplers.calibration plot`` draws the labelled version with matplotlib.
"""
import math

import torch

GREY, GREEN, RED, BACKGROUND, AXIS = (0.62, 0.62, 0.62), (0.16, 0.62, 0.38), (0.84, 0.22, 0.2), (1.0, 1.0, 1.0), (0.2, 0.2, 0.2)


def residual_image(cal, width=768, height=320):
    """(height, width, 3) float32 in [0, 1], ComfyUI's IMAGE layout without the batch dimension."""
    img = torch.empty(height, width, 3)
    img[:] = torch.tensor(BACKGROUND)
    margin = max(4, height // 16)
    img[height - margin, margin:width - margin] = torch.tensor(AXIS)
    before, after = cal.residual_before, cal.residual_after
    if before is None or after is None:
        return img
    fallback = cal.fallback if cal.fallback is not None else torch.zeros_like(before)
    values = torch.cat([before, after]).clamp_min(1e-12)
    lo, hi = math.log10(float(values.min())), math.log10(float(values.max()))
    lo = min(lo, hi - 1.0) - 0.2  # at least a decade of range, and the smallest value still shows as a bar
    usable = height - 2 * margin - 1
    slot = (width - 2 * margin) / len(before)
    for i, (b, a, fb) in enumerate(zip(before.tolist(), after.tolist(), fallback.tolist())):
        left = margin + int(i * slot + slot * 0.12)
        bar = max(1, int(slot * 0.36))
        for k, (v, colour) in enumerate(((b, GREY), (a, RED if fb else GREEN))):
            top = int(usable * (math.log10(max(v, 1e-12)) - lo) / (hi - lo))
            x0 = left + k * bar
            img[height - margin - 1 - top:height - margin, x0:x0 + bar - 1] = torch.tensor(colour)
    return img
