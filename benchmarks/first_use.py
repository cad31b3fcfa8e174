"""What a first-use calibration gives (the ComfyUI first-use node's and the web UI option's defaults: 16 noises,
``fine_steps`` 6, per-step fit only, one prompt), and how much it varies from one batch of noises to another.

digits-eps, iia_dpmpp_2m, one class as the prompt (a first-use run calibrates its own prompt), cfg 5, 6 and 10
steps; six fits from six batches of noises. Endpoint RMSE on 200 test noises of that class against a 100-step
Heun reference from the same noise, as a ratio to uncalibrated DPM++(2M) on the same schedule. Writes
benchmarks/FIRST_USE.md.

    .venv-bench/bin/python benchmarks/first_use.py
"""
import datetime
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLER, CFG, CLASS, STEPS, FITS, BATCH, FINE_STEPS = "iia_dpmpp_2m", 5.0, 3, (6, 10), 6, 16, 6


def main():
    torch.set_num_threads(1)
    from calibrated_samplers.calibration import calibrate
    from calibrated_samplers.calibration.testbed import testbed
    from calibrated_samplers.calibration.testbed.analytic import karras, rmse
    from calibrated_samplers.samplers import SAMPLERS
    bed = testbed("digits-eps")
    cond = bed.conditions(CFG)[CLASS]
    unit = torch.randn(200, *bed.shape, generator=torch.Generator().manual_seed(1000))

    def run(name, x, sig, **kw):
        return SAMPLERS[name](bed.model, x, sig, extra_args=cond, disable=True, family=bed.family, **kw)

    started = time.perf_counter()
    rows = []
    for n in STEPS:
        sig = bed.sigmas(n)
        start = unit * float(sig[0])
        ref = run("iia_edm", start, karras(100, bed.sigma_min, float(sig[0]), zero=True))
        plain = rmse(run(SAMPLER, start, sig), ref)
        ratios, seconds = [], []
        for seed in range(FITS):
            noise = torch.randn(BATCH, *bed.shape, generator=torch.Generator().manual_seed(100 + seed))
            t0 = time.perf_counter()
            cal = calibrate(bed.model, sig, SAMPLER, noise * float(sig[0]), [cond], family=bed.family,
                            shift=bed.shift, sigma_min=bed.sigma_min, end_to_end=False, fine_steps=FINE_STEPS)
            seconds.append(time.perf_counter() - t0)
            ratios.append(rmse(run(SAMPLER, start, sig, calibration=cal), ref) / plain)
            print(n, seed, round(ratios[-1], 3), flush=True)
        rows.append((n, plain, ratios, seconds))
    lines = [f"# First-use calibrations ({datetime.date.today().isoformat()})", "",
             f"`.venv-bench/bin/python benchmarks/first_use.py` ({(time.perf_counter() - started) / 60:.1f} min, one "
             f"thread, {platform.platform()}, torch {torch.__version__}). digits-eps, {SAMPLER}, class {CLASS} as the "
             f"prompt, cfg {CFG:g}; {FITS} fits of {BATCH} noises each (fine_steps {FINE_STEPS}, per-step fit only: "
             "the first-use defaults); endpoint RMSE on 200 test noises against a 100-step Heun reference.", "",
             "| steps | uncalibrated RMSE | calibrated / uncalibrated, each fit | seconds per fit |", "|---|---|---|---|"]
    for n, plain, ratios, seconds in rows:
        lines.append(f"| {n} | {plain:.4f} | {' '.join(f'{r:.2f}x' for r in ratios)} | "
                     f"{min(seconds):.1f}-{max(seconds):.1f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "FIRST_USE.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
