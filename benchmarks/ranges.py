"""Range files against dedicated files (issue 12), on digits-eps with iia_dpmpp_2m and the default calibration
(end to end included), side by side in one run:

- **steps and cfg**: one range file fitted for steps 4-12 at cfg 3, 5.5 and 8, against a file dedicated to each
  (steps, cfg) it is tested at. At 4.5 and 6.5 the range file interpolates between its fitted cfgs; dedicated
  files are fitted at exactly those cfgs. At the fitted cfgs the range entry differs from a dedicated file only in
  its shared teacher, so those cells are the range file against plain DPM++(2M) only.
- **denoise**: img2img from real digits (held out: never seen by any calibration) at denoise 0.3, 0.5 and 0.8,
  6 and 10 steps, cfg 5. The range file starts its fit from the model's own samples (what a user's file does);
  the "dedicated" file is fitted on real digits instead (a user who calibrates on their own images).

Endpoint RMSE on 200 test noises (20 per class, seed 1000) against a 100-step Heun reference from the same start.
All fits of one run see the same calibration noises (``--seed``, 0 by default). A fit from 64 noises varies from
one batch of noises to another (its held-out share is 16 noises), so runs with other seeds repeat the steps-and-cfg
part, and the report compares the mean over seeds of the range file's error with the mean of the dedicated files'.
Each run writes benchmarks/RANGES-seed<N>.json; the report benchmarks/RANGES.md is made from all of them.

    .venv-bench/bin/python benchmarks/ranges.py [--seed 0] [--skip-denoise] [--quick] [--workers 2]
    .venv-bench/bin/python benchmarks/ranges.py --report   # RANGES.md again from the JSON files
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch

from calibrated_samplers.calibration.testbed.analytic import rmse
from jobs import run_jobs

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLER = "iia_dpmpp_2m"
MODEL = "digits-eps"
STEPS = list(range(4, 13))
FITTED_CFGS = [3.0, 5.5, 8.0]
TEST_CFGS = [3.0, 4.5, 5.5, 6.5, 8.0]
DEDICATED_CFGS = [4.5, 6.5]
DENOISE_STEPS = [6, 10]
DENOISES = [0.3, 0.5, 0.8]
DENOISE_CFG = 5.0
SEED = 0  # the calibration noises' (--seed)


def setup(threads=1):  # one thread per fit; two fits run side by side
    torch.set_num_threads(threads)
    from calibrated_samplers.calibration.testbed import testbed
    return testbed(MODEL)


def cal_noise(bed, n_cal):
    return torch.randn(n_cal, *bed.shape, generator=torch.Generator().manual_seed(SEED))


def real_digits(bed, n, offset):
    """``n`` real digits split over the classes as a calibration splits a batch over its conditions (class-major),
    each class's taken from its ``offset``-th image on."""
    from calibrated_samplers.calibration.batch import split_sizes
    from calibrated_samplers.calibration.testbed import tiny
    x, y = tiny.digits_data()
    return torch.cat([x[y == c][offset:offset + k] for c, k in enumerate(split_sizes(n, bed.classes))])


def job(spec):
    """One fit in a worker: ('range', cfg) or ('dedicated', steps, cfg) or ('denoise', use_real_data)."""
    kind, args, n_cal, out_dir = spec
    bed = setup()
    from calibrated_samplers.calibration import calibrate
    from calibrated_samplers.calibration.ranges import calibrate_range
    noise = cal_noise(bed, n_cal)
    common = dict(family=bed.family, shift=bed.shift, sigma_min=bed.sigma_min, chunk_size=64)
    t0 = time.perf_counter()
    if kind == "range":
        (cfg,) = args
        result = calibrate_range(bed.model, bed.sigmas, SAMPLER, noise, steps=STEPS, cfgs=[cfg],
                                 with_cfg=lambda c: (bed.model, bed.conditions(c)), **common)
        evaluations = result.info["model_evaluations_per_sample"]
        saved = result.info.get("teacher_evaluations_saved_per_sample", 0.0)
    elif kind == "dedicated":
        n, cfg = args
        sig = bed.sigmas(n)
        result = calibrate(bed.model, sig, SAMPLER, noise * float(sig[0]), bed.conditions(cfg), **common)
        evaluations, saved = result.info["model_evaluations_per_sample"], 0.0
    else:
        (real,) = args
        data = real_digits(bed, n_cal, 0) if real else None
        result = calibrate_range(bed.model, bed.sigmas, SAMPLER, noise, steps=DENOISE_STEPS, cfgs=[DENOISE_CFG],
                                 denoises=DENOISES, with_cfg=lambda c: (bed.model, bed.conditions(c)), data=data,
                                 **common)
        evaluations = result.info["model_evaluations_per_sample"]
        saved = 0.0
    seconds = time.perf_counter() - t0
    path = os.path.join(out_dir, "-".join([kind] + [str(a) for a in args]) + ".safetensors")
    result.save(path)
    return {"kind": kind, "args": list(args), "path": path, "seconds": seconds, "evaluations": evaluations,
            "teacher_saved": saved}


