"""How much the default calibration depends on its batch of noises (a diagnostic for issue 11's end-to-end stage).

digits-eps cfg 1, iia_dpmpp_2m, 5 and 6 evaluations, the default calibration from three batches of 256 noises
(seeds 0, 1, 2; BENCHMARKS.md uses seed 0), endpoint RMSE on BENCHMARKS.md's 200 test noises. For each fit it also
reports what the end-to-end stage's *last* iterate would have given, without the held-out check choosing an
iterate: the check compares mean squared endpoint errors on 64 held-out noises, which are heavy-tailed. Writes
benchmarks/BATCHES.md.

    .venv-bench/bin/python benchmarks/batches.py [--workers 2] [--no-last]   # --no-last: the chosen iterate only
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from jobs import run_jobs

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL, CFG, SAMPLER, EVALS, SEEDS = "digits-eps", 1.0, "iia_dpmpp_2m", (5, 6), (0, 1, 2)


def job(seed, n, last):
    torch.set_num_threads(1)
    import run as bench
    from calibrated_samplers.calibration import calibrate
    from calibrated_samplers.calibration import end_to_end as E
    from calibrated_samplers.calibration.testbed.analytic import rmse
    from calibrated_samplers.samplers import SAMPLERS
    if last:  # the last iterate of the whole budget kept, not the held-out check's choice (diagnostic only)
        E.Learnable.load_state = lambda self, state: None
        optimise = E.Stage.optimise

        def last_iterate(self, *a, **k):
            out = optimise(self, *a, **k)
            out["best_round"] = out["rounds"]
            return out
        E.Stage.optimise = last_iterate
    st = bench.Setting(MODEL, CFG, 200, 256)
    sig = st.bed.sigmas(n)
    t0 = time.perf_counter()
    cal = calibrate(st.bed.model, sig, SAMPLER, st.bed.noise(256, seed, sig), st.conditions, chunk_size=64,
                    sigma_min=st.bed.sigma_min, **st.fam)
    e2e = cal.info["end_to_end"]
    return {"seed": seed, "evals": n, "last": last, "seconds": time.perf_counter() - t0,
            "rmse": rmse(st.sample(SAMPLERS[SAMPLER], sig, calibration=cal, **st.fam), st.reference),
            "best_round": e2e["best_round"], "rounds": e2e["rounds"], "start_held_out": e2e["start_held_out_rmse"],
            "held_out": e2e["held_out_rmse"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-last", action="store_true", help="skip the last-iterate diagnostic (half the time)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        print(json.dumps(job(*json.loads(args.job))))
        return
    started = time.perf_counter()
    specs = [(s, n, last) for s in SEEDS for n in EVALS for last in ((False,) if args.no_last else (False, True))]
    results = []
    for r in run_jobs(__file__, specs, args.workers):
        results.append(r)
        print(r, flush=True)
    lines = [f"# The default calibration across batches of noises ({datetime.date.today().isoformat()})", "",
             f"`.venv-bench/bin/python benchmarks/batches.py` ({(time.perf_counter() - started) / 60:.1f} min, "
             f"2 processes of one thread, {platform.platform()}, torch {torch.__version__}). {MODEL} cfg {CFG:g}, "
             f"{SAMPLER}, default calibration from 256 noises of seed 0, 1 or 2; endpoint RMSE on the 200 test "
             "noises of BENCHMARKS.md. Chosen: the iterate the held-out check keeps (what users get). Last: the "
             "end-to-end stage run for its whole budget, its last iterate kept (diagnostic). Held-out: RMSE on the "
             "fit's 64 held-out noises, at the start of the stage and at the chosen iterate.", "",
             "| evals | seed | chosen | round chosen / rounds | last | held-out start -> chosen |",
             "|---|---|---|---|---|---|"]
    for n in EVALS:
        for s in SEEDS:
            chosen = next(r for r in results if r["seed"] == s and r["evals"] == n and not r["last"])
            last = next((f"{r['rmse']:.4f}" for r in results if r["seed"] == s and r["evals"] == n and r["last"]),
                        "not run")
            lines.append(f"| {n} | {s} | {chosen['rmse']:.4f} | {chosen['best_round']} / {chosen['rounds']} | "
                         f"{last} | {chosen['start_held_out']:.4f} -> {chosen['held_out']:.4f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "BATCHES.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
