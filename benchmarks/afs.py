"""The analytic first step (AFS) on the default calibration, side by side with it and with every uncalibrated sampler.

With ``afs`` the first step answers the model's first call analytically (samplers.iia.AnalyticFirst), so at the same
evaluation count the solver has one step more. Per setting and evaluation count, in one run: every uncalibrated
sampler on every fixed schedule of BENCHMARKS.md (the best is picked on the test noises), the default calibration
of iia_dpmpp_2m, and the same calibration with ``afs=True`` (one step more for the same evaluations); endpoint RMSE
on BENCHMARKS.md's 200 test noises against the same 100-step reference, then the pair AFS / best uncalibrated on
the 600 fresh noises. Writes benchmarks/AFS.md and benchmarks/afs.json.

    .venv-bench/bin/python benchmarks/afs.py [--workers 2]
"""
import datetime
import json
import os
import platform
import sys
import time

import torch

from jobs import Results, job_command_line, run_jobs

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLER = "iia_dpmpp_2m"
CELLS = [("digits-eps", 1.0, n) for n in (4, 5, 6, 8, 10)] + [
    (m, c, n) for m, c in (("digits-eps", 5.0), ("digits-flow", 1.0), ("digits-eps-narrow", 1.0)) for n in (5, 6)]
VARIANTS = {"default": {}, "afs": {"afs": True}}


def partial_folder():
    """Where the references and each finished job are kept (git-ignored), under the code's fingerprint: a run cut
    short goes on with the jobs it has not done."""
    import run as bench
    return os.path.join(HERE, "partial", "afs-" + bench.fingerprint())


