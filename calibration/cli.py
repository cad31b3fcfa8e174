"""Command line: calibrate a bundled model, inspect a calibration file, plot one.

    python -m calibrated_samplers.calibration calibrate --model digits-eps --sampler iia_dpmpp_2m --evaluations 5 --out cal.safetensors
    python -m calibrated_samplers.calibration calibrate --model digits-eps --steps 4 --more-steps 4-12 --cfg-list 3-8 --out range.safetensors
    python -m calibrated_samplers.calibration inspect cal.safetensors
    python -m calibrated_samplers.calibration plot cal.safetensors cal.png

Bundled models (``calibration.testbed``): ``digits-eps``, ``digits-flow`` and ``digits-eps-narrow`` (the tiny learned
UNets) and ``analytic-edm``, ``analytic-eps``, ``analytic-flow`` (the exact Gaussian-mixture denoiser in its
family's coordinates).
Calibrating your own checkpoint is done from ComfyUI or the web UI, or from Python with ``calibrate()``.
"""
import argparse
import json
import sys

import torch

from .progress import TimeLeft, planned_text


def _schedule(bed, sampler, steps, evaluations, options=None):
    from ..samplers import steps_for_evaluations
    if evaluations is not None:
        found = steps_for_evaluations(sampler, evaluations, **(options or {}))
        if found is None:
            raise SystemExit(f"{sampler} cannot take exactly {evaluations} model evaluations; try one more or less")
        return bed.sigmas(*found)
    return bed.sigmas(steps)


def cmd_calibrate(args):
    from .engine import calibrate, plan
    from .requests import RequestError, check_entries, check_request, parse_cfgs, parse_denoises, parse_steps
    from .testbed import testbed
    try:
        bed = testbed(args.model)
    except ValueError as e:
        raise SystemExit(str(e))
    conditions = bed.conditions(args.cfg) if args.cfg is not None else [{}]
    try:
        check_request(steps=args.steps if args.evaluations is None else None, cfg=args.cfg, batch_size=args.batch,
                      prompts=len(conditions), holdout=args.holdout)
        spread = None
        if args.more_steps or args.cfg_list or args.denoise_list:
            if args.evaluations is not None:
                raise RequestError("--evaluations names one schedule: give --steps with --more-steps instead")
            spread = {"steps": parse_steps(args.more_steps, args.steps),
                      "cfgs": parse_cfgs(args.cfg_list, args.cfg) if (args.cfg_list or args.cfg is not None) else [None],
                      "denoises": parse_denoises(args.denoise_list)}
            check_entries(**spread, afs=args.afs)
    except RequestError as e:
        raise SystemExit(str(e))
    if spread is not None:
        return calibrate_spread(args, bed, spread)
    options = {"afs": True} if args.afs else {}
    sig = _schedule(bed, args.sampler, args.steps, args.evaluations, options)
    noise = bed.noise(args.batch, args.seed, sig)
    settings = _fit_settings(args, bed)
    progress = None if args.quiet else _bar(planned_text(plan(sig, args.sampler, args.batch, conditions, **settings)))
    cal = calibrate(bed.model, sig, args.sampler, noise, conditions, progress=progress, **settings,
                    info={"model": bed.name, "fingerprint": bed.fingerprint, "seed": args.seed, "cfg": args.cfg,
                          "made_by": "python -m calibrated_samplers.calibration calibrate"})
    if not args.quiet:
        print(file=sys.stderr)
    cal.save(args.out)
    e2e = cal.info.get("end_to_end")
    stage = "" if not e2e else (
        f"; end to end: held-out RMSE {e2e['start_held_out_rmse']:.4g} -> {e2e['held_out_rmse']:.4g} for "
        f"{e2e['evaluations_per_sample']:.0f} more evaluation equivalents per noise"
        + (", time steps learned" if cal.sample_sigmas is not None else ""))
    fell_back = "" if cal.fallback is None else f", {int(cal.fallback.sum())} of {cal.steps} steps at the base update"
    print(f"wrote {args.out}: {cal.method}, {cal.steps} steps, {cal.info['model_evaluations_per_sample']:.0f} "
          f"model evaluations per noise, {cal.info['seconds']:.1f} s{fell_back}{stage}")


