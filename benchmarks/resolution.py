"""Does a calibration file carry over to another image size? Users fit one file and sample at several sizes (and
share files fitted at someone else's), and a file's key is the schedule, not the latent's size.

    .venv-bench/bin/python benchmarks/resolution.py            # writes benchmarks/RESOLUTION.md and resolution.json

A file already fitted under benchmarks/partial/resolution/ is reused (delete it to refit).

The bundled digit UNet is fully convolutional, so it runs at 24 x 24, 16 x 32 and 32 x 32 as well as at the 16 x 16
it was trained on (there it draws other shapes; its own ODE is what the reference solves, so the comparison stands). The
default calibration of ``iia_dpmpp_2m`` is fitted once per size from 256 noises of that size (the fits run in
parallel processes); every file is then measured at every size on 200 other noises against a 100-step reference,
beside k-diffusion's uncalibrated DPM-Solver++(2M) on Karras and on Karras ending at a raised sigma.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from calibrated_samplers.calibration import calibrate, load  # noqa: E402
from calibrated_samplers.calibration.testbed import testbed  # noqa: E402
from calibrated_samplers.calibration.testbed.analytic import karras  # noqa: E402
from calibrated_samplers.calibration.testbed.kdiffusion import load_k_diffusion_sampling  # noqa: E402
from calibrated_samplers.samplers import SAMPLERS, steps_for_evaluations  # noqa: E402

SAMPLER = "iia_dpmpp_2m"


def setup(args):
    bed = testbed(args.model)
    steps, zero = steps_for_evaluations(SAMPLER, args.evaluations)
    sig = karras(steps if zero else steps + 1, bed.sigma_min, bed.sigma_max, zero=zero)
    return bed, sig, bed.conditions(args.cfg), dict(family=bed.family, shift=bed.shift)


def side(size):
    """"16" -> (16, 16); "16x32" -> (16, 32) (height x width)."""
    h, _, w = size.partition("x")
    return int(h), int(w or h)


def noises(bed, n, size, seed, sig):
    x = torch.randn(n, bed.shape[0], *side(size), generator=torch.Generator().manual_seed(seed))
    return x if bed.family == "flow" else x * float(sig[0])


def sample(bed, conditions, fn, x, sig, **kw):
    per = x.shape[0] // len(conditions)
    return torch.cat([fn(bed.model, x[j * per:(j + 1) * per], sig, extra_args=c, disable=True, **kw)
                      for j, c in enumerate(conditions)])


def file_path(args, size):
    return os.path.join(HERE, "partial", "resolution",
                        f"{args.model}_cfg{args.cfg:g}_{args.evaluations}_{size}px_{args.n_cal}.safetensors")


def fit(args, size):
    torch.set_num_threads(1)
    bed, sig, conditions, fam = setup(args)
    t0 = time.perf_counter()
    cal = calibrate(bed.model, sig, SAMPLER, noises(bed, args.n_cal, size, 0, sig), conditions, chunk_size=64,
                    sigma_min=bed.sigma_min, info={"latent_shape": [bed.shape[0], *side(size)]}, **fam)
    path = file_path(args, size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cal.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"fitted at {size} px in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-eps")
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--evaluations", type=int, default=6)
    ap.add_argument("--sizes", nargs="+", default=["16", "24", "16x32", "32"], help="side, or height x width")
    ap.add_argument("--n-cal", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--fit", default=None, help=argparse.SUPPRESS)  # one size, in a worker process
    ap.add_argument("--out", default=os.path.join(HERE, "RESOLUTION"))
    args = ap.parse_args(argv)
    if args.fit is not None:
        return fit(args, args.fit)

    common = ["--model", args.model, "--cfg", str(args.cfg), "--evaluations", str(args.evaluations),
              "--n-cal", str(args.n_cal)]
    workers = [subprocess.Popen([sys.executable, __file__, "--fit", str(s)] + common)
               for s in args.sizes if not os.path.exists(file_path(args, s))]  # a file already fitted is reused
    if any(w.wait() for w in workers):
        raise SystemExit("a fit failed (its output is above)")
    started = time.perf_counter()
    torch.set_num_threads(2)
    bed, sig, conditions, fam = setup(args)
    files = {s: load(file_path(args, s)) for s in args.sizes}
    per = max(1, args.n_test // len(conditions))
    uncalibrated = {"dpmpp_2m (karras)": sig}
    if bed.family != "flow":
        uncalibrated["dpmpp_2m (karras, last 0.2)"] = karras(len(sig) - 1, 0.2, bed.sigma_max, zero=True)
    dpmpp_2m = load_k_diffusion_sampling().sample_dpmpp_2m  # k-diffusion's, as the full benchmark uses
    rows = []
    for size in args.sizes:
        x = noises(bed, per * len(conditions), size, 1000, sig)
        ref = sample(bed, conditions, SAMPLERS["iia_edm"], x, bed.sigmas(100), **fam)

        def err(out):
            return float((out.double() - ref.double()).pow(2).mean().sqrt())
        row = {"size": size, "uncalibrated": {k: err(sample(bed, conditions, dpmpp_2m, x, s))
                                              for k, s in uncalibrated.items()},
               "files": {f: err(sample(bed, conditions, SAMPLERS[SAMPLER], x, sig, calibration=c, **fam))
                         for f, c in files.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"model": args.model, "cfg": args.cfg, "evaluations": args.evaluations, "sampler": SAMPLER,
              "n_cal": args.n_cal, "n_test": per * len(conditions), "rows": rows,
              "fit_seconds": {s: files[s].info.get("seconds") for s in args.sizes},
              "fit_threads": 1,
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/resolution.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write(report, args.out, time.perf_counter() - started)


def write(report, out, seconds):
    sizes = [r["size"] for r in report["rows"]]
    lines = [f"# A calibration file at another image size ({report['date']})", "",
             f"`{report['command'].strip()}` (measured in {seconds / 60:.1f} min after the fits below, {platform.machine()}, torch "
             f"{report['torch']}). {report['model']} at cfg {report['cfg']:g}, {report['sampler']} with the default "
             f"calibration at {report['evaluations']} model evaluations, one file fitted per size from "
             f"{report['n_cal']} noises of that size; endpoint RMSE on {report['n_test']} other noises of each size "
             "against a 100-step reference. The model was trained at 16 x 16 only. The fits took "
             + ", ".join(f"{v:.0f} s at {s}" for s, v in report["fit_seconds"].items())
             + " (one thread each, in parallel).", "",
             "| sampled at | " + " | ".join(f"file fitted at {s}" for s in sizes)
             + " | " + " | ".join(report["rows"][0]["uncalibrated"]) + " |",
             "|---|" + "---|" * (len(sizes) + len(report["rows"][0]["uncalibrated"]))]
    for r in report["rows"]:
        own = r["files"][r["size"]]
        cells = [f"{r['files'][s]:.4f} ({r['files'][s] / own:.2f}x own)" if s != r["size"] else f"**{own:.4f}**"
                 for s in sizes]
        cells += [f"{v:.4f}" for v in r["uncalibrated"].values()]
        lines.append(f"| {r['size']} | " + " | ".join(cells) + " |")
    lines += ["", "Each file's ratio is to the file fitted at the size sampled (bold). What the pack does with this: "
              "among the files that match a run, the library prefers one fitted within 1.5x the run's pixel count "
              "(then the nearest size, then the newest), and says in the console when the one it uses was fitted "
              "at another size (calibration/library.py)."]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    # the table in capitals, its data in lower case, as the other reports here
    with open(os.path.join(os.path.dirname(out), os.path.basename(out).lower() + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
