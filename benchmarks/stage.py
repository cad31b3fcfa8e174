"""Where the end-to-end stage's gain goes: one default calibration traced check by check (issue 29's diagnostic).

For a setting (model, cfg) at ``--evals`` model evaluations, ``iia_dpmpp_2m``, the calibration's defaults from
``--noises`` calibration noises (seed 0): at the start of the end-to-end stage and at each of its held-out checks,
the fit share's RMSE against the teacher, the held-out share's RMSE against the teacher, whether the acceptance rule
takes the iterate (and the paired per-noise difference it judges, in standard errors), and the RMSE on the
benchmark's 200 test noises against the 100-step reference (the test noises only watch: nothing is chosen on
them). Beside it: the teacher's own error against the reference on the test noises (what matching the teacher
can reach at best), and the decomposition of the gain: plain solver on the requested schedule, on the raised
start, the per-step fit, the stage's result. Writes ``--out`` (JSON) and prints a table.

    .venv-bench/bin/python benchmarks/stage.py digits-eps:1 --evals 6 [--noises 256] [--out stage.json]
"""
import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from calibrated_samplers.calibration import end_to_end as E  # noqa: E402
from calibrated_samplers.calibration import engine  # noqa: E402
from calibrated_samplers.calibration.teacher import sub_grid  # noqa: E402
from calibrated_samplers.samplers import SAMPLERS, steps_for_evaluations  # noqa: E402
from calibrated_samplers.samplers.core import Denoiser, integrate  # noqa: E402
from protocol import check_may_tune  # noqa: E402  (benchmarks/protocol.py)

SAMPLER = "iia_dpmpp_2m"
HELD_OUT_ERRORS = E.Stage.held_out_errors  # the stage's own check, which Trace wraps


def teacher_grid(sig, fine_steps, sigma_min):
    """The teacher's whole grid: each interval of ``sig`` cut as the calibration's teacher cuts it."""
    grid = [sig[0]]
    for a, b in zip(sig[:-1], sig[1:]):
        grid += sub_grid(a, b, fine_steps, sigma_min)[1:]
    return torch.tensor(grid, dtype=torch.float64)


class Trace:
    """Records, at every held-out check of the stage, the current iterate's test error (watch only)."""

    def __init__(self, st, per_noise_rmse):
        self.st, self.per_noise_rmse, self.rows, self.start = st, per_noise_rmse, [], None

    def test_errors(self, stage):
        with torch.no_grad():
            params, sig = stage.learn.materialize()
            sig = [float(s) for s in sig]
            step = SAMPLERS[stage.method].stepper(params, stage.options)
            st, unit = self.st, self.st.unit
            per = unit.shape[0] // len(st.conditions)
            ends = []
            for j, c in enumerate(st.conditions):
                x = unit[j * per:(j + 1) * per].to(torch.float64)
                x = x if st.bed.family == "flow" else x * sig[0]
                ev = Denoiser(st.bed.model, x, torch.tensor(sig, dtype=torch.float64), c)
                ends.append(integrate(step, ev, x, sig, stage.run.family))
            return self.per_noise_rmse(torch.cat(ends), st.reference)

    def install(self):
        trace, original = self, HELD_OUT_ERRORS

        def held_out_errors(stage):
            held = original(stage)
            if trace.start is None:
                trace.start = held
            test = trace.test_errors(stage)
            diff = trace.start.sqrt() - held.sqrt()
            z = float(diff.mean() / (diff.std() / math.sqrt(diff.numel()))) if diff.numel() > 1 and diff.std() > 0 \
                else 0.0
            fit = math.sqrt(getattr(stage, "last_loss", float("nan")))
            trace.rows.append({"spent": round(stage.spent, 1), "fit_rmse": fit,
                               "held_out_rmse": math.sqrt(float(held.mean())), "held_out_z": z,
                               "accepted": bool(E.held_out_accepts(held, trace.start, stage.margin)) if trace.rows else None,
                               "test_rmse": float(test.pow(2).mean().sqrt())})
            return held
        E.Stage.held_out_errors = held_out_errors