def _fit_settings(args, bed):
    """calibrate()'s keywords from the command line, for one file or each entry of a range file."""
    return dict(family=bed.family, shift=bed.shift, fine_steps=args.fine_steps, target=args.target,
                chunk_size=args.chunk_size, holdout=args.holdout, sigma_min=bed.sigma_min, end_to_end=args.end_to_end,
                learn_sigmas=args.learn_sigmas, budget=args.budget, **({"afs": True} if args.afs else {}))


def _bar(planned, width=40):
    """A progress(done, total) drawing a bar with the time left on stderr, after saying ``planned`` there."""
    print(f"calibration: {planned}", file=sys.stderr)
    left = TimeLeft()

    def progress(done, total):
        filled = int(width * done / max(total, 1))
        print(f"\rcalibrating [{'#' * filled}{'.' * (width - filled)}] {done}/{total}, {left.text(done, total)}   ",
              end="", file=sys.stderr, flush=True)
    return progress


def calibrate_spread(args, bed, spread):
    """One file for several step counts, cfgs and denoise values (calibration.ranges)."""
    from .file import CalibrationSet
    from .ranges import calibrate_range, plan_range
    noise = torch.randn(args.batch, *bed.shape, generator=torch.Generator().manual_seed(args.seed))
    settings = dict(_fit_settings(args, bed), **spread)
    first_cfg = spread["cfgs"][0]
    planned = plan_range(bed.sigmas, args.sampler, args.batch, [{}] if first_cfg is None else bed.conditions(first_cfg),
                         **settings)
    result = calibrate_range(
        bed.model, bed.sigmas, args.sampler, noise, [{}], with_cfg=lambda c: (bed.model, bed.conditions(c)),
        progress=None if args.quiet else _bar(planned_text(planned)), **settings,
        info={"model": bed.name, "fingerprint": bed.fingerprint, "seed": args.seed,
              "primary": {"steps": args.steps, "cfg": args.cfg},
              "made_by": "python -m calibrated_samplers.calibration calibrate"})
    if not args.quiet:
        print(file=sys.stderr)
    result.save(args.out)
    if isinstance(result, CalibrationSet):
        print(f"wrote {args.out}: {result.method}, {len(result)} calibrations ({result.summary()}), "
              f"{result.info['model_evaluations_per_sample']:.0f} model evaluations per noise "
              f"({result.info['teacher_evaluations_saved_per_sample']:.0f} saved by shared teachers), "
              f"{result.info['seconds']:.1f} s")
    else:
        print(f"wrote {args.out}: {result.method}, {result.steps} steps")


def describe(cal):
    """The metadata and per-step table of a calibration (every entry of a range file), as text."""
    if hasattr(cal, "entries"):
        parts = [f"range file: {cal.method}, {len(cal)} calibrations, {cal.summary()}"]
        for k, entry in enumerate(cal.entries):
            parts += ["", f"--- entry {k}: {entry.steps} steps, denoise {entry.info.get('denoise', 1.0):g}, "
                          f"cfg {entry.info.get('cfg')}", describe(entry)]
        return "\n".join(parts)
    """The metadata and per-step table of a calibration, as text."""
    lines = [f"method      {cal.method} (base {cal.metadata()['base']})",
             f"family      {cal.family} (shift {cal.shift:g})",
             f"steps       {cal.steps}",
             f"options     {json.dumps(cal.options, sort_keys=True)}"]
    for k in sorted(cal.info):
        v = cal.info[k]
        if isinstance(v, float):
            v = f"{v:.6g}"
        elif not isinstance(v, str):
            v = json.dumps(v)
        lines.append(f"{k:<11s} {v}")
    names = []
    for k, v in cal.params.items():
        names += [k] if v.ndim == 1 else [f"{k}[{j}]" for j in range(v.shape[1])]
    learned = cal.sample_sigmas
    header = ["step", "sigma", "sigma_next"] + (["learned", "learned_next"] if learned is not None else []) + names + [
        "resid_before", "resid_after", "fallback"]
    lines.append("")
    if learned is not None:
        lines.append("time steps learned: the file is matched by 'sigma' and samples at 'learned'")
    lines.append("  ".join(f"{h:>12s}" for h in header))
    for i in range(cal.steps):
        vals = [f"{i:>12d}", f"{float(cal.sigmas[i]):>12.5g}", f"{float(cal.sigmas[i + 1]):>12.5g}"]
        if learned is not None:
            vals += [f"{float(learned[i]):>12.5g}", f"{float(learned[i + 1]):>12.5g}"]
        for v in cal.params.values():
            row = v[i].reshape(-1).tolist()
            vals += [f"{x:>12.5g}" for x in row]
        for t in (cal.residual_before, cal.residual_after, cal.fallback):
            vals.append(f"{float(t[i]):>12.5g}" if t is not None else f"{'-':>12s}")
        lines.append("  ".join(vals))
    return "\n".join(lines)


