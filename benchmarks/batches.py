"""How much the default calibration depends on its batch of noises (a diagnostic for issue 11's end-to-end stage).

digits-eps cfg 1, iia_dpmpp_2m, 5 and 6 evaluations, the default calibration from three batches of 256 noises
(seeds 0, 1, 2; BENCHMARKS.md uses seed 0), endpoint RMSE on BENCHMARKS.md's 200 test noises, with the round the
end-to-end stage kept (its last unless the held-out share vetoed it). Writes benchmarks/BATCHES.md.

    .venv-bench/bin/python benchmarks/batches.py [--workers 2]
"""
import datetime
import os
import platform
import sys
import time

import torch

from jobs import job_command_line, run_jobs

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL, CFG, SAMPLER, EVALS, SEEDS = "digits-eps", 1.0, "iia_dpmpp_2m", (5, 6), (0, 1, 2)


def job(seed, n):
    torch.set_num_threads(1)
    import run as bench
    from calibrated_samplers.calibration import calibrate
    from calibrated_samplers.calibration.testbed.analytic import rmse
    from calibrated_samplers.samplers import SAMPLERS
    st = bench.Setting(MODEL, CFG, 200, 256)
    sig = st.bed.sigmas(n)
    t0 = time.perf_counter()
    cal = calibrate(st.bed.model, sig, SAMPLER, st.bed.noise(256, seed, sig), st.conditions, chunk_size=64,
                    sigma_min=st.bed.sigma_min, **st.fam)
    e2e = cal.info["end_to_end"]
    return {"seed": seed, "evals": n, "seconds": time.perf_counter() - t0,
            "rmse": rmse(st.sample(SAMPLERS[SAMPLER], sig, calibration=cal, **st.fam), st.reference),
            "best_round": e2e["best_round"], "rounds": e2e["rounds"], "start_held_out": e2e["start_held_out_rmse"],
            "held_out": e2e["held_out_rmse"]}


def main():
    args = job_command_line(job)
    started = time.perf_counter()
    specs = [(s, n) for s in SEEDS for n in EVALS]
    results = []
    for r in run_jobs(__file__, specs, args.workers):
        results.append(r)
        print(r, flush=True)
    lines = [f"# The default calibration across batches of noises ({datetime.date.today().isoformat()})", "",
             f"`.venv-bench/bin/python benchmarks/batches.py` ({(time.perf_counter() - started) / 60:.1f} min, "
             f"{args.workers} process(es) of one thread, {platform.platform()}, torch {torch.__version__}). {MODEL} cfg {CFG:g}, "
             f"{SAMPLER}, default calibration from 256 noises of seed 0, 1 or 2; endpoint RMSE on the 200 test "
             "noises of BENCHMARKS.md; the round the end-to-end stage kept (its last unless the held-out share "
             "vetoed it, 0 = its start); held-out: RMSE on the fit's 64 held-out noises against the teacher, at the "
             "start of the stage and at the kept round.", "",
             "| evals | seed | test RMSE | round kept / rounds | held-out start -> kept |", "|---|---|---|---|---|"]
    for n in EVALS:
        for s in SEEDS:
            r = next(r for r in results if r["seed"] == s and r["evals"] == n)
            lines.append(f"| {n} | {s} | {r['rmse']:.4f} | {r['best_round']} / {r['rounds']} | "
                         f"{r['start_held_out']:.4f} -> {r['held_out']:.4f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "BATCHES.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