def _load(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _store(path, key, value):
    """Add one entry to the JSON dict at ``path`` (written whole, then renamed: a reader never sees half a file)."""
    data = _load(path)
    data[key] = value
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def trace(model, cfg, evals, noises, seed=0, overrides=None, sweep=True, sweep_cache=None):
    """One default (or ``overrides``) calibration of ``SAMPLER`` on the setting, traced check by check; returns a
    dict (module docstring). ``sweep``: also the best uncalibrated sampler of the benchmark's sweep on the test
    noises, and that pair again on the 600 fresh noises. ``sweep_cache``: a JSON file that keeps the sweep's choice
    per setting and evaluation count (it does not depend on the calibration noises), so the other batch sizes of a
    cell skip the sweep."""
    import run as bench
    overrides = dict(overrides or {})
    check_may_tune(model, overrides)
    st = bench.Setting(model, float(cfg), 200, noises)
    n_steps, _ = steps_for_evaluations(SAMPLER, evals)
    sig = st.bed.sigmas(n_steps)
    tr = Trace(st, bench.per_noise_rmse)
    tr.install()
    started = time.time()
    # the end-to-end budget in multiples of what came before it (engine.BUDGET_FACTOR), for this calibration only
    factor, kept = overrides.get("budget_factor", engine.BUDGET_FACTOR), engine.BUDGET_FACTOR
    try:
        engine.BUDGET_FACTOR = float(factor)
        cal = engine.calibrate(st.bed.model, sig, SAMPLER, st.bed.noise(noises, seed, sig), st.conditions,
                               chunk_size=64, sigma_min=st.bed.sigma_min, **st.fam,
                               **{k: v for k, v in overrides.items() if k != "budget_factor"})
    finally:
        engine.BUDGET_FACTOR = kept
    minutes = (time.time() - started) / 60

    def per_noise(sigmas, calibration=None, unit=None, reference=None):
        x = st.sample(SAMPLERS[SAMPLER], sigmas, unit, calibration=calibration, **st.fam)
        return bench.per_noise_rmse(x, st.reference if reference is None else reference)

    def rms(e):
        return float(e.pow(2).mean().sqrt())
    info = cal.info
    e2e = info.get("end_to_end", {})
    factor = info.get("start_schedule", {}).get("chosen_factor") or 1.0
    start_sig = engine.raised_schedule(sig, factor).to(torch.float64)
    calibrated = per_noise(sig, cal)
    out = {"setting": st.name, "evals": evals, "noises": noises, "seed": seed, "minutes": round(minutes, 2),
           "overrides": {k: repr(v) for k, v in overrides.items()},
           "plain_requested": rms(per_noise(sig)), "plain_raised_start": rms(per_noise(start_sig)),
           "per_step_fit": tr.rows[0]["test_rmse"] if tr.rows else None, "calibrated": rms(calibrated),
           "teacher": rms(per_noise(teacher_grid([float(s) for s in start_sig], int(info["fine_steps"]),
                                                 st.bed.sigma_min))),
           "chosen_factor": factor, "strength": info.get("strength"), "learning_rate": e2e.get("learning_rate"),
           "best_round": e2e.get("best_round"),
           "rounds": e2e.get("rounds"), "checks": tr.rows,
           "learned_sigmas": [round(float(s), 4) for s in cal.sampling_sigmas]}
    if sweep:
        K = bench.load_k_diffusion_sampling()
        key = f"{st.name} | {evals} evaluations"
        known = _load(sweep_cache).get(key) if sweep_cache else None
        best = None
        for label, again in bench.uncalibrated_samplers(st, evals, bench.schedules(st.bed), K):
            if known is not None:  # the sweep does not depend on the calibration noises: the one it chose
                if label == known["label"]:
                    best = (known["rmse"], label, again)
                continue
            e = rms(bench.per_noise_rmse(again(None), st.reference))
            if best is None or e < best[0]:
                best = (e, label, again)
        if known is None and sweep_cache:
            _store(sweep_cache, key, {"label": best[1], "rmse": best[0]})
        unit, reference = st.confirmation()
        fresh_cal = per_noise(sig, cal, unit, reference)
        fresh_unc = bench.per_noise_rmse(best[2](unit), reference)
        out.update({"best_uncalibrated": best[1], "best_uncalibrated_rmse": best[0],
                    "ratio": out["calibrated"] / best[0],
                    "fresh": {"calibrated": rms(fresh_cal), "uncalibrated": rms(fresh_unc),
                              "ratio_interval": bench.ratio_interval(fresh_cal, fresh_unc)}})
    return out


def show(out):
    print(json.dumps({k: v for k, v in out.items() if k != "checks"}, indent=1))
    print("spent  fit    held   z     acc   test")
    for r in out["checks"]:
        print(f"{r['spent']:6.0f} {r['fit_rmse']:.4f} {r['held_out_rmse']:.4f} {r['held_out_z']:5.2f} "
              f"{str(r['accepted']):5} {r['test_rmse']:.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setting", help="model:cfg, e.g. digits-eps:1")
    p.add_argument("--evals", type=int, default=6)
    p.add_argument("--noises", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="calibration noises' seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-sweep", action="store_true", help="skip the best uncalibrated sampler")
    p.add_argument("--out", default=None)
    p.add_argument("--set", nargs="*", default=[], help="calibrate() keyword overrides, key=value (Python literal); "
                   "budget_factor=F sets the end-to-end budget to F times what came before it")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    import ast
    model, cfg = args.setting.split(":")
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = trace(model, float(cfg), args.evals, args.noises, args.seed, overrides, sweep=not args.no_sweep)
    show(out)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
