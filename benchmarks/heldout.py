"""The default calibration on the held-out testbed beside digits, at the batch sizes users calibrate with, and where
its gain comes from (issue 29). Writes benchmarks/HELDOUT.md and heldout.json.

For each setting, evaluation count and calibration batch (32 noises, the Calibrate node's default; 64; 256; run in
the order given), one default calibration of iia_dpmpp_2m traced by benchmarks/stage.py: the best uncalibrated
sampler of run.py's sweep (every solver on every schedule, raised ends included) chosen on the 200 test noises, then
that pair measured on 600 fresh noises (the ratio reported), and the error at each stage of the calibration on the
test noises: the plain solver on the requested schedule, on the raised start the probe chose, after the per-step fit,
after the end-to-end stage. The held-out models (PROTOCOL.md) are measured with the defaults only.

    .venv-bench/bin/python benchmarks/heldout.py [--settings shapes-eps:1 ...] [--evals 5 6] [--noises 32 256]
"""
import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from heldout_report import row, write_tables  # noqa: E402  (benchmarks/heldout_report.py)

SETTINGS = ["shapes-eps:1", "shapes-eps:5", "textures-flow:1", "digits-eps:1", "digits-eps:5", "digits-flow:1"]


def spec_of(result):
    """The --settings spelling ("model:cfg") of a result's setting ("model cfg cfg")."""
    return result["setting"].replace(" cfg ", ":")


SWEEP_CACHE = os.path.join(HERE, "sweep-cache.json")  # the best uncalibrated sampler per cell (stage.trace)


def job(setting, evals, noises):
    import torch
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    import stage
    model, cfg = setting.split(":")
    return stage.trace(model, float(cfg), evals, noises, sweep_cache=SWEEP_CACHE)


def store():
    """Each finished job's result, kept under the fingerprint of the code it measured (``--resume`` reuses them)."""
    from jobs import Results, code_fingerprint
    code = code_fingerprint(os.path.dirname(HERE), ("samplers", "calibration", "benchmarks/stage.py",
                                                    "benchmarks/run.py", "benchmarks/heldout.py"))
    return Results(os.path.join(HERE, "partial", "heldout-" + code))


def main():
    from jobs import run_jobs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=SETTINGS)
    p.add_argument("--evals", type=int, nargs="+", default=[5, 6])
    p.add_argument("--noises", type=int, nargs="+", default=[32, 64, 256])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=HERE)
    p.add_argument("--benchmarks", action="store_true",
                   help="also write the gain section of BENCHMARKS.md (next to --out) from the results")
    p.add_argument("--resume", action="store_true",
                   help="reuse the jobs an earlier run (cut short) finished under the same code; run only the rest")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        print(json.dumps(job(*json.loads(args.job))))
        return
    started = time.time()
    specs = [(s, n, b) for b in args.noises for s in args.settings for n in args.evals]
    path = os.path.join(args.out, "heldout.json")
    results, kept = [], store()

    def name(spec):
        return "_".join(map(str, spec)).replace(":", "_cfg")
    if args.resume:
        results = [r for r in (kept.load(name(spec)) for spec in specs) if r is not None]
        done = {(spec_of(r), r["evals"], r["noises"]) for r in results}
        specs = [spec for spec in specs if tuple(spec) not in done]
        print(f"resuming: {len(results)} jobs reused from {kept.folder}, {len(specs)} to run", flush=True)
    for r in run_jobs(__file__, specs, args.workers):
        results.append(r)
        kept.save(name((spec_of(r), r["evals"], r["noises"])), r)
        print(row(r), flush=True)
        with open(path, "w") as f:  # each result as it comes: a run cut short keeps what it finished (--resume)
            json.dump(results, f, indent=1)
    results.sort(key=lambda r: (SETTINGS.index(spec_of(r)) if spec_of(r) in SETTINGS else 99, r["evals"], r["noises"]))
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    import torch
    run = (f"`.venv-bench/bin/python benchmarks/heldout.py {' '.join(sys.argv[1:])}`".replace(" `", "`") + "\n"
           f"({(time.time() - started) / 60:.0f} min, {args.workers} processes of one thread, {platform.platform()}, "
           f"torch {torch.__version__}).")
    write_tables(results, run, args.out, args.benchmarks)


if __name__ == "__main__":
    main()
