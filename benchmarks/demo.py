"""The main job on the bundled digits-eps model: calibrate, then sample base vs calibrated at 5 evaluations.

    bash benchmarks/run.sh demo        # from a fresh clone: sets up .venv-bench, then runs this

Calibrates DPM-Solver++(2M)-based IIA and AMED-Plugin samplers at cfg 5 over all ten classes (seed 0), saves
the calibration files, samples 60 other noises (seeds from 1000) with and without them, prints the endpoint
RMSE against a 100-step Heun reference from the same noises, and writes an image grid.
"""
import argparse
import os
import time

import torch

from calibrated_samplers.calibration import calibrate
from calibrated_samplers.calibration.testbed import testbed
from calibrated_samplers.samplers import SAMPLERS, steps_for_evaluations
from calibrated_samplers.calibration.testbed.tiny import save_grid


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evaluations", type=int, default=5)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--samplers", nargs="+", default=["iia_dpmpp_2m", "amed_dpmpp_2m", "iia_ipndm"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo"))
    args = p.parse_args()
    torch.set_grad_enabled(False)
    os.makedirs(args.out, exist_ok=True)
    bed = testbed("digits-eps")
    fam = dict(family=bed.family, shift=bed.shift)
    conditions = bed.conditions(args.cfg)
    labels = torch.arange(10).repeat_interleave(6)

    def sample(fn, sig, **kw):
        x = bed.noise(60, 1000, sig)
        return torch.cat([fn(bed.model, x[c * 6:(c + 1) * 6], sig, extra_args=conditions[c], disable=True, **kw)
                          for c in range(10)])

    ref = sample(SAMPLERS["iia_edm"], bed.sigmas(100), **fam)
    rows = []
    print(f"digits-eps, cfg {args.cfg:g}, {args.evaluations} model evaluations, 60 held-out noises")
    for name in args.samplers:
        sig = bed.sigmas(*steps_for_evaluations(name, args.evaluations))
        t0 = time.perf_counter()
        cal = calibrate(bed.model, sig, name, bed.noise(128, 0, sig), conditions, **fam,
                        info={"model": "digits-eps", "fingerprint": bed.fingerprint, "cfg": args.cfg, "seed": 0})
        seconds = time.perf_counter() - t0
        path = os.path.join(args.out, f"digits-eps_{name}_{args.evaluations}.safetensors")
        cal.save(path)
        plain, tuned = sample(SAMPLERS[name], sig, **fam), sample(SAMPLERS[name], sig, calibration=cal, **fam)
        e0 = (plain - ref).pow(2).mean().sqrt().item()
        e1 = (tuned - ref).pow(2).mean().sqrt().item()
        print(f"  {name:14s} RMSE {e0:.4f} -> {e1:.4f} ({e1 / e0:.2f}x), calibrated in {seconds:.0f} s -> {path}")
        rows += [plain, tuned]
    rows.append(ref)
    pick = torch.arange(10) * 6
    grid = os.path.join(args.out, "grid.png")
    save_grid([r[pick] for r in rows], grid, scale=4)
    print(f"wrote {grid}: rows = " + ", ".join(f"{n} plain, {n} calibrated" for n in args.samplers) + ", reference")


if __name__ == "__main__":
    main()
