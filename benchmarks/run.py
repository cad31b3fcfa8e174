"""Side-by-side quality benchmark: built-in samplers vs this pack's, uncalibrated and calibrated, at equal
model evaluations, on the tiny learned digit models and the analytic Gaussian mixture.

    bash benchmarks/run.sh            # sets up .venv-bench and runs this; writes benchmarks/BENCHMARKS.md
    python benchmarks/run.py --quick  # a smaller run to check the plumbing

Per cell: endpoint RMSE against a high-accuracy reference from the same noise (Heun with 100 steps for the
learned models, the exact RK4 solution for the mixture); for the digit models a Frechet distance in the
digit classifier's feature space against scikit-learn's real digits and the class accuracy of the samples;
wall time per image as a ratio to the base solver in the same run. Calibrations are fitted on one set of
noises (seed 0) and measured on another (seeds from 1000). Set COMFYUI_PATH to a ComfyUI checkout to add
ComfyUI's own ipndm, ipndm_v, deis, uni_pc, res_multistep and gradient_estimation.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from calibrated_samplers.calibration import calibrate  # noqa: E402
from calibrated_samplers.calibration.testbed import testbed  # noqa: E402
from calibrated_samplers.samplers import SAMPLERS, steps_for_evaluations  # noqa: E402
from calibrated_samplers.calibration.testbed.kdiffusion import load_k_diffusion_sampling  # noqa: E402
from memory import proc_status, reset_peak  # noqa: E402  (benchmarks/memory.py, beside this script)

CALIBRATED = [n for n, f in SAMPLERS.items() if f.kind != "plain"]
# uncalibrated samplers of this pack that are not already a k-diffusion sampler (the rest reduce to one)
PACK_PLAIN = {"ipndm (pack)": ("iia_ipndm", {}), "spndm (pack)": ("iia_spndm", {}), "gddim (pack)": ("gddim", {})}
# k-diffusion samplers, each with this pack's sampler of the same evaluation count (for its schedule)
K_SAMPLERS = {"euler": "iia_ddim", "heun": "iia_edm", "dpm_2": "amed_dpm_2", "lms": "iia_ipndm",
              "dpmpp_2m": "iia_dpmpp_2m"}
COMFY_SAMPLERS = ["ipndm", "ipndm_v", "deis", "uni_pc", "res_multistep", "gradient_estimation"]


def load_comfy(path):
    """ComfyUI's own samplers from a checkout (k-diffusion convention), or {} with the reason printed."""
    if not path:
        return {}
    sys.path.insert(0, path)
    try:
        from comfy.k_diffusion import sampling as cs
        out = {n: getattr(cs, f"sample_{n}") for n in COMFY_SAMPLERS if hasattr(cs, f"sample_{n}")}
        try:
            from comfy.extra_samplers import uni_pc
            out["uni_pc"] = uni_pc.sample_unipc
        except Exception:  # noqa: BLE001
            pass
        return out
    except Exception as e:  # noqa: BLE001
        print(f"COMFYUI_PATH={path}: could not import ComfyUI's samplers ({e}); continuing without them")
        return {}


class Digits:
    """Real digits' classifier features, for the Frechet distance and class accuracy."""

    def __init__(self):
        from calibrated_samplers.calibration.testbed import tiny
        self.clf = tiny.load_classifier()
        real, _ = tiny.digits_data()
        self.mu, self.cov = self.stats(self.clf.features(real))

    @staticmethod
    def stats(f):
        f = f.double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    def frechet(self, x):
        mu, cov = self.stats(self.clf.features(x.float().clamp(-1, 1)))
        covmean = np.sqrt(np.clip(np.linalg.eigvals(cov @ self.cov).real, 0, None)).sum()
        return float(((mu - self.mu) ** 2).sum() + np.trace(cov) + np.trace(self.cov) - 2 * covmean)

    def accuracy(self, x, labels):
        return float((self.clf(x.float().clamp(-1, 1)).argmax(1) == labels).float().mean())


