"""The checks every calibration entry makes before any work (the ComfyUI node, the web UI route and tab, the CLI and
``calibrate()``): one rule and one message per input, so a user hears the same thing wherever they start.
"""
import math
import os
import re

MAX_NAME = 200  # characters of a file name before ".safetensors" (file systems allow 255 bytes; leave room)
NAME = re.compile(r"[\w][\w.\- ]*")


class RequestError(ValueError):
    """A calibration request that cannot work; the message names the input and what to do instead."""
    __module__ = "calibrated_samplers"  # what UIs print as its type: short and the same wherever the pack lives


def min_batch(prompts, holdout=0.25):
    """The smallest batch that gives every prompt at least one fitted and one held-out noise."""
    per = 1
    while per - int(round(holdout * per)) < 1 or (holdout > 0 and int(round(holdout * per)) < 1):
        per += 1
    return per * max(1, int(prompts))


def check_request(steps=None, cfg=None, width=None, height=None, batch_size=None, prompts=1, holdout=0.25,
                  filename=None):
    """Raise RequestError for the first input that cannot work; None-valued inputs are not checked."""
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise RequestError(f"steps must be a whole number of at least 1, got {steps!r}")
    if cfg is not None and (not math.isfinite(float(cfg)) or float(cfg) < 0):
        raise RequestError(f"cfg must be 0 or more, got {cfg!r}")
    for label, v in (("width", width), ("height", height)):
        if v is not None and (not isinstance(v, int) or v < 8 or v % 8):
            raise RequestError(f"{label} must be a multiple of 8 of at least 8 pixels (the latent is 1/8 the size), "
                               f"got {v!r}")
    if batch_size is not None:
        need = min_batch(prompts, holdout)
        if not isinstance(batch_size, int) or batch_size < need:
            raise RequestError(f"batch size {batch_size!r} is too small for {prompts} prompt(s): each prompt needs "
                               f"noises to fit on and {holdout:.0%} held out to check the result; use at least "
                               f"{need} (more is better: 32 or more per prompt)")
    if filename is not None:
        check_filename(filename)


MAX_ENTRIES = 200  # (steps, cfg, denoise) combinations one calibration may fit


def _numbers(text, label, convert):
    out = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            out.append((convert(lo.strip()), convert(hi.strip())) if sep else (convert(part), None))
        except ValueError:
            raise RequestError(f"{label} {text!r} is not understood: write numbers separated by commas, or a range "
                               "like 4-12") from None
    return out


def parse_steps(text, steps):
    """The step counts of a request: ``steps`` plus those in ``text`` ("4-12", "6, 8, 10", "" for none)."""
    out = {int(steps)} if steps is not None else set()
    for lo, hi in _numbers(text, "steps list", int):
        out.update(range(lo, hi + 1) if hi is not None else [lo])
    if not out or min(out) < 1:
        raise RequestError(f"step counts must be whole numbers of at least 1, got {sorted(out)}")
    return sorted(out)


def parse_cfgs(text, cfg, per_range=3):
    """The cfg values to fit: ``cfg`` alone when ``text`` is empty, else the values in ``text`` ("3, 5.5, 8"); a
    range "3-8" fits ``per_range`` evenly spaced values (runs in between are interpolated)."""
    out = set()
    for lo, hi in _numbers(text, "cfg list", float):
        if hi is None:
            out.add(lo)
        elif hi <= lo:
            raise RequestError(f"cfg range {lo:g}-{hi:g} must go from low to high")
        else:
            out.update(lo + (hi - lo) * k / (per_range - 1) for k in range(per_range))
    if not out:
        out = {float(cfg)}
    for c in out:
        check_request(cfg=c)
    return sorted(round(c, 6) for c in out)


def parse_denoises(text):
    """The denoise values to fit ("1, 0.5, 0.3"; empty means 1 only)."""
    out = sorted({v for v, _ in _numbers(text, "denoise list", float)} or {1.0}, reverse=True)
    if any(hi is not None for _, hi in _numbers(text, "denoise list", float)):
        raise RequestError("denoise values are fitted one by one: list them (e.g. 1, 0.6, 0.3), not as a range")
    if not all(0.0 < d <= 1.0 for d in out):
        raise RequestError(f"denoise values must be above 0 and at most 1, got {out}")
    return out


AFS_NEEDS_FULL_DENOISE = ("afs (the analytic first step) assumes the run starts from pure noise: leave the denoise "
                          "values below 1 out, or calibrate them in a file without afs")


def check_afs(denoises, afs):
    """RequestError for ``afs`` with a denoise below 1: its first step answers the model's call for pure noise,
    which an img2img start is not (None counts as a full denoise)."""
    if afs and min((1.0 if d is None else float(d)) for d in denoises) < 1:
        raise RequestError(AFS_NEEDS_FULL_DENOISE)


def check_entries(steps, cfgs, denoises, afs=False):
    """The number of calibrations a range request makes, or RequestError: too many for one file, or ``afs`` with
    a denoise below 1 (check_afs)."""
    check_afs(denoises, afs)
    n = len(steps) * len(cfgs) * len(denoises)
    if n > MAX_ENTRIES:
        raise RequestError(f"{len(steps)} step counts x {len(cfgs)} cfg values x {len(denoises)} denoise values make "
                           f"{n} calibrations: at most {MAX_ENTRIES} in one file; narrow the lists")
    return n


def check_filename(filename):
    """The name without ".safetensors", or RequestError: letters, digits, spaces, '.', '-' or '_', no folders."""
    name = str(filename).strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not NAME.fullmatch(name) or ".." in name:
        raise RequestError(f"file name {filename!r} is not usable: use letters, digits, spaces, '.', '-' or '_' "
                           "(no folders, no line breaks or other control characters)")
    if len(name) > MAX_NAME:
        raise RequestError(f"file name is {len(name)} characters long: use at most {MAX_NAME}")
    return name


def output_path(folder, filename, overwrite):
    """Where a calibration is written; refuses unusable names and, unless ``overwrite``, existing files."""
    path = os.path.join(folder, check_filename(filename) + ".safetensors")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: choose another file name, or turn on overwrite")
    return path
