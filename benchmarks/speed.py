"""Overheads: sampling with a calibration vs its base solver, and calibration vs its pure model-evaluation time.

    python benchmarks/speed.py [--model digits-eps] [--evaluations 6] [--repeats 7]

Sampling: each calibrated sampler with and without its calibration on the same 64 noises, alternating, the
median of ``repeats`` runs each; ratio = calibrated / uncalibrated. Calibration: its wall time divided by the
time the same number of batched model calls takes on their own (timed on chunks of the same size).
"""
import argparse
import statistics
import time

import torch

from calibrated_samplers.calibration import calibrate
from calibrated_samplers.calibration.testbed import testbed
from calibrated_samplers.samplers import SAMPLERS, steps_for_evaluations


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-eps")
    p.add_argument("--evaluations", type=int, default=6)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    bed = testbed(args.model)
    cond = {"cond": 3, "cfg": 1.0} if bed.classes else {}
    fam = dict(family=bed.family, shift=bed.shift)
    print(f"{args.model}, {args.evaluations} evaluations, batch {args.batch}, {args.threads} threads")
    print(f"{'sampler':16s} {'sampling ratio':>15s} {'calibration s':>14s} {'model-only s':>13s} {'ratio':>7s}")
    for name in [n for n, f in SAMPLERS.items() if f.kind != "plain"]:
        sig = bed.sigmas(*steps_for_evaluations(name, args.evaluations))
        x = bed.noise(args.batch, 1000, sig)
        t0 = time.perf_counter()
        cal = calibrate(bed.model, sig, name, bed.noise(64, 0, sig), [cond] if cond else None, chunk_size=64, **fam)
        cal_seconds = time.perf_counter() - t0
        # the same number of batched model calls, on chunks of the calibration's size, timed alone
        calls, per_noise = cal.info["model_calls"], cal.info["model_evaluations_per_sample"]
        chunk = max(1, round(per_noise * 64 / calls))
        xc = bed.noise(chunk, 5, sig)
        cc = cond
        t0 = time.perf_counter()
        for j in range(calls):
            bed.model(xc, torch.full((chunk,), float(sig[j % (len(sig) - 1)])), **cc)
        model_seconds = time.perf_counter() - t0
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for use in (False, True):
                t0 = time.perf_counter()
                SAMPLERS[name](bed.model, x, sig, extra_args=cond, disable=True, calibration=cal if use else None,
                               **fam, **({} if use else cal.options))
                times[use].append(time.perf_counter() - t0)
        ratio = statistics.median(times[True]) / statistics.median(times[False])
        print(f"{name:16s} {ratio:15.3f} {cal_seconds:14.2f} {model_seconds:13.2f} {cal_seconds / model_seconds:7.2f}")


if __name__ == "__main__":
    main()