class Test:
    """The test noises, references and a sampler runner at one cfg (full denoise) or one denoise start."""

    def __init__(self, bed, n_test):
        self.bed = bed
        self.per = n_test // bed.classes
        self.unit = torch.randn(self.per * bed.classes, *bed.shape, generator=torch.Generator().manual_seed(1000))

    def run(self, fn, start, sig, cfg, **kw):
        from calibrated_samplers.samplers import SAMPLERS
        fn = SAMPLERS[fn] if isinstance(fn, str) else fn
        conds = self.bed.conditions(cfg)
        return torch.cat([fn(self.bed.model, start[j * self.per:(j + 1) * self.per], sig, extra_args=c, disable=True,
                             family=self.bed.family, **kw) for j, c in enumerate(conds)])

    def reference(self, start, sigma_from, cfg, key=None):
        """The 100-step Heun solve from ``start``; ``key`` names a start already solved (kept)."""
        from calibrated_samplers.calibration.testbed.analytic import karras
        cache = self.__dict__.setdefault("cache", {})
        if key is None or key not in cache:
            ref = self.run("iia_edm", start, karras(100, self.bed.sigma_min, float(sigma_from), zero=True), cfg)
            if key is None:
                return ref
            cache[key] = ref
        return cache[key]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small batches and fewer cells, to check the plumbing")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration noises")
    ap.add_argument("--skip-denoise", action="store_true", help="the steps-and-cfg part only")
    ap.add_argument("--report", action="store_true", help="only write RANGES.md from the RANGES-seed*.json files")
    ap.add_argument("--out", default=os.path.join(HERE, "RANGES.md"))
    ap.add_argument("--job", help=argparse.SUPPRESS)  # one fit, run by run_jobs in a process of its own
    args = ap.parse_args()
    if args.job:
        kind, job_args, n_cal, out_dir, config = json.loads(args.job)
        globals().update(config)
        print(json.dumps(job((kind, tuple(job_args), n_cal, out_dir))))
        return
    global STEPS, DEDICATED_CFGS, DENOISE_STEPS, DENOISES, FITTED_CFGS, TEST_CFGS, SEED
    if args.report:
        write_report(args.out)
        return
    SEED = args.seed
    n_cal, n_test = 64, 200
    if args.quick:
        n_cal, n_test, STEPS, DENOISE_STEPS, DENOISES = 30, 20, [4], [4], [0.5]
        FITTED_CFGS, TEST_CFGS, DEDICATED_CFGS = [3.0, 8.0], [3.0, 4.5], [4.5]
    bed = setup()
    from calibrated_samplers.calibration import load
    from calibrated_samplers.calibration.entries import denoise_schedule
    started = time.perf_counter()
    work = tempfile.mkdtemp(prefix="ranges-")
    specs = ([("range", (c,), n_cal, work) for c in FITTED_CFGS]
             + [("denoise", (real,), n_cal, work) for real in (False, True) if not args.skip_denoise]
             + [("dedicated", (n, c), n_cal, work) for c in DEDICATED_CFGS for n in reversed(STEPS)])
    config = {"STEPS": STEPS, "DENOISE_STEPS": DENOISE_STEPS, "DENOISES": DENOISES, "SEED": SEED}
    specs = [spec + (config,) for spec in specs]
    fits = []
    for r in run_jobs(__file__, specs, args.workers):
        print(f"fitted {r['kind']} {r['args']} in {r['seconds']:.0f} s", flush=True)
        fits.append(r)
    from calibrated_samplers.calibration.file import CalibrationSet
    def as_set(cal):
        return cal if isinstance(cal, CalibrationSet) else CalibrationSet([cal])
    ranges = [as_set(load(f["path"])) for f in fits if f["kind"] == "range"]
    range_file = CalibrationSet([e for s in ranges for e in s.entries])
    dedicated = {tuple(f["args"]): load(f["path"]) for f in fits if f["kind"] == "dedicated"}
    denoise_files = {f["args"][0]: as_set(load(f["path"])) for f in fits if f["kind"] == "denoise"}

    test = Test(bed, n_test)
    cells = []
    for cfg in TEST_CFGS:
        for n in STEPS:
            sig = bed.sigmas(n)
            start = test.unit * float(sig[0])
            ref = test.reference(start, sig[0], cfg, key=(cfg, float(sig[0])))
            cal, why = range_file.select(sig, bed.family, cfg)
            row = {"cfg": cfg, "steps": n, "range": rmse(test.run(SAMPLER, start, sig, cfg, calibration=cal), ref),
                   "plain": rmse(test.run(SAMPLER, start, sig, cfg), ref),
                   "interpolated": "interpolated" in cal.info}
            if (n, cfg) in dedicated:
                row["dedicated"] = rmse(test.run(SAMPLER, start, sig, cfg, calibration=dedicated[(n, cfg)]), ref)
            cells.append(row)
            print(row, flush=True)
    denoise_cells = []
    real = real_digits(bed, test.per * bed.classes, 100)  # disjoint from the calibration's real digits (the first ones)
    for d in ([] if args.skip_denoise else DENOISES):
        for n in DENOISE_STEPS:
            sig = denoise_schedule(bed.sigmas, n, d)
            start = real + float(sig[0]) * test.unit
            ref = test.reference(start, sig[0], DENOISE_CFG)
            row = {"denoise": d, "steps": n, "plain": rmse(test.run(SAMPLER, start, sig, DENOISE_CFG), ref)}
            for key, label in ((False, "range"), (True, "real_data")):
                cal, why = denoise_files[key].select(sig, bed.family, DENOISE_CFG)
                row[label] = rmse(test.run(SAMPLER, start, sig, DENOISE_CFG, calibration=cal), ref)
            denoise_cells.append(row)
            print(row, flush=True)
    cost = {"range_evaluations": sum(f["evaluations"] for f in fits if f["kind"] == "range"),
            "range_seconds": sum(f["seconds"] for f in fits if f["kind"] == "range"),
            "range_entries": len(range_file.entries),
            "teacher_saved": sum(f["teacher_saved"] for f in fits if f["kind"] == "range"),
            "dedicated_evaluations": {f"{a[0]}@{a[1]:g}": f["evaluations"] for f in fits if f["kind"] == "dedicated"
                                      for a in [f["args"]]},
            "dedicated_seconds": sum(f["seconds"] for f in fits if f["kind"] == "dedicated")}
    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "torch": torch.__version__,
              "n_cal": n_cal, "n_test": n_test, "seed": SEED, "cells": cells, "denoise": denoise_cells, "cost": cost,
              "minutes": (time.perf_counter() - started) / 60, "quick": args.quick}
    with open(os.path.join(os.path.dirname(args.out), f"RANGES-seed{SEED}.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_report(args.out)


def write_report(out):
    import glob
    runs = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(out), "RANGES-seed*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    if not runs:
        raise SystemExit("no RANGES-seed*.json to report: run the benchmark first")
    with open(out, "w") as f:
        f.write(report(runs))
    print(report(runs))


def report(runs):
    """RANGES.md from one or more runs (seeds) of the same settings."""
    first = runs[0]
    seeds = [r.get("seed", 0) for r in runs]
    mean = lambda xs: sum(xs) / len(xs)
    cells = {}  # (cfg, steps) -> the cell of every run
    for r in runs:
        for c in r["cells"]:
            cells.setdefault((c["cfg"], c["steps"]), []).append(c)
    steps = sorted({n for _, n in cells})
    cfgs = sorted({c for c, _ in cells})
    lines = [f"# Range files against dedicated files ({max(r['date'] for r in runs)})", "",
             f"{MODEL}, {SAMPLER}, default calibration (end to end included), {first['n_cal']} calibration noises, "
             f"endpoint RMSE on {first['n_test']} test noises against a 100-step Heun reference. "
             f"{len(runs)} run(s), calibration noise seeds {', '.join(map(str, seeds))}, each "
             "`.venv-bench/bin/python benchmarks/ranges.py --seed N` (seeds other than 0 with --skip-denoise), "
             "2 worker processes of one thread each: " + "; ".join(
                 f"seed {r.get('seed', 0)}: {r['minutes']:.1f} min{' --quick' if r['quick'] else ''}" for r in runs)
             + f". {first['machine']}, torch {first['torch']}.", "",
             f"## Steps {', '.join(map(str, steps))}, cfg: one file fitted at cfg "
             f"{', '.join(f'{c:g}' for c in FITTED_CFGS)}", "",
             "Range / dedicated: the range file's error over a file fitted for exactly that steps and cfg, each the mean "
             "over the seeds' fits. Range / plain: over uncalibrated DPM++(2M) on the same schedule (the same in every "
             "run). (i): the range file interpolated between its fitted cfgs.", "",
             "| cfg | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    worst, worst_single = 0.0, 0.0
    for cfg in cfgs:
        texts = []
        for n in steps:
            cs = cells.get((cfg, n), [])
            if not cs:
                texts.append("")
                continue
            t = f"{mean([c['range'] for c in cs]):.4f}"
            ded = [c for c in cs if "dedicated" in c]
            if ded:
                ratio = mean([c["range"] for c in ded]) / mean([c["dedicated"] for c in ded])
                worst = max(worst, ratio)
                worst_single = max([worst_single] + [c["range"] / c["dedicated"] for c in ded])
                t += f" ({ratio:.2f}x ded.)"
            t += f" {mean([c['range'] for c in cs]) / cs[0]['plain']:.2f}x plain" + (
                " (i)" if cs[0]["interpolated"] else "")
            texts.append(t)
        lines.append(f"| {cfg:g} | " + " | ".join(texts) + " |")
    lines += ["", f"Worst range / dedicated ratio (means over seeds): **{worst:.2f}x** (target: at most 1.1x).", ""]
    if len(runs) > 1:
        spreads = sorted(max(d) / min(d) for cs in cells.values()
                         for d in [[c["dedicated"] for c in cs if "dedicated" in c]] if len(d) > 1)
        lines += ["### Each seed on its own", "",
                  "Range / dedicated per run, and the dedicated file's RMSE: how much one 64-noise fit varies "
                  f"(the worst single-run ratio is {worst_single:.2f}x). Dedicated files for the same setting fitted "
                  f"from different noise batches differ by up to {spreads[-1]:.2f}x (median "
                  f"{spreads[len(spreads) // 2]:.2f}x) between seeds.", "",
                  "| cfg | seed | " + " | ".join(f"{n} steps" for n in steps) + " |",
                  "|---" * (len(steps) + 2) + "|"]
        for cfg in cfgs:
            for k, seed in enumerate(seeds):
                row = [next((c for c in runs[k]["cells"] if c["cfg"] == cfg and c["steps"] == n), None) for n in steps]
                if not any(c is not None and "dedicated" in c for c in row):
                    continue
                lines.append(f"| {cfg:g} | {seed} | " + " | ".join(
                    "" if c is None or "dedicated" not in c else
                    f"{c['range'] / c['dedicated']:.2f}x (ded. {c['dedicated']:.4f})" for c in row) + " |")
        lines.append("")
    cost = first["cost"]
    per_file = list(cost["dedicated_evaluations"].values())
    mean_dedicated = sum(per_file) / max(1, len(per_file))
    n_entries = cost["range_entries"]
    equivalent = cost["range_evaluations"] + cost["teacher_saved"]
    n_served = len(steps) * len(cfgs)
    lines += [f"### Cost (model evaluations per calibration noise; the seed {seeds[0]} run)", "",
              f"- The range file ({n_entries} entries): {cost['range_evaluations']:.0f} evaluations, "
              f"{cost['range_seconds']:.0f} s. Its shared teachers saved {cost['teacher_saved']:.0f} evaluations: "
              f"**{cost['range_evaluations'] / equivalent:.2f}x** the cost of {n_entries} dedicated files for the "
              "same settings (each with its own teacher, same budget).",
              f"- Dedicated files measured here: {len(per_file)}, {mean_dedicated:.0f} evaluations each on average, "
              f"{cost['dedicated_seconds']:.0f} s in all.",
              f"- Settings the range file serves among those tested: {n_served} "
              f"({len(cfgs)} cfgs x {len(steps)} step counts); dedicated files for all of them would cost about "
              f"{equivalent / n_entries * n_served:.0f} evaluations, so the range file costs "
              f"**{cost['range_evaluations'] / (equivalent / n_entries * n_served):.2f}x** "
              "that (and any other cfg between 3 and 8 comes free).", ""]
    denoise = next((r for r in runs if r["denoise"]), None)
    if denoise is not None:
        lines += [f"## Denoise (img2img from held-out real digits, cfg {DENOISE_CFG:g}; the seed "
                  f"{denoise.get('seed', 0)} run)", "",
                  "Range: the file fitted on the model's own samples (the default). Real data: fitted on real digits. "
                  "Ratios are to uncalibrated DPM++(2M) on the same schedule.", "",
                  "| denoise | steps | plain | range file | real-data file |", "|---|---|---|---|---|"]
        for c in denoise["denoise"]:
            lines.append(f"| {c['denoise']:g} | {c['steps']} | {c['plain']:.4f} | {c['range']:.4f} "
                         f"({c['range'] / c['plain']:.2f}x) | {c['real_data']:.4f} "
                         f"({c['real_data'] / c['plain']:.2f}x) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
