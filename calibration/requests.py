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