def job(model_name, cfg, n, variant):
    """One calibration (``variant``) at one cell; the "afs" job also measures every uncalibrated sampler there."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    import run as bench
    from calibrated_samplers.calibration.testbed.kdiffusion import load_k_diffusion_sampling
    from calibrated_samplers.samplers import SAMPLERS, steps_for_evaluations
    bench.Setting.cache = partial_folder()
    st = bench.Setting(model_name, cfg, 200, 256)
    unit, fresh_reference = st.confirmation()
    scheds = bench.schedules(st.bed)
    out = {"setting": st.name, "evals": n, "variant": variant}
    if variant == "afs":
        K = load_k_diffusion_sampling()
        best = None
        for label, again in bench.uncalibrated_samplers(st, n, scheds, K):
            e = bench.per_noise_rmse(again(None), st.reference)
            r = float(e.pow(2).mean().sqrt())
            if best is None or r < best[0]:
                best = (r, label, e, again)
        out["uncalibrated"] = {"label": best[1], "test": best[2].tolist(),
                               "fresh": bench.per_noise_rmse(best[3](unit), fresh_reference).tolist()}
    opts = VARIANTS[variant]
    sig = next(iter(scheds.values()))(*steps_for_evaluations(SAMPLER, n, **opts))
    t0 = time.perf_counter()
    cal = st.calibrate(sig, SAMPLER, **opts)
    out["seconds"] = time.perf_counter() - t0
    fn = SAMPLERS[SAMPLER]
    out["steps"], out["model_evaluations"] = len(sig) - 1, fn.evaluations(sig, **opts)
    out["sigmas"] = cal.sampling_sigmas.tolist()
    out["test"] = bench.per_noise_rmse(st.sample(fn, sig, calibration=cal, **st.fam), st.reference).tolist()
    out["fresh"] = bench.per_noise_rmse(st.sample(fn, sig, unit, calibration=cal, **st.fam), fresh_reference).tolist()
    return out


def main():
    args = job_command_line(job)
    started = time.perf_counter()
    # the longest first, so the two workers end together
    specs = sorted([(m, c, n, v) for m, c, n in CELLS for v in VARIANTS],
                   key=lambda s: -(s[2] * (2 if s[1] != 1 else 1) + (1 if s[3] == "afs" else 0)))
    store = Results(os.path.join(partial_folder(), "jobs"))  # the folder is the code's fingerprint

    def name(spec):
        return "_".join(map(str, spec))

    results, todo = {}, []
    for spec in specs:
        r = store.load(name(spec))
        if r is None:
            todo.append(spec)
        else:
            results[(r["setting"], r["evals"], r["variant"])] = r
    print(f"{len(specs) - len(todo)} of {len(specs)} jobs done earlier under this code", flush=True)
    for r in run_jobs(__file__, todo, args.workers):
        results[(r["setting"], r["evals"], r["variant"])] = r
        spec = next(s for s in todo if (f"{s[0]} cfg {s[1]:g}", s[2], s[3]) == (r["setting"], r["evals"], r["variant"]))
        store.save(name(spec), r)
        print(r["setting"], r["evals"], r["variant"], f"{r['seconds']:.0f} s", flush=True)
    from run import ratio_interval

    def rms(errors):
        return float(torch.tensor(errors, dtype=torch.float64).pow(2).mean().sqrt())

    def med(errors):
        return float(torch.tensor(errors, dtype=torch.float64).median())

    def interval(a, b):
        r, lo, hi = ratio_interval(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        return f"{r:.2f}x ({lo:.2f}-{hi:.2f})"

    summary = []
    lines = [f"# The analytic first step on the default calibration ({datetime.date.today().isoformat()})", "",
             f"`.venv-bench/bin/python benchmarks/afs.py` ({(time.perf_counter() - started) / 60:.1f} min, "
             f"{args.workers} process(es) of one thread, {platform.platform()}, torch {torch.__version__}).", "",
             "Endpoint RMSE at equal model evaluations on BENCHMARKS.md's 200 test noises against its 100-step "
             "reference; every row in this one run. Best uncalibrated: the best of BENCHMARKS.md's 8 samplers on "
             "every fixed schedule it tries (raised last sigmas included), picked on the test noises. Calibrated: "
             f"`{SAMPLER}`, the default calibration (256 noises, seed 0), on Karras (t uniform for the flow model) "
             "with as many steps as the evaluations allow: n steps without AFS, n + 1 with it (its first step calls "
             "no model). Fresh: the same samplers on the 600 fresh noises (seeds from 2000). In brackets: 95% paired "
             "bootstrap interval.", "",
             "| setting | evals | best uncalibrated | default calibrated | with AFS | AFS / best uncalibrated "
             "(test) | same pair, fresh noises | AFS / default (test) | median per noise, AFS / best "
             "uncalibrated |", "|---|---|---|---|---|---|---|---|---|"]
    for m, c, n in CELLS:
        name = f"{m} cfg {c:g}"
        a, d = results[(name, n, "afs")], results[(name, n, "default")]
        u = a["uncalibrated"]
        row = {"setting": name, "evals": n, "uncalibrated": u["label"], "uncalibrated_rmse": rms(u["test"]),
               "default_rmse": rms(d["test"]), "afs_rmse": rms(a["test"]), "afs_fresh_rmse": rms(a["fresh"]),
               "uncalibrated_fresh_rmse": rms(u["fresh"]), "default_fresh_rmse": rms(d["fresh"]),
               "afs_sigmas": a["sigmas"], "default_sigmas": d["sigmas"],
               "seconds": {"afs": a["seconds"], "default": d["seconds"]},
               "model_evaluations": {"afs": a["model_evaluations"], "default": d["model_evaluations"]}}
        summary.append(row)
        assert a["model_evaluations"] == d["model_evaluations"] == n
        lines.append(f"| {name} | {n} | {row['uncalibrated_rmse']:.4f} ({u['label']}) | {row['default_rmse']:.4f} | "
                     f"{row['afs_rmse']:.4f} | {interval(a['test'], u['test'])} | {interval(a['fresh'], u['fresh'])} | "
                     f"{interval(a['test'], d['test'])} | {med(a['test']) / med(u['test']):.2f}x |")
    lines += ["", "Learned sigmas (the file samples on them) and calibration seconds (one CPU thread):", "",
              "| setting | evals | default | with AFS |", "|---|---|---|---|"]
    for row in summary:
        fmt = lambda s: ", ".join(f"{v:.3g}" for v in s)  # noqa: E731
        lines.append(f"| {row['setting']} | {row['evals']} | {fmt(row['default_sigmas'])} "
                     f"({row['seconds']['default']:.0f} s) | {fmt(row['afs_sigmas'])} ({row['seconds']['afs']:.0f} s) |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "AFS.md"), "w") as f:
        f.write(text)
    with open(os.path.join(HERE, "afs.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
