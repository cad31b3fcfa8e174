"""What a calibration gained, as a chart image for the UIs (drawn with PIL, which ComfyUI and the web UIs ship).

Left: the held-out residual of each step against the teacher, before (the base solver's update, grey) and after
the per-step fit (green; red where the step kept the base update), on a log axis with its values. Right: the
held-out endpoint error of the base solver, of the per-step fit and of the end-to-end stage, with the gain as a
number. The title names the method, steps, schedule and cfg. ``python -m calibrated_samplers.calibration plot``
draws a fuller version with matplotlib.
"""
import math

import torch

GREY, GREEN, RED, BLUE = (158, 158, 158), (41, 158, 97), (214, 56, 51), (52, 101, 164)
INK, FAINT, BACKGROUND = (34, 34, 34), (225, 225, 225), (255, 255, 255)


def endpoint_errors(cal):
    """(base, per-step fit, end to end) held-out endpoint RMSE recorded in the calibration (None where absent)."""
    entries = cal.info.get("endpoint_rmse_held_out") or []
    base = [e["rmse"] for e in entries if e.get("strength") == 0.0]
    fitted = [e["rmse"] for e in entries if e.get("strength", 0.0) > 0.0]
    e2e = [e["rmse"] for e in entries if e.get("stage") == "end_to_end"]
    return (min(base) if base else None, min(fitted) if fitted else None, e2e[0] if e2e else None)


def title_of(cal):
    info = cal.info
    parts = [cal.method, f"{cal.steps} steps"]
    if info.get("schedule"):
        parts.append(str(info["schedule"]).split(",")[0])
    if info.get("cfg") is not None:
        parts.append(f"cfg {float(info['cfg']):g}")
    if cal.sample_sigmas is not None:
        parts.append("time steps learned")
    return ", ".join(parts)


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _log_ticks(lo, hi):
    """Values 1, 2, 5 x 10^k inside [lo, hi] (at most 6 of them)."""
    ticks = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** k
            if lo <= v <= hi:
                ticks.append(v)
    while len(ticks) > 6:
        ticks = ticks[::2]
    return ticks


def _number(v):
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}"


def _steps_chart(draw, box, cal, small):
    left, top, right, bottom = box
    before, after = cal.residual_before, cal.residual_after
    draw.text((left, top - 20), "held-out residual per step (RMS vs teacher)", fill=INK, font=small)
    if before is None or after is None:
        draw.text((left + 10, (top + bottom) // 2), "no per-step fit (schedule learned alone)", fill=INK, font=small)
        return
    fallback = cal.fallback if cal.fallback is not None else torch.zeros_like(before)
    values = [v for v in torch.cat([before, after]).tolist() if v > 0]
    if not values:
        return
    lo, hi = min(values), max(values)
    lo, hi = lo / 1.5, hi * 1.5
    if hi / lo < 10:
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    axis_left = left + 46

    def y_of(v):
        return bottom - (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (bottom - top)

    for t in _log_ticks(lo, hi):
        y = y_of(t)
        draw.line([(axis_left, y), (right, y)], fill=FAINT)
        draw.text((left, y - 6), _number(t), fill=INK, font=small)
    n = len(before)
    slot = (right - axis_left) / n
    bar = max(2, int(slot * 0.34))
    for i, (b, a, fb) in enumerate(zip(before.tolist(), after.tolist(), fallback.tolist())):
        x0 = axis_left + int(i * slot + slot * 0.14)
        for k, (v, colour) in enumerate(((b, GREY), (a, RED if fb else GREEN))):
            if v > 0:
                draw.rectangle([x0 + k * bar, y_of(v), x0 + (k + 1) * bar - 1, bottom], fill=colour)
        if n <= 30 or i % max(1, n // 15) == 0:
            draw.text((x0 + bar // 2, bottom + 4), str(i + 1), fill=INK, font=small)
    draw.line([(axis_left, bottom), (right, bottom)], fill=INK)
    draw.line([(axis_left, top), (axis_left, bottom)], fill=INK)
    draw.text((axis_left + (right - axis_left) // 2 - 12, bottom + 18), "step", fill=INK, font=small)
    legend = [(GREY, "base solver"), (GREEN, "calibrated"), (RED, "kept the base update")]
    x = axis_left
    for colour, label in legend:
        draw.rectangle([x, bottom + 38, x + 10, bottom + 48], fill=colour)
        draw.text((x + 14, bottom + 36), label, fill=INK, font=small)
        x += 24 + int(draw.textlength(label, font=small))


def _endpoint_chart(draw, box, cal, small, big):
    left, top, right, bottom = box
    base, fitted, e2e = endpoint_errors(cal)
    draw.text((left, top - 20), "held-out endpoint error (RMSE)", fill=INK, font=small)
    bars = [(label, v, colour) for label, v, colour in (("base", base, GREY), ("per-step", fitted, GREEN),
                                                         ("end to end", e2e, BLUE)) if v is not None]
    if not bars:
        draw.text((left + 4, (top + bottom) // 2), "not recorded", fill=INK, font=small)
        return
    peak = max(v for _, v, _ in bars) or 1.0
    width = (right - left) / len(bars)
    for k, (label, v, colour) in enumerate(bars):
        x0, x1 = left + int(k * width + width * 0.18), left + int((k + 1) * width - width * 0.18)
        y = bottom - (bottom - top - 18) * v / peak
        draw.rectangle([x0, y, x1, bottom], fill=colour)
        draw.text((x0, y - 16), _number(v), fill=INK, font=small)
        draw.text((x0 - 4, bottom + 4), label, fill=INK, font=small)
    draw.line([(left, bottom), (right, bottom)], fill=INK)
    final = e2e if e2e is not None else (fitted if fitted is not None else base)
    if base and final:
        verdict = (f"{base / final:.3g}x lower than the base solver" if final < base
                   else "no gain: the base solver is kept")
        draw.text((left, bottom + 34), verdict, fill=INK, font=big)


def residual_image(cal, width=768, height=360):
    """(height, width, 3) float32 in [0, 1], ComfyUI's IMAGE layout without the batch dimension."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    small, big = _font(12), _font(16)
    draw.text((12, 8), title_of(cal), fill=INK, font=big)
    split = int(width * 0.62)
    _steps_chart(draw, (12, 64, split - 20, height - 64), cal, small)
    _endpoint_chart(draw, (split + 10, 64, width - 14, height - 64), cal, small, big)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return pixels.to(torch.float32) / 255.0
