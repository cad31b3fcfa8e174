"""Command line: calibrate a bundled model, inspect a calibration file, plot one.

    python -m calibrated_samplers.calibration calibrate --model digits-eps --sampler iia_dpmpp_2m --evaluations 5 --out cal.safetensors
    python -m calibrated_samplers.calibration inspect cal.safetensors
    python -m calibrated_samplers.calibration plot cal.safetensors cal.png

Bundled models: ``digits-eps`` and ``digits-flow`` (the tiny learned UNets in tests/tiny) and ``analytic-edm``,
``analytic-eps``, ``analytic-flow`` (the exact Gaussian-mixture denoiser in its family's coordinates).
Calibrating your own checkpoint is done from ComfyUI or the web UI, or from Python with ``calibrate()``.
"""
import argparse
import json
import math
import sys

import torch


class Testbed:
    """A bundled model with the facts a calibration needs: family, schedule range, sample shape, conditions."""

    def __init__(self, name, model, family, shift, sigma_min, sigma_max, shape, classes, fingerprint):
        self.name, self.model, self.family, self.shift = name, model, family, shift
        self.sigma_min, self.sigma_max, self.shape, self.classes = sigma_min, sigma_max, shape, classes
        self.fingerprint = fingerprint

    def sigmas(self, steps, zero=True):
        """Karras sigmas (rho 7) for VE-type families; for flow, t uniform in (0, 1] with the model's shift."""
        from ..tests.analytic import flow_sigmas, karras
        if self.family == "flow":
            sig = flow_sigmas(steps, shift=self.shift)
            return sig if zero else torch.cat([sig[:-1], sig.new_tensor([self.sigma_min])])
        return karras(steps if zero else steps + 1, self.sigma_min, self.sigma_max, zero=zero)

    def noise(self, n, seed, sigmas):
        """Initial states for ``n`` seeds: sigma_max * N(0, I), or pure noise for flow (sigma_0 = 1)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *self.shape, generator=g)
        return x if self.family == "flow" else x * float(sigmas[0])

    def conditions(self, cfg):
        """One extra_args per class (classifier-free guidance at ``cfg``), or a single unconditional one."""
        if not self.classes:
            return [{}]
        return [{"cond": c, "cfg": float(cfg)} for c in range(self.classes)]


def testbed(name):
    if name in ("digits-eps", "digits-flow"):
        from ..tests import tiny
        model = tiny.load(name)
        fingerprint = f"sha256:{tiny.file_sha256(tiny.weight_path(name))}"
        if name == "digits-eps":
            return Testbed(name, model, "eps", 1.0, model.sigma_min, model.sigma_max, tiny.IMAGE_SHAPE, 10,
                           fingerprint)
        return Testbed(name, model, "flow", 1.0, 1e-3, 1.0, tiny.IMAGE_SHAPE, 10, fingerprint)
    if name in ("analytic-edm", "analytic-eps", "analytic-flow"):
        from ..tests.analytic import DiscreteSchedule, GaussianMixture
        mix = GaussianMixture()
        fp = "analytic:GaussianMixture(seed=0)"
        if name == "analytic-edm":
            return Testbed(name, mix.edm(), "edm", 1.0, 0.002, 80.0, mix.shape, mix.n_classes, fp)
        if name == "analytic-eps":
            sched = DiscreteSchedule()
            return Testbed(name, mix.discrete_eps(sched), "eps", 1.0, sched.sigma_min, sched.sigma_max, mix.shape,
                           mix.n_classes, fp)
        return Testbed(name, mix.flow(), "flow", 3.0, 1e-3, 1.0, mix.shape, mix.n_classes, fp)
    raise SystemExit(f"unknown model {name!r}: choose digits-eps, digits-flow, analytic-edm, analytic-eps or "
                     "analytic-flow")


def _schedule(bed, sampler, steps, evaluations):
    from ..samplers import steps_for_evaluations
    if evaluations is not None:
        found = steps_for_evaluations(sampler, evaluations)
        if found is None:
            raise SystemExit(f"{sampler} cannot take exactly {evaluations} model evaluations; try one more or less")
        return bed.sigmas(*found)
    return bed.sigmas(steps)


def cmd_calibrate(args):
    from .engine import calibrate
    bed = testbed(args.model)
    sig = _schedule(bed, args.sampler, args.steps, args.evaluations)
    noise = bed.noise(args.batch, args.seed, sig)
    conditions = bed.conditions(args.cfg) if args.cfg is not None else [{}]
    width = 40

    def progress(done, total):
        filled = int(width * done / max(total, 1))
        print(f"\rcalibrating [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr,
              flush=True)

    cal = calibrate(bed.model, sig, args.sampler, noise, conditions, family=bed.family, shift=bed.shift,
                    fine_steps=args.fine_steps, target=args.target, chunk_size=args.chunk_size,
                    holdout=args.holdout, progress=None if args.quiet else progress,
                    info={"model": bed.name, "fingerprint": bed.fingerprint, "seed": args.seed, "cfg": args.cfg,
                          "made_by": "python -m calibrated_samplers.calibration calibrate"})
    if not args.quiet:
        print(file=sys.stderr)
    cal.save(args.out)
    print(f"wrote {args.out}: {cal.method}, {cal.steps} steps, {cal.info['model_evaluations_per_sample']:.0f} "
          f"model evaluations per noise, {cal.info['seconds']:.1f} s, strength {cal.info['strength']}, "
          f"{int(cal.fallback.sum())} of {cal.steps} steps fell back")


def describe(cal):
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
    header = ["step", "sigma", "sigma_next"] + names + ["resid_before", "resid_after", "fallback"]
    lines.append("")
    lines.append("  ".join(f"{h:>12s}" for h in header))
    for i in range(cal.steps):
        vals = [f"{i:>12d}", f"{float(cal.sigmas[i]):>12.5g}", f"{float(cal.sigmas[i + 1]):>12.5g}"]
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
    plot(load(args.file), args.out)
    print(f"wrote {args.out}")


def main(argv=None):
    from ..samplers import SAMPLERS
    calibrated = sorted(n for n, f in SAMPLERS.items() if f.kind != "plain")
    p = argparse.ArgumentParser(prog="python -m calibrated_samplers.calibration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="fit a calibration for a bundled model and save it")
    c.add_argument("--model", default="digits-eps")
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
