"""The PAS-style peer (benchmarks/peers.py) beside the pack's default calibration, on BENCHMARKS.md's cells.

For every setting and evaluation count of benchmarks/run.py: PAS-style corrections for plain Euler (DDIM) and iPNDM
fitted on the same 256 calibration noises (seed 0) and measured on the same 200 test noises against the same
100-step reference; beside them the plain solvers on the same schedule and, from benchmarks/results.json (the last
`bash benchmarks/run.sh`), the pack's calibrated iia_dpmpp_2m and the best of the other peers. Writes
benchmarks/PAS.md.

    .venv-bench/bin/python benchmarks/pas.py [--workers 2]
"""
import datetime
import json
import os
import platform
import sys
import time

import torch

from jobs import job_command_line, run_jobs

HERE = os.path.dirname(os.path.abspath(__file__))
BASES = ("euler", "ipndm")


def job(model_name, cfg, n):
    torch.set_num_threads(1)
    import run as bench
    from calibrated_samplers.calibration.testbed.analytic import rmse
    from peers import pas_calibration, pas_sample
    st = bench.Setting(model_name, cfg, 200, 256)
    sig = next(iter(bench.schedules(st.bed).values()))(n, True)  # n steps into 0: n evaluations for both bases
    x = st.unit if st.bed.family == "flow" else st.unit * float(sig[0])
    out = {"setting": st.name, "evals": n}
    for base in BASES:
        t0 = time.perf_counter()
        coords, cost = pas_calibration(st.bed.model, sig, st.cal_noise(sig), st.conditions, sigma_min=st.bed.sigma_min,
                                       base=base, **st.fam)
        seconds = time.perf_counter() - t0
        for label, c in ((f"{base} (PAS-style)", coords), (base, [None] * n)):
            y = torch.cat([pas_sample(st.bed.model, x[j * st.per:(j + 1) * st.per], sig, c, cond, base)
                           for j, cond in enumerate(st.conditions)])
            out[label] = rmse(y, st.reference)
        out[f"{base} corrected steps"] = sum(c is not None for c in coords)
        out[f"{base} seconds"], out[f"{base} evaluations"] = seconds, cost
    return out


def main():
    args = job_command_line(job)
    import run as bench
    started = time.perf_counter()
    specs = [(m, c, n) for (m, c), evals in bench.EVALS.items() for n in evals]
    results = list(run_jobs(__file__, specs, args.workers))
    with open(os.path.join(HERE, "results.json")) as f:
        bench_results = json.load(f)
    lines = [f"# The PAS-style peer ({datetime.date.today().isoformat()})", "",
             f"`.venv-bench/bin/python benchmarks/pas.py` ({(time.perf_counter() - started) / 60:.1f} min, "
             f"{args.workers} process(es) of one thread, {platform.platform()}, torch {torch.__version__}). Endpoint "
             "RMSE on BENCHMARKS.md's 200 test noises against its 100-step reference. PAS-style: each step's direction "
             "replaced by about four coordinates in a per-sample PCA basis of the trajectory, fitted step by step on "
             "the same 256 calibration noises against the same teacher, kept only where a step's error falls "
             "(benchmarks/peers.py says how it differs from the paper). Plain: the same solver uncorrected, on the "
             "same schedule (Karras, or t uniform for the flow model). Best calibrated (any of the pack's calibrated samplers) and best other peer: "
             "benchmarks/results.json, the last `bash benchmarks/run.sh`.", "",
             "| setting | evals | euler | euler (PAS-style) | ipndm | ipndm (PAS-style) | best other peer | "
             "best calibrated | best calibrated / best PAS-style |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (specs.index(next(s for s in specs if f"{s[0]} cfg {s[1]:g}" == r["setting"]
                                                              and s[2] == r["evals"])))):
        rows = bench_results["results"].get(r["setting"], {})
        kinds = bench_results["kinds"].get(r["setting"], {})
        n = str(r["evals"])
        cal = min((v[n]["rmse"] for k, v in rows.items() if kinds[k] == "calibrated" and n in v), default=float("nan"))
        peer = min(((v[n]["rmse"], k) for k, v in rows.items() if kinds[k] == "peer" and n in v),
                   default=(float("nan"), ""))
        pas = min(r["euler (PAS-style)"], r["ipndm (PAS-style)"])
        lines.append(f"| {r['setting']} | {n} | {r['euler']:.4f} | {r['euler (PAS-style)']:.4f} "
                     f"({r['euler corrected steps']} steps corrected) | {r['ipndm']:.4f} | "
                     f"{r['ipndm (PAS-style)']:.4f} ({r['ipndm corrected steps']} steps corrected) | {peer[0]:.4f} "
                     f"({peer[1]}) | {cal:.4f} | {cal / pas:.2f}x |")
    fit = [r[f"{b} seconds"] for r in results for b in BASES]
    lines += ["", f"A PAS-style fit took {min(fit):.0f}-{max(fit):.0f} s on one CPU thread (teacher included)."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "PAS.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
