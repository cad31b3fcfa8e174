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
import datetime
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from calibrated_samplers.calibration.testbed.tiny import HELD_OUT  # noqa: E402

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


def row(r):
    fresh = r["fresh"]
    ratio, lo, hi = fresh["ratio_interval"]
    held_out = "held out" if r["setting"].split(" cfg ")[0] in HELD_OUT else "tuning"
    return (f"| {r['setting']} ({held_out}) | {r['evals']} | {r['noises']} | {r['best_uncalibrated']} "
            f"{fresh['uncalibrated']:.4f} | {fresh['calibrated']:.4f} | **{ratio:.2f}x** [{lo:.2f}-{hi:.2f}] | "
            f"{r['plain_requested']:.4f} | {r['plain_raised_start']:.4f} (x{r['chosen_factor']:g}) | "
            f"{r['per_step_fit']:.4f} | {r['calibrated']:.4f} (round {r['best_round']}/{r['rounds']}) | "
            f"{r['teacher']:.4f} | {r['minutes']:.1f} |")


SECTION = "## Where the gain comes from (held-out models beside digits)"


def gain_section(results, source="heldout.json"):
    """BENCHMARKS.md's section on where each calibration's gain comes from: the share of the plain solver's error
    that the calibration removed which the raised end, the per-step fit and the end-to-end stage each removed (on
    the test noises), per model, evaluation count and calibration batch; from heldout.py's results."""
    lines = [SECTION, "", f"From `benchmarks/heldout.py` ({source}; [HELDOUT.md](HELDOUT.md) has the whole table and "
             "the command). iia_dpmpp_2m, default calibration; test RMSE on the 200 test noises of the plain solver "
             "on the requested schedule, then after each stage of the calibration, and each stage's share of the "
             "whole drop (a negative share: that stage made it worse). The last column is the headline: best "
             "calibrated / best uncalibrated (raised ends included) on 600 fresh noises, with its 95% interval.", "",
             "| model | cfg | evals | noises | plain | raised end | per-step fit | end to end | "
             "shares: raised / per-step / e2e | fresh ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        model, cfg = r["setting"].split(" cfg ")
        plain, raised, fit, end = r["plain_requested"], r["plain_raised_start"], r["per_step_fit"], r["calibrated"]
        drop = plain - end
        steps = ((plain, raised), (raised, fit), (fit, end))
        shares = " / ".join(f"{(a - b) / drop:.0%}".replace("-0%", "0%") for a, b in steps) if drop > 0 else "no gain"
        ratio, lo, hi = r["fresh"]["ratio_interval"]
        kind = "held out" if model in HELD_OUT else "tuning"
        lines.append(f"| {model} ({kind}) | {cfg} | {r['evals']} | {r['noises']} | {plain:.4f} | {raised:.4f} "
                     f"(x{r['chosen_factor']:g}) | {fit:.4f} | {end:.4f} (check {r['best_round']}/{r['rounds']}) | "
                     f"{shares} | {ratio:.2f}x [{lo:.2f}-{hi:.2f}] |")
    return lines


def write_gain_section(results, path=os.path.join(HERE, "BENCHMARKS.md")):
    """Put gain_section in BENCHMARKS.md, in place of the one there (before "Not in this run" if none)."""
    with open(path) as f:
        text = f.read().split("\n")
    section = gain_section(results)
    if SECTION in text:
        a = text.index(SECTION)
        b = next((i for i in range(a + 1, len(text)) if text[i].startswith("## ")), len(text))
        text[a:b] = section + [""]
    else:
        b = text.index("## Not in this run") if "## Not in this run" in text else len(text)
        text[b:b] = section + [""]
    with open(path, "w") as f:
        f.write("\n".join(text))


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


def write_tables(results, runs, out, benchmarks=False):
    """HELDOUT.md (and with ``benchmarks`` the gain section of BENCHMARKS.md) in ``out`` from ``results``; ``runs``
    says which commands produced them."""
    lines = [f"# The default calibration on held-out models ({datetime.date.today().isoformat()})", "", runs,
             "Protocol: PROTOCOL.md (held-out models measured with the defaults only).",
             "", "iia_dpmpp_2m, default calibration from the given number of noises (seed 0). **fresh**: best "
             "uncalibrated (chosen on the 200 test noises among run.py's sweep, raised ends included) and the "
             "calibration, endpoint RMSE on 600 fresh noises against the 100-step reference, their ratio and its "
             "95% paired bootstrap interval. **Where the gain comes from** (test noises): the plain solver on the "
             "requested Karras/shift-1 schedule, on the raised start the probe chose (factor), after the per-step fit, "
             "after the end-to-end stage (the check it kept / its checks); the teacher the fit matches, against the "
             "same reference.", "",
             "| setting | evals | noises | best uncalibrated (fresh) | calibrated (fresh) | ratio (fresh) | plain | "
             "raised start | per-step fit | end to end | teacher | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r) for r in results]
    with open(os.path.join(out, "HELDOUT.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if benchmarks:
        write_gain_section(results, os.path.join(out, "BENCHMARKS.md"))
    print("\n".join(lines))

if __name__ == "__main__":
    main()
