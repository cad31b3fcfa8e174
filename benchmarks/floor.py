"""What the calibration's own stop costs: the exact trajectory stopped at the calibration's learned last positive
sigma and denoised once, against the same 100-step reference and test noises as AFS.md.

A calibrated run at few evaluations ends its schedule above the model's sigma_min (the end-to-end stage learns where)
and its last step only denoises. Even an exact trajectory, denoised once from that stop, makes this much error:
a solver on the same schedule that only tracks the trajectory better removes at most what lies above it. It is not a
bound on every solver: the last step's learned coefficients mix in earlier outputs and can extrapolate past one
denoise, and where a calibration ends below its floor (digits-flow at 6 evaluations) they do. Reads the learned schedules and RMSEs from afs.json; writes
benchmarks/FLOOR.md and floor.json.

    .venv-bench/bin/python benchmarks/floor.py [--settings digits-eps:5 digits-flow:1] [--steps 80]
"""
import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def exact_stop_error(st, stop, steps):
    """Per-noise RMSE of ``steps`` Heun steps (log-uniform in sigma) from the first sigma to ``stop``, then one
    denoise, against the setting's reference."""
    from calibrated_samplers.samplers import SAMPLERS
    top = float(st.bed.sigmas(100)[0])
    grid = [math.exp(math.log(top) + (math.log(stop) - math.log(top)) * j / steps) for j in range(steps + 1)] + [0.0]
    x = st.sample(SAMPLERS["iia_edm"], torch.tensor(grid, dtype=torch.float64), **st.fam)
    return (x.double() - st.reference.double()).flatten(1).pow(2).mean(1).sqrt()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=None, help="model:cfg pairs (default: every setting in afs.json)")
    p.add_argument("--steps", type=int, default=80, help="Heun steps of the exact trajectory down to the stop")
    args = p.parse_args()
    sys.path.insert(0, HERE)
    from run import Setting
    torch.set_grad_enabled(False)
    rows = json.load(open(os.path.join(HERE, "afs.json")))
    wanted = None if args.settings is None else {(m, float(c)) for m, c in (s.split(":") for s in args.settings)}
    out, started = [], time.time()
    for key in dict.fromkeys((r["setting"].rsplit(" cfg ", 1)[0], float(r["setting"].rsplit(" cfg ", 1)[1]))
                             for r in rows):
        if wanted is not None and key not in wanted:
            continue
        st = Setting(key[0], key[1], 200, 256)
        for r in (r for r in rows if r["setting"] == st.name and r["evals"] in (5, 6)):
            for variant in ("default", "afs"):
                stop = r[f"{variant}_sigmas"][-2]
                e = exact_stop_error(st, stop, args.steps)
                cal = r[f"{variant}_rmse"]
                floor = float(e.pow(2).mean().sqrt())
                out.append({"setting": st.name, "evals": r["evals"], "variant": variant, "stop": stop,
                            "floor_rmse": floor, "calibrated_rmse": cal, "target_rmse": 0.5 * r["uncalibrated_rmse"],
                            "above_floor": math.copysign(math.sqrt(abs(cal ** 2 - floor ** 2)), cal - floor)})
                print(f"{st.name} {r['evals']} {variant}: stop {stop:.3f} floor {floor:.4f} calibrated {cal:.4f} "
                      f"target {0.5 * r['uncalibrated_rmse']:.4f}", flush=True)
    minutes = (time.time() - started) / 60
    with open(os.path.join(HERE, "floor.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = ["# The cost of the calibration's own stop", "",
             f"`.venv-bench/bin/python benchmarks/floor.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"({minutes:.1f} min). For each cell of AFS.md at 5 and 6 evaluations: the calibration's learned last "
             f"positive sigma (the stop), the RMSE of the exact trajectory ({args.steps} Heun steps) stopped there and "
             "denoised once (the floor), the calibrated RMSE (AFS.md), the 0.5x target (half the best uncalibrated, "
             "AFS.md) and what lies above the floor, sqrt(calibrated^2 - floor^2) (negative: below it by sqrt(floor^2 - calibrated^2)). Same 200 test noises and "
             "reference as AFS.md.", "",
             "| setting | evaluations | calibration | stop | floor | calibrated | target | above the floor |",
             "|---|---|---|---|---|---|---|---|"]
    for o in out:
        lines.append(f"| {o['setting']} | {o['evals']} | {o['variant']} | {o['stop']:.3f} | {o['floor_rmse']:.4f} | "
                     f"{o['calibrated_rmse']:.4f} | {o['target_rmse']:.4f} | {o['above_floor']:.4f} |")
    lines += ["", "Where the floor is at or above the target, tracking the trajectory better at the same stop is not "
              "enough: the target needs a lower stop (paid for by the earlier steps) or a last step that extrapolates "
              "past one denoise. A calibration below its floor shows that its last step does the latter."]
    with open(os.path.join(HERE, "FLOOR.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
