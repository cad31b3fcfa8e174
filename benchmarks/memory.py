"""Peak memory of a calibration vs the batch size, at a fixed chunk size (calibration-engine issue).

    python benchmarks/memory.py [--model digits-eps] [--chunk 32] [--batches 32 256]

Each measurement runs in a fresh process: load the model, run one warm-up evaluation, reset the kernel's
peak-RSS counter (/proc/self/clear_refs), then do the work and read VmHWM. Reported: the peak above the
resident size just before the work, for (a) one batched model evaluation of ``chunk`` samples and (b) a
calibration of each batch size, and (b) as a multiple of (a). Linux only (reads /proc).
"""
import argparse
import json
import subprocess
import sys


def proc_status(key):
    """A size from /proc/self/status in bytes (VmRSS, VmHWM...), or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    except (OSError, StopIteration):
        return None


def reset_peak():
    """Reset the kernel's peak-RSS counter; returns the resident size now (Linux; None elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return proc_status("VmRSS")


def child(spec):
    import torch
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    from calibrated_samplers.calibration import calibrate
    from calibrated_samplers.calibration.testbed import testbed
    bed = testbed(spec["model"])
    sig = bed.sigmas(spec["steps"])
    cond = bed.conditions(spec["cfg"])
    warm = bed.noise(spec["chunk"], 1, sig)
    bed.model(warm, torch.full((spec["chunk"],), float(sig[0])), **cond[0])
    noise = bed.noise(spec["batch"], 0, sig) if spec["batch"] else None
    before = reset_peak()
    if spec["batch"]:
        calibrate(bed.model, sig, spec["sampler"], noise, cond, family=bed.family, shift=bed.shift,
                  chunk_size=spec["chunk"])
    else:
        x = bed.noise(spec["chunk"], 2, sig)
        bed.model(x, torch.full((spec["chunk"],), float(sig[1])), **cond[0])
    print(json.dumps({"peak_above_start": proc_status("VmHWM") - before}))


def measure(spec):
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_above_start"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child")
    p.add_argument("--model", default="digits-eps")
    p.add_argument("--sampler", default="iia_dpmpp_2m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    base = dict(model=args.model, sampler=args.sampler, steps=args.steps, cfg=args.cfg, chunk=args.chunk)
    one = measure(dict(base, batch=0))
    print(f"{args.model}, {args.sampler}, {args.steps} steps, cfg {args.cfg:g}, chunk {args.chunk}")
    print(f"one batched model evaluation of {args.chunk}: peak +{one / 2**20:.1f} MiB")
    for b in args.batches:
        m = measure(dict(base, batch=b))
        print(f"calibration, batch {b:4d}: peak +{m / 2**20:.1f} MiB = {m / max(one, 1):.1f}x one evaluation")


if __name__ == "__main__":
    main()
