"""benchmarks/run.py's report: BENCHMARKS.md, results.json, the per-setting plots and the cost curve, from the jobs'
results. Apart from the measuring, so that changing how results are written never reruns a job (run.py's
fingerprint covers run.py and the code it measures, not this file)."""
import datetime
import json
import os
import platform
import time

import torch

from calibrated_samplers.calibration.engine import BUDGET_FACTOR
from suite import CALIBRATED, CONFIRM_FACTOR, best

HERE = os.path.dirname(os.path.abspath(__file__))


def write(done, settings, args, started, reused, jobs, code):
    """Gather the jobs' results per setting and write the report in ``args.out``."""
    results, cal_rows, curves, heads, grid_names, references, confirmations = {}, {}, [], [], None, {}, {}
    for r in done:
        if r["kind"] == "grid":
            grid_names = r["grid_names"]
        elif r["kind"] == "curve":
            curves.append(r["curve"])
    order = [f"{m} cfg {c:g}" for m, c in settings]
    for name in order:
        cells = sorted((r for r in done if r["kind"] == "cells" and r["setting"] == name),
                       key=lambda r: r["evaluations"])
        rows, kinds = {}, {}
        for r in cells:
            for label, per_n in r["rows"].items():
                rows.setdefault(label, {}).update(per_n)
            kinds.update(r["kinds"])
        results[name] = (rows, kinds)
        confirmations[name] = {r["evaluations"]: r["headline"][r["evaluations"]] for r in cells}
        references[name] = next((r["reference"] for r in cells), None)
        cal_rows[name] = [row for r in cells for row in r["cal_rows"]]
        evals = [r["evaluations"] for r in cells]
        plot_setting(name, rows, kinds, evals, os.path.join(args.out, f"{name.replace(' ', '_')}.png"))
        for n in evals:
            c, lc = best(rows, kinds, n, "calibrated")
            u, lu = best(rows, kinds, n, "uncalibrated")
            pe, lp = best(rows, kinds, n, "peer")
            us, lus = best(rows, kinds, n, "uncalibrated", standard=True)
            if n in (5, 6) or args.evals:
                h = confirmations[name][n]
                heads.append(f"{name}, {n} evaluations: best calibrated {lc} {c:.4f} / best uncalibrated {lu} "
                             f"{u:.4f} = {c / u:.2f}x (95% interval {h['test'][1]:.2f}-{h['test'][2]:.2f}x; on "
                             f"{h['noises'][1]} fresh noises {h['confirmation'][0]:.2f}x, {h['confirmation'][1]:.2f}-"
                             f"{h['confirmation'][2]:.2f}x); best peer {lp} {pe:.4f} ({c / pe:.2f}x); best "
                             f"uncalibrated on a schedule ending at the model's sigma_min: {lus} {us:.4f} "
                             f"({c / us:.2f}x)")
    if args.curve_from:
        with open(args.curve_from) as f:
            curves = json.load(f)["curves"]
        for c in curves:
            c["carried_from"] = args.curve_from
    if curves:
        plot_curves(curves, os.path.join(args.out, "cost_curve.png"))
    for h in heads:
        print(h)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{args.jobs} processes x {args.threads} thread(s)"
    command = "bash benchmarks/run.sh" + (" --quick" if args.quick else "") + (" --no-curve" if args.no_curve else "") \
        + (" --no-grid" if args.no_grid else "") + (" --only " + " ".join(args.only) if args.only else "") \
        + (" --evals " + " ".join(map(str, args.evals)) if args.evals else "") \
        + (f" --out {os.path.relpath(args.out)}" if os.path.abspath(args.out) != HERE else "") \
        + (f" --curve-from {os.path.relpath(args.curve_from)}" if args.curve_from else "") \
        + (" --resume" if args.resume else "")
    took = f"in {(time.perf_counter() - started) / 60:.1f} min"
    if reused:
        took += (f" (plus {sum(r.get('minutes', 0) for r in reused):.0f} min of {len(reused)} of its "
                 f"{len(reused) + len(jobs)} jobs, finished by earlier runs of the same code, fingerprint {code})")
    all_evals = sorted({n for rows, _ in results.values() for r in rows.values() for n in r})
    write_markdown(os.path.join(args.out, "BENCHMARKS.md"), results, cal_rows, curves, heads, command, machine,
                   took, grid_names, all_evals, references, confirmations, counts_chosen=bool(args.evals))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"results": {k: v[0] for k, v in results.items()}, "kinds": {k: v[1] for k, v in results.items()},
                   "calibrations": cal_rows, "curves": curves, "headlines": heads, "references": references,
                   "confirmations": confirmations},
                  f, indent=1, default=str)
    print(f"wrote {os.path.join(args.out, 'BENCHMARKS.md')} in {(time.perf_counter() - started) / 60:.1f} min")


