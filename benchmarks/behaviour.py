"""What a behaviour-preserving change must leave bit for bit the same: calibrate() and calibrate_range() on the analytic
Gaussian mixture along every path of the pipeline (the IIA and AMED per-step fits, the end-to-end stage accepted and
vetoed, a schedule-only fit, the amed_ipndm variant search, a range file with a shared teacher and a denoise below 1),
every parameter, learned sigma and info number (less the seconds) written to JSON. Run it at two commits and compare:

    .venv-bench/bin/python benchmarks/behaviour.py /tmp/new.json           # the checkout the package imports
    .venv-bench/bin/python benchmarks/behaviour.py --compare /tmp/old.json /tmp/new.json

(an older commit: `git worktree add /tmp/old COMMIT` and put a folder holding a `calibrated_samplers` link to it first
on PYTHONPATH). About 6 minutes on one thread.
"""
import argparse
import json
import sys

import torch


def _plain(o):
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items() if k != "seconds"}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    return o.tolist() if torch.is_tensor(o) else o


def record(path):
    from calibrated_samplers.calibration import calibrate
    from calibrated_samplers.calibration.ranges import calibrate_range
    from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras
    torch.set_num_threads(1)
    mix = GaussianMixture()
    noise = mix.noise(64, seed=1) * 80.0
    sig = karras(5, 0.002, 80.0)
    runs = {
        "iia": dict(sampler="iia_dpmpp_2m", budget=300),
        "iia_interior": dict(sampler="iia_dpmpp_2m", sigmas=karras(6, 0.002, 80.0), budget=300,
                             learn_sigmas="interior"),
        "amed": dict(sampler="amed_euler", budget=300),
        "amed_ipndm": dict(sampler="amed_ipndm", budget=40),
        "vetoed": dict(sampler="iia_dpmpp_2m", learning_rate=30.0, budget=100),
        "schedule_only": dict(sampler="iia_dpmpp_2m", learn_params=False, budget=60),
        "per_step_local": dict(sampler="iia_ddim", end_to_end=False, target="local"),
    }
    out = {}
    for tag, kw in runs.items():
        kw = dict(kw)
        cal = calibrate(mix.edm(), kw.pop("sigmas", sig), kw.pop("sampler"), noise, family="edm", **kw)
        out[tag] = _plain({"params": cal.params, "sample_sigmas": cal.sample_sigmas, "info": cal.info})
    cset = calibrate_range(mix.edm(), lambda n: karras(n, 0.002, 80.0), "iia_dpmpp_2m", mix.noise(64, seed=2),
                           steps=(3, 4), denoises=(1.0, 0.6), family="edm", budget=30)
    out["range"] = [_plain({"params": c.params, "sample_sigmas": c.sample_sigmas, "info": c.info})
                    for c in cset.entries]
    with open(path, "w") as f:
        json.dump(out, f, sort_keys=True)
    print(f"wrote {path}: {len(out)} runs")


def compare(a, b):
    with open(a) as f:
        old = json.load(f)
    with open(b) as f:
        new = json.load(f)
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    print("the same, bit for bit" if not differ else f"differ: {', '.join(differ)}")
    return 0 if not differ else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if not args.out:
        p.error("give the JSON to write, or --compare A B")
    record(args.out)