def cmd_inspect(args):
    from .file import load
    print(describe(load(args.file)))


def plot(cal, out):
    """Per-step parameters and held-out residuals before/after (like the IIA paper's residual figure)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot needs matplotlib, which the pack does not install: pip install matplotlib")
    steps = list(range(cal.steps))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, v in cal.params.items():
        cols = v.reshape(cal.steps, -1)
        for j in range(cols.shape[1]):
            label = k if cols.shape[1] == 1 else f"{k}[{j}]"
            ax1.plot(steps, cols[:, j].tolist(), marker="o", label=label)
    ax1.set_xlabel("step")
    ax1.set_title(f"{cal.method}: fitted parameters")
    ax1.legend(fontsize=8)
    if cal.residual_before is not None:
        ax2.plot(steps, cal.residual_before.tolist(), marker="o", label="base step")
        ax2.plot(steps, cal.residual_after.tolist(), marker="o", label="calibrated step")
        if cal.fallback is not None:
            fb = [i for i in steps if cal.fallback[i] > 0]
            ax2.plot(fb, [float(cal.residual_after[i]) for i in fb], "kx", label="fell back")
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_title("held-out residual vs teacher (RMS)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def cmd_plot(args):
    from .file import load
    cal = load(args.file)
    plot(cal.primary() if hasattr(cal, "entries") else cal, args.out)
    print(f"wrote {args.out}")


def main(argv=None):
    from ..samplers import calibrated as calibrated_samplers
    from .testbed import NAMES
    calibrated = sorted(calibrated_samplers())
    p = argparse.ArgumentParser(prog="python -m calibrated_samplers.calibration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="fit a calibration for a bundled model and save it")
    c.add_argument("--model", default="digits-eps", help="a bundled model: " + ", ".join(NAMES))
    c.add_argument("--sampler", default="iia_dpmpp_2m", choices=calibrated)
    g = c.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=5)
    g.add_argument("--evaluations", type=int, help="pick the step count that costs exactly this many model calls")
    c.add_argument("--cfg", type=float, default=None, help="calibrate over every class at this guidance scale "
                   "(default: unconditional)")
    c.add_argument("--batch", type=int, default=256, help="noises (split over the classes)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--fine-steps", type=int, default=10)
    c.add_argument("--target", default="trajectory", choices=["trajectory", "local"])
    c.add_argument("--holdout", type=float, default=0.25)
    c.add_argument("--chunk-size", type=int, default=64)
    c.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                   help="only the per-step fit (faster, usually less accurate)")
    c.add_argument("--no-learn-sigmas", dest="learn_sigmas", action="store_false",
                   help="keep the requested time steps in the end-to-end stage")
    c.add_argument("--budget", type=float, default=None, help="model-evaluation equivalents per noise for the "
                   "end-to-end stage (default: a multiple of the per-step fit's)")
    c.add_argument("--afs", action="store_true", help="analytic first step: the first step calls no model (one "
                   "evaluation fewer at the same steps; with --evaluations, one step more)")
    c.add_argument("--more-steps", default="", help="more step counts in the same file, e.g. 4-12 or 6,10")
    c.add_argument("--cfg-list", default="", help="cfg values to fit, e.g. 3,5.5,8 or 3-8 (three values); lookups "
                   "in between interpolate")
    c.add_argument("--denoise-list", default="", help="denoise values to fit, e.g. 1,0.6,0.3 (img2img from the "
                   "model's own samples)")
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--out", required=True)
    c.set_defaults(run=cmd_calibrate)
    i = sub.add_parser("inspect", help="print a calibration file's metadata and per-step table")
    i.add_argument("file")
    i.set_defaults(run=cmd_inspect)
    q = sub.add_parser("plot", help="plot a calibration's parameters and residuals per step (needs matplotlib)")
    q.add_argument("file")
    q.add_argument("out")
    q.set_defaults(run=cmd_plot)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    args.run(args)


if __name__ == "__main__":
    main()