def plot_setting(st_name, rows, kinds, evals, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    best_uncal = [best(rows, kinds, n, "uncalibrated")[0] for n in evals]
    ax.plot(evals, best_uncal, "k--", marker="o", ms=3, lw=1.5, label="best uncalibrated (any schedule)")
    for label, r in sorted(rows.items()):
        if kinds[label] == "uncalibrated":
            continue
        ns = [n for n in evals if n in r]
        style = "-" if kinds[label] == "calibrated" else ":"
        ax.plot(ns, [r[n]["rmse"] for n in ns], style, marker="o", ms=3, label=label, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("model evaluations")
    ax.set_ylabel("endpoint RMSE vs reference (held-out noises)")
    ax.set_title(st_name)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c in curves:
        xs = [1 + p["factor"] for p in c["points"]]
        ax.plot(xs, [p["test_rmse"] for p in c["points"]], marker="o", ms=3,
                label=f"{c['setting']}, {c['evaluations']} evals: test noises vs reference")
        ax.plot(xs, [p["held_out"] for p in c["points"]], ls=":", marker="o", ms=2,
                label=f"{c['setting']}, {c['evaluations']} evals: held-out vs teacher")
    ax.axvline(1 + BUDGET_FACTOR, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("calibration cost / the per-step fit's (1 = per-step fit only)")
    ax.set_ylabel("endpoint RMSE")
    ax.set_title("iia_dpmpp_2m: error against end-to-end budget (default dotted)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path, results, cal_rows, curves, heads, command, machine, took, grid_names, all_evals,
                   references=None, confirmations=None, counts_chosen=False):
    references = references or {}
    evals = all_evals
    lines = ["# Benchmarks", "", f"Generated by `{command}` on {machine}, {datetime.date.today()}, "
             f"{took}. Regenerate with the same command; numbers move within noise only "
             "(fixed seeds; thread scheduling changes float rounding).", "",
             "Endpoint RMSE against a 100-step Heun reference from the same noise, at equal model evaluations (a "
             "two-evaluation step counts twice), on 200 test noises that nothing was fitted on. Fitted methods (the "
             "GITS-style and LD3-style schedules and the pack's calibrations) used the same 256 calibration noises "
             "and the same teacher. Lower is better; the best per column is in bold. 'Best uncalibrated' is the best "
             "of 8 samplers on every fixed schedule tried, including schedules that end at a raised last sigma (0.1, "
             "0.2, 0.4 for the eps models; t 0.3, 0.4 for the flow model), which help every uncalibrated sampler at "
             "few steps; the tables list each sampler's best.", "", "## Headlines", ""]
    lines += [f"- {h}" for h in heads]
    lines += ["", "| setting | " + " | ".join(f"{n} evals" for n in evals) + " |", "|---|" + "---|" * len(evals)]
    for st_name, (rows, kinds) in results.items():
        cells = []
        for n in evals:
            c, _ = best(rows, kinds, n, "calibrated")
            u, _ = best(rows, kinds, n, "uncalibrated")
            p, _ = best(rows, kinds, n, "peer")
            us, _ = best(rows, kinds, n, "uncalibrated", standard=True)
            cells.append("" if c != c else f"{c / u:.2f}x / {c / p:.2f}x ({c / us:.2f}x)")
        lines.append(f"| {st_name} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: best calibrated / best uncalibrated, and best calibrated / best peer (GITS-style or "
              "LD3-style schedule on DPM-Solver++(2M) or iPNDM), endpoint RMSE; in parentheses, best calibrated / best "
              "uncalibrated on a schedule ending at the model's own sigma_min (the comparison of earlier runs)."]
    lines += ["", "How sure the first ratio is: its 95% paired bootstrap interval over the test noises, then the same "
              f"two samplers (the best calibrated and the best uncalibrated the test noises picked) on {CONFIRM_FACTOR}x "
              "as many fresh noises (seeds from 2000), with that ratio's interval:", "",
              "| setting | " + " | ".join(f"{n} evals" for n in evals) + " |", "|---|" + "---|" * len(evals)]
    for st_name in results:
        cells = []
        for n in evals:
            h = (confirmations or {}).get(st_name, {}).get(n)
            cells.append("" if h is None else f"{h['test'][0]:.2f}x ({h['test'][1]:.2f}-{h['test'][2]:.2f}); fresh "
                         f"{h['confirmation'][0]:.2f}x ({h['confirmation'][1]:.2f}-{h['confirmation'][2]:.2f})")
        lines.append(f"| {st_name} | " + " | ".join(cells) + " |")
    lines += ["", "The RMSE is the root of the mean squared error over the test noises, so the few noises whose few-step "
              "trajectory ends near another digit than the reference's carry much of it. The typical noise: the "
              "median over the test noises of each noise's own endpoint RMSE, best calibrated / best uncalibrated "
              "(each the best by this median):", "",
              "| setting | " + " | ".join(f"{n} evals" for n in evals) + " |", "|---|" + "---|" * len(evals)]
    for st_name, (rows, kinds) in results.items():
        cells = []
        for n in evals:
            c, _ = best(rows, kinds, n, "calibrated", metric="median")
            u, _ = best(rows, kinds, n, "uncalibrated", metric="median")
            cells.append("" if c != c else f"{c:.4f} / {u:.4f} = {c / u:.2f}x")
        lines.append(f"| {st_name} | " + " | ".join(cells) + " |")
    for st_name, (rows, kinds) in results.items():
        evals = [n for n in all_evals if any(n in r for r in rows.values())]
        lines += ["", f"## {st_name}", "", f"![error vs evaluations]({st_name.replace(' ', '_')}.png)", ""]
        lines.append("| sampler | " + " | ".join(str(n) for n in evals) + " |")
        lines.append("|---|" + "---|" * len(evals))
        bests = {n: min((r[n]["rmse"] for r in rows.values() if n in r), default=None) for n in evals}
        order = {"uncalibrated": 0, "peer": 1, "calibrated": 2}
        shown = [lab for lab in rows if kinds[lab] != "uncalibrated"]
        # uncalibrated: each sampler's best schedule per count, and dpmpp_2m on Karras for reference
        for n in evals:
            for standard in (False, True):
                b, lab = best(rows, kinds, n, "uncalibrated", standard)
                if lab is not None and lab not in shown:
                    shown.append(lab)
        for lab in ("dpmpp_2m (karras)", "dpmpp_2m (shift 1)"):
            if lab in rows and lab not in shown:
                shown.append(lab)
        for label in sorted(shown, key=lambda l: (order[kinds[l]], l)):
            cells = []
            for n in evals:
                if n not in rows[label]:
                    cells.append("")
                    continue
                v = rows[label][n]["rmse"]
                cells.append(f"**{v:.4f}**" if v == bests[n] else f"{v:.4f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Best uncalibrated per count: " + "; ".join(
            f"{n}: {best(rows, kinds, n, 'uncalibrated')[1]} {best(rows, kinds, n, 'uncalibrated')[0]:.4f}"
            for n in evals) + ".", "",
            "Frechet distance in the digit classifier's features, to the real digits / to the reference's own "
            "samples from the same noises (class accuracy in parentheses). The reference itself: "
            + (f"{references[st_name]['fd']:.2f} to the real digits ({references[st_name]['accuracy']:.2f})"
               if references.get(st_name) else "not recorded") + ". Closer to the reference is what the endpoint "
            "error measures; closer to the real digits can differ where the 100-step solve itself is far from them "
            "(strong guidance).", "",
            "| sampler | " + " | ".join(str(n) for n in evals) + " |", "|---|" + "---|" * len(evals)]
        for label in sorted(shown, key=lambda l: (order[kinds[l]], l)):
            cells = [("" if n not in rows[label] else f"{rows[label][n]['fd']:.2f} / "
                      f"{rows[label][n].get('fd_reference', float('nan')):.2f} ({rows[label][n]['accuracy']:.2f})")
                     for n in evals]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Calibration cost", "", "Per calibration (256 noises, chunk 64, one CPU thread): wall time, model "
              "evaluations per noise of the per-step fit (teacher included) and of the end-to-end stage (a backward "
              "pass counts as two evaluations, the checkpointed recomputation as one), the held-out RMSE against the "
              "teacher before and after the end-to-end stage, whether the time steps moved, and the peak resident "
              "memory above the start (process RSS; 0 where the allocator reused memory that earlier work in the same "
              "process had freed: `python benchmarks/memory.py` measures each batch size in a fresh process).", "",
              "| setting | sampler | evals | seconds | per-step fit | end to end | held-out | learned sigmas | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for st_name, rows in cal_rows.items():
        for r in rows:
            held = r["held_out"]
            held_txt = "" if held[0] is None else f"{held[0]:.4f} -> {held[1]:.4f}"
            lines.append(f"| {st_name} | {r['sampler']} | {r['evaluations']} | {r['seconds']:.0f} | "
                         f"{r['sequential_evaluations']:.0f} | {r['end_to_end_evaluations']:.0f} | {held_txt} | "
                         f"{'yes' if r['learned_sigmas'] else 'no'} | {r['peak_mib']:.0f} |")
    if curves:
        lines += ["", "## Gain per evaluation spent", "", "![cost curve](cost_curve.png)", ""]
        if any(c.get("carried_from") for c in curves):
            lines += ["Not rerun here: carried over from an earlier run's results (`--curve-from "
                      f"{os.path.relpath(curves[0]['carried_from'])}`, the git history of this file has that run).", ""]
        lines += ["iia_dpmpp_2m calibrated once per end-to-end budget (0: the per-step fit the stage starts from; "
                  f"the default is {BUDGET_FACTOR:g}x the per-step fit's evaluations), each run with its own cosine "
                  "decay; test RMSE on the 200 test noises against the reference, and the held-out RMSE against the "
                  "teacher on the calibration's own 64 held-out noises:", "",
                  "| setting | budget | evaluations per noise | test RMSE | held-out RMSE | seconds |",
                  "|---|---|---|---|---|---|"]
        for c in curves:
            for p in c["points"]:
                lines.append(f"| {c['setting']}, {c['evaluations']} evals | {p['factor']:g}x | "
                             f"{p['evaluations']:.0f} | {p['test_rmse']:.4f} | {p['held_out']:.4f} | "
                             f"{p['seconds']:.0f} |")
        for c in curves:
            lines += ["", f"{c['setting']}, {c['evaluations']} evaluations: the default budget reaches "
                      f"{c['default_share']:.0%} of the gain (test RMSE) of the largest budget tried "
                      f"({c['points'][-1]['factor']:g}x); 80% of that gain is reached at a budget of "
                      f"{c['reach80']:g}x, i.e. {1 + c['reach80']:g}x the per-step fit's evaluations in all."]
    else:
        lines += ["", "## Gain per evaluation spent", "", "Not measured in this run (`--no-curve`); see the git history "
                  "of this file for the last one."]
    if grid_names:
        lines += ["", "## Image grid (digits-eps cfg 5)", "", "![grid](grid.png)", "",
                  "Rows, top to bottom: " + "; ".join(grid_names) + ". Columns: the same noise for classes 0-9."]
    held = os.path.join(os.path.dirname(path), "heldout.json")
    if os.path.exists(held):  # heldout.py's own run, kept in the regenerated file
        import heldout_report
        with open(held) as f:
            lines += [""] + heldout_report.gain_section(json.load(f))
    lines += ["", "## Not in this run", "",
              f"- Calibrated samplers other than {', '.join(CALIBRATED)}: each costs as much again; earlier runs "
              "(git history of this file) had all twelve with the per-step fit only.",
              ("- Evaluation counts other than " + ", ".join(map(str, all_evals)) + " (`--evals` chose them)."
               if counts_chosen else
               "- Evaluation counts 4, 8 and 10 on the settings other than digits-eps cfg 1 (time: the whole run is "
               "sized for about two and a half hours on two CPU cores; `--evals` measures them on their own)."),
              "- A PAS-style (PCA-basis) peer: `benchmarks/pas.py` measures it on these cells, beside this run's "
              "results.json ([PAS.md](PAS.md)).",
              "- GPU wall time and memory: no GPU was lent to the session that made this file. "
              "`python benchmarks/memory.py` measures the CPU peak memory against the batch size."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# the evaluation counts each setting is measured at: the full range on the first, the targets' 5 and 6 on the
# others (the whole benchmark must fit in about two and a half hours on two CPU cores)