class Setting:
    def __init__(self, model_name, cfg, n_test, n_cal, ref_steps):
        self.bed = testbed(model_name)
        self.name = f"{model_name}" + (f" cfg {cfg:g}" if cfg is not None else "")
        self.cfg = cfg
        self.conditions = self.bed.conditions(cfg if cfg is not None else 1.0)
        self.n_test, self.n_cal, self.ref_steps = n_test, n_cal, ref_steps
        per = max(1, n_test // len(self.conditions))
        self.groups = [(c, slice(j * per, (j + 1) * per)) for j, c in enumerate(self.conditions)]
        self.labels = torch.cat([torch.full((per,), c.get("cond", -1)) for c in self.conditions])
        self.refs = {}

    def noise(self, sig, seed, n):
        return self.bed.noise(n, seed, sig)

    def sample(self, fn, sig, seed=1000, **kw):
        """Run ``fn`` per condition group on the test noises; returns (samples, seconds)."""
        x = self.noise(sig, seed, len(self.labels))
        out, t0 = [], time.perf_counter()
        for cond, sl in self.groups:
            out.append(fn(self.bed.model, x[sl], sig, extra_args=cond, disable=True, **kw))
        return torch.cat(out), time.perf_counter() - t0

    def reference(self, sig):
        end = float(sig[-1])
        if end not in self.refs:
            if self.bed.name.startswith("analytic"):
                from calibrated_samplers.calibration.testbed.analytic import GaussianMixture
                mix = GaussianMixture()
                x = self.noise(sig, 1000, len(self.labels)).double()
                fam = "flow" if self.bed.family == "flow" else "ve"
                parts = [mix.reference(x[sl], float(sig[0]), end, family=fam, cond=c.get("cond"),
                                       cfg=c.get("cfg", 1.0), steps_per_unit=100) for c, sl in self.groups]
                self.refs[end] = torch.cat(parts).float()
            else:
                fine = self.bed.sigmas(self.ref_steps, zero=end == 0)
                if end > 0:
                    fine[-1] = end
                fam = dict(family=self.bed.family, shift=self.bed.shift)
                self.refs[end] = self.sample(SAMPLERS["iia_edm"], fine, **fam)[0]
        return self.refs[end]


def rmse(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def run_setting(st, evals, cal_evals, K, comfy, digits, log):
    fam = dict(family=st.bed.family, shift=st.bed.shift)
    rows = {}  # sampler label -> {evaluations: metrics}
    cal_rows = []

    def record(label, n, x, seconds, sig, base_seconds=None):
        m = {"rmse": rmse(x, st.reference(sig)), "seconds_per_image": seconds / len(x)}
        if digits is not None:
            m["fd"] = digits.frechet(x)
            if st.cfg is not None:
                m["accuracy"] = digits.accuracy(x, st.labels)
        if base_seconds:
            m["time_ratio"] = seconds / base_seconds
        rows.setdefault(label, {})[n] = m
        log(f"  {st.name:18s} {label:24s} {n:2d} evals  rmse {m['rmse']:.4f}" +
            (f"  fd {m['fd']:.2f}" if "fd" in m else "") + (f"  acc {m['accuracy']:.2f}" if "accuracy" in m else ""))
        return m

    for n in evals:
        base_times = {}
        for name, twin in K_SAMPLERS.items():
            found = steps_for_evaluations(twin, n)
            if found is None:
                continue
            sig = st.bed.sigmas(*found)
            x, sec = st.sample(getattr(K, f"sample_{name}"), sig)
            record(f"{name} (k-diffusion)", n, x, sec, sig)
        for name, cfn in comfy.items():
            sig = st.bed.sigmas(n)
            try:
                x, sec = st.sample(cfn, sig)
                record(f"{name} (ComfyUI)", n, x, sec, sig)
            except Exception as e:  # noqa: BLE001
                log(f"  ComfyUI {name}: {e}")
        for label, (name, opts) in PACK_PLAIN.items():
            found = steps_for_evaluations(name, n)
            if found is None:
                continue
            sig = st.bed.sigmas(*found)
            x, sec = st.sample(SAMPLERS[name], sig, **fam, **opts)
            record(label, n, x, sec, sig)
        if n not in cal_evals:
            continue
        for name in CALIBRATED:
            found = steps_for_evaluations(name, n)
            if found is None:
                continue
            sig = st.bed.sigmas(*found)
            x, base_sec = st.sample(SAMPLERS[name], sig, **fam)
            base_times[name] = base_sec
            cal_noise = st.noise(sig, 0, st.n_cal)
            start_rss = reset_peak()
            t0 = time.perf_counter()
            cal = calibrate(st.bed.model, sig, name, cal_noise, st.conditions, chunk_size=64, **fam)
            cal_seconds = time.perf_counter() - t0
            peak = proc_status("VmHWM")
            peak_mib = (peak - start_rss) / 2 ** 20 if peak and start_rss else float("nan")
            x, sec = st.sample(SAMPLERS[name], sig, calibration=cal, **fam)
            m = record(f"{name} (calibrated)", n, x, sec, sig, base_seconds=base_sec)
            cal_rows.append({"sampler": name, "evaluations": n, "seconds": cal_seconds,
                             "evaluations_per_noise": cal.info["model_evaluations_per_sample"],
                             "strength": cal.info["strength"], "fallback_steps": int(cal.fallback.sum()),
                             "steps": cal.steps, "time_ratio": m["time_ratio"], "peak_mib": peak_mib})
    return rows, cal_rows


def best(rows, n, calibrated):
    cands = [(r[n]["rmse"], label) for label, r in rows.items()
             if n in r and label.endswith("(calibrated)") == calibrated]
    return min(cands) if cands else (float("nan"), None)


def headline(setting_name, rows, evals):
    out = []
    b_cal, l_cal = best(rows, 5, True)
    b_pl, l_pl = best(rows, 5, False)
    out.append(f"{setting_name}: at 5 evaluations best calibrated {l_cal} {b_cal:.4f} / best non-calibrated "
               f"{l_pl} {b_pl:.4f} = {b_cal / b_pl:.2f}x")
    target, _ = best(rows, 10, False)
    match = next((n for n in sorted(evals) if best(rows, n, True)[0] <= target), None)
    out.append(f"{setting_name}: best calibrated matches the best non-calibrated at 10 evaluations "
               f"({target:.4f}) from {match if match else 'no tested count (<= 10)'} evaluations")
    return out


def plot_setting(st_name, rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in sorted(rows.items()):
        ns = sorted(r)
        style = "-" if label.endswith("(calibrated)") else "--"
        ax.plot(ns, [r[n]["rmse"] for n in ns], style, marker="o", ms=3, label=label, lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model evaluations")
    ax.set_ylabel("endpoint RMSE vs reference")
    ax.set_title(st_name)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(st, path, evals=(4, 5, 6), pairs=(("dpmpp_2m", "iia_dpmpp_2m"), ("ipndm", "amed_ipndm"))):
    """Rows: built-in and calibrated at 4-6 evaluations, then the reference; the same 10 noises (one per class)."""
    from calibrated_samplers.calibration.testbed.tiny import save_grid
    fam = dict(family=st.bed.family, shift=st.bed.shift)
    K = load_k_diffusion_sampling()
    per = len(st.labels) // len(st.conditions)
    pick = torch.arange(len(st.conditions)) * per
    rows, names = [], []
    for n in evals:
        for builtin, cal_name in pairs:
            if builtin == "ipndm":
                found = steps_for_evaluations("iia_ipndm", n)
                sig = st.bed.sigmas(*found)
                x, _ = st.sample(SAMPLERS["iia_ipndm"], sig, **fam)
            else:
                sig = st.bed.sigmas(*steps_for_evaluations(K_SAMPLERS[builtin], n))
                x, _ = st.sample(getattr(K, f"sample_{builtin}"), sig)
            rows.append(x[pick])
            names.append(f"{builtin} {n}")
            sig = st.bed.sigmas(*steps_for_evaluations(cal_name, n))
            cal = calibrate(st.bed.model, sig, cal_name, st.noise(sig, 0, st.n_cal), st.conditions, chunk_size=64,
                            **fam)
            x, _ = st.sample(SAMPLERS[cal_name], sig, calibration=cal, **fam)
            rows.append(x[pick])
            names.append(f"{cal_name} {n} calibrated")
    rows.append(st.reference(st.bed.sigmas(10))[pick])
    names.append("reference")
    save_grid(rows, path)
    return names


def write_markdown(path, results, cal_rows, heads, command, machine, elapsed, grid_names):
    lines = ["# Benchmarks", "", f"Generated by `{command}` on {machine}, {datetime.date.today()}, "
             f"in {elapsed / 60:.1f} min. Regenerate with the same command; numbers move within noise only "
             "(fixed seeds; thread scheduling changes float rounding).", "",
             "Endpoint RMSE against a high-accuracy reference from the same noise, at equal model evaluations "
             "(a two-evaluation step counts twice). Calibrated samplers were fitted on noises with seed 0 and are "
             "measured on seeds from 1000. Lower is better; the best per column is in bold.", "", "## Headlines", ""]
    lines += [f"- {h}" for h in heads]
    for st_name, (rows, evals) in results.items():
        lines += ["", f"## {st_name}", "", f"![error vs evaluations]({st_name.replace(' ', '_')}.png)", ""]
        lines.append("| sampler | " + " | ".join(str(n) for n in evals) + " |")
        lines.append("|---|" + "---|" * len(evals))
        bests = {n: min((r[n]["rmse"] for r in rows.values() if n in r), default=None) for n in evals}
        for label in sorted(rows, key=lambda l: (l.endswith("(calibrated)"), l)):
            cells = []
            for n in evals:
                if n not in rows[label]:
                    cells.append("")
                    continue
                v = rows[label][n]["rmse"]
                cells.append(f"**{v:.4f}**" if v == bests[n] else f"{v:.4f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        some = next(iter(rows.values()))
        if any("fd" in m for m in some.values()):
            lines += ["", "Frechet distance in the digit classifier's feature space (real digits vs samples; the "
                      "reference solve's value is the floor at this sample size)" +
                      ("; class accuracy in parentheses" if any("accuracy" in m for m in some.values()) else ""),
                      "", "| sampler | " + " | ".join(str(n) for n in evals) + " |", "|---|" + "---|" * len(evals)]
            for label in sorted(rows, key=lambda l: (l.endswith("(calibrated)"), l)):
                cells = []
                for n in evals:
                    m = rows[label].get(n)
                    cells.append("" if m is None else f"{m['fd']:.2f}" +
                                 (f" ({m['accuracy']:.2f})" if "accuracy" in m else ""))
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Calibrations", "", "Wall time, model evaluations per calibration noise, chosen strength, steps "
              "that fell back, peak resident memory above the start of the calibration (process RSS; batch "
              "64 noises, chunk 64), and sampling wall time with the calibration as a ratio to the same sampler "
              "without it (one timing each, same run: noisy at this size; benchmarks/speed.py measures it "
              "properly).", "",
              "| setting | sampler | evals | seconds | evaluations per noise | strength | fell back | peak MiB | "
              "time ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    for st_name, rows in cal_rows.items():
        for r in rows:
            lines.append(f"| {st_name} | {r['sampler']} | {r['evaluations']} | {r['seconds']:.1f} | "
                         f"{r['evaluations_per_noise']:.0f} | {r['strength']} | {r['fallback_steps']}/{r['steps']} | "
                         f"{r['peak_mib']:.1f} | {r['time_ratio']:.2f} |")
    if grid_names:
        lines += ["", "## Image grid (digits-eps cfg 5)", "", "![grid](grid.png)", "",
                  "Rows, top to bottom: " + "; ".join(grid_names) + ". Columns: the same noise for classes 0-9."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run_one(job):
    """One setting, in its own process when --jobs > 1 (one thread each: small batches scale better so)."""
    model_name, cfg, evals, cal_evals, n_test, n_cal, threads, out = job
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    K = load_k_diffusion_sampling()
    comfy = load_comfy(os.environ.get("COMFYUI_PATH"))
    is_digits = model_name.startswith("digits")
    st = Setting(model_name, cfg, n_test if is_digits else 128, n_cal, 100)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    t0 = time.perf_counter()
    rows, crows = run_setting(st, evals, cal_evals, K, comfy, Digits() if is_digits else None, log)
    plot_setting(st.name, rows, os.path.join(out, f"{st.name.replace(' ', '_')}.png"))
    grid_names = None
    if model_name == "digits-eps" and cfg == 5.0:
        grid_names = image_grid(st, os.path.join(out, "grid.png"))
    log(f"{st.name}: {(time.perf_counter() - t0) / 60:.1f} min")
    return st.name, rows, crows, grid_names


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer counts and noises, to check the plumbing")
    p.add_argument("--jobs", type=int, default=2, help="settings run in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=HERE)
    p.add_argument("--only", nargs="+", help="settings to run, e.g. 'digits-eps:5' 'analytic-edm:1'")
    args = p.parse_args()
    started = time.perf_counter()
    evals = [3, 4, 5, 6, 8, 10, 15, 20] if not args.quick else [4, 5, 10]
    cal_evals = [3, 4, 5, 6, 8, 10] if not args.quick else [5, 10]
    n_test, n_cal = (60, 64) if not args.quick else (20, 40)
    # heaviest first, so two workers finish together
    settings = [("digits-eps", 5.0), ("digits-eps", 1.0), ("digits-flow", 1.0), ("analytic-edm", 1.0)]
    if args.only:
        settings = [(s.split(":")[0], float(s.split(":")[1])) for s in args.only]
    jobs = [(m, c, evals, cal_evals, n_test, n_cal, args.threads, args.out) for m, c in settings]
    if args.jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.map(run_one, jobs, chunksize=1)
    else:
        done = [run_one(j) for j in jobs]
    order = {f"{m}" + f" cfg {c:g}": k for k, (m, c) in enumerate(
        [("digits-eps", 1.0), ("digits-eps", 5.0), ("digits-flow", 1.0), ("analytic-edm", 1.0)])}
    done.sort(key=lambda d: order.get(d[0], 99))
    results, cal_rows, heads, grid_names = {}, {}, [], None
    for name, rows, crows, names in done:
        results[name] = (rows, evals)
        cal_rows[name] = crows
        heads += headline(name, rows, cal_evals)
        grid_names = grid_names or names
    for h in heads:
        print(h)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{args.jobs} processes x {args.threads} thread(s)"
    command = "bash benchmarks/run.sh" + (" --quick" if args.quick else "")
    write_markdown(os.path.join(args.out, "BENCHMARKS.md"), results, cal_rows, heads, command, machine,
                   time.perf_counter() - started, grid_names)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"results": {k: v[0] for k, v in results.items()}, "calibrations": cal_rows, "headlines": heads},
                  f, indent=1, default=str)
    print(f"wrote {os.path.join(args.out, 'BENCHMARKS.md')} in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
