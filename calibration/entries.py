"""Which entry of a calibration file serves a run: the run's schedule (its sigmas: step count and denoise are in
them, so a schedule the set was not fitted for is never served by a near one) picks the entries fitted for it, and
the run's cfg picks one fitted at that cfg, or the two fitted around it, interpolated linearly in cfg; outside the
fitted cfg range nothing is served and the reason says which range was fitted. Also the schedules the UIs make for
a step count and denoise, which a range calibration is fitted for."""
import torch

from ..samplers import CalibrationMismatch, Family
from ..samplers.core import check_calibration, sigma_list

CFG_TOLERANCE = 1e-3  # a fitted cfg this close to the run's serves it as is


def denoise_schedule(schedule, steps, denoise=1.0):
    """The sigmas of ``steps`` steps at ``denoise``, as ComfyUI's KSampler and BasicScheduler (and the web UIs' hires
    fix) make them: the last ``steps + 1`` sigmas of the schedule for int(steps / denoise) steps. ``schedule(n)``
    gives n-step sigmas."""
    if denoise is None or denoise >= 1.0:
        return torch.as_tensor(schedule(steps), dtype=torch.float64)
    if not 0.0 < denoise:
        raise ValueError(f"denoise must be above 0, got {denoise}")
    full = torch.as_tensor(schedule(int(steps / min(denoise, 0.999))), dtype=torch.float64)
    return full[-(steps + 1):]


def img2img_schedule(schedule, steps, denoise=1.0):
    """The sigmas of A1111/Forge img2img at ``steps`` and ``denoise`` (without "fixed steps"): the last
    int(denoise * steps) + 1 steps of the ``steps``-step schedule. (Their hires fix cuts as ComfyUI does.)"""
    full = torch.as_tensor(schedule(steps), dtype=torch.float64)
    if denoise is None or denoise >= 1.0:
        return full
    kept = int(min(denoise, 0.999) * steps)
    return full[steps - kept - 1:]


def _span(values, fmt="{:g}"):
    values = sorted(set(values))
    if len(values) > 2 and all(b - a == 1 for a, b in zip(values, values[1:])):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(fmt.format(v) for v in values)


def describe_entries(entries):
    """"steps 4-12 at denoise 1, cfg 3-8 (3 fitted values)" for a list of Calibrations."""
    steps = [c.steps for c in entries]
    denoise = [float(c.info.get("denoise", 1.0)) for c in entries]
    cfgs = sorted({float(c.info["cfg"]) for c in entries if c.info.get("cfg") is not None})
    cfg_text = "any cfg" if not cfgs else (f"cfg {cfgs[0]:g}" if len(cfgs) == 1 else
                                           f"cfg {cfgs[0]:g}-{cfgs[-1]:g} ({len(cfgs)} fitted values)")
    return f"steps {_span(steps)} at denoise {_span(denoise)}, {cfg_text}"


def interpolate(low, high, cfg):
    """The calibration for ``cfg`` between two entries fitted at cfgs around it (same schedule): every parameter
    and learned time step linear in cfg."""
    c0, c1 = float(low.info["cfg"]), float(high.info["cfg"])
    w = (float(cfg) - c0) / (c1 - c0)
    params = {}
    for k in set(low.params) | set(high.params):
        a, b = low.params.get(k), high.params.get(k)
        if a is None or b is None:  # an IIA time scale one side did not learn: the other side's default is 1
            a = torch.ones_like(b) if a is None else a
            b = torch.ones_like(a) if b is None else b
        params[k] = (1 - w) * a + w * b
    learned = None
    if low.sample_sigmas is not None or high.sample_sigmas is not None:
        # a convex mix of two decreasing schedules with the same ends is decreasing with the same ends
        learned = (1 - w) * low.sampling_sigmas + w * high.sampling_sigmas
    info = dict(low.info, cfg=float(cfg), interpolated={"cfg": [c0, c1], "weight": round(w, 6)})
    return type(low)(low.method, low.sigmas, params, low.family, low.shift, low.options, info, sample_sigmas=learned)


def select(cset, sigmas, family=None, cfg=None):
    """(Calibration, None) for the run, or (None, why). ``cfg`` None accepts any fitted cfg (the middle one)."""
    sig = sigma_list(sigmas) if torch.is_tensor(sigmas) else [float(s) for s in sigmas]
    fam = Family.of(cset.family if family is None else family)
    fitting = []
    for cal in cset.entries:
        try:
            check_calibration(cal, cset.method, sig, fam)
            fitting.append(cal)
        except CalibrationMismatch as e:
            if str(e).startswith("calibration is for a"):  # the family: the same for every entry
                return None, str(e)
    if not fitting:
        return None, (f"holds {describe_entries(cset.entries)}; none was fitted for this run's schedule "
                      f"({len(sig) - 1} steps, sigmas {sig[0]:.4g} ... {sig[-1]:.4g}): use one of those step "
                      "counts and denoise values with the scheduler it was made with, or calibrate for this one")
    fitted = sorted(((float(c.info["cfg"]), c) for c in fitting if c.info.get("cfg") is not None),
                    key=lambda p: p[0])
    if cfg is None:
        return (fitted[len(fitted) // 2][1] if fitted else fitting[-1]), None
    if not fitted:
        return None, "records no cfg"
    cfg = float(cfg)
    for made, cal in fitted:
        if abs(made - cfg) <= CFG_TOLERANCE:
            return cal, None
    below = [p for p in fitted if p[0] < cfg]
    above = [p for p in fitted if p[0] > cfg]
    if not below or not above:
        span = f"cfg {fitted[0][0]:g}" if len(fitted) == 1 else f"cfg {fitted[0][0]:g}-{fitted[-1][0]:g}"
        return None, (f"was fitted for {span} at this schedule, this run uses cfg {cfg:g}: use a cfg in that "
                      "range, or calibrate a range that includes it")
    low, high = below[-1][1], above[0][1]
    if low.options != high.options:  # fitted with different solver options: no mix of the two is either
        return (low if cfg - below[-1][0] <= above[0][0] - cfg else high), None
    return interpolate(low, high, cfg), None
