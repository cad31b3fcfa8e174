"""benchmarks/heldout.py's report: HELDOUT.md and the gain section of BENCHMARKS.md from heldout.json's results.
Apart from the measuring, so that changing how results are written never reruns a job (heldout.py's fingerprint
covers the code it measures, not this file)."""
import datetime
import os

from calibrated_samplers.calibration.testbed.tiny import HELD_OUT

HERE = os.path.dirname(os.path.abspath(__file__))


def row(r):
    fresh = r["fresh"]
    ratio, lo, hi = fresh["ratio_interval"]
    held_out = "held out" if r["setting"].split(" cfg ")[0] in HELD_OUT else "tuning"
    return (f"| {r['setting']} ({held_out}) | {r['evals']} | {r['noises']} | {r['best_uncalibrated']} "
            f"{fresh['uncalibrated']:.4f} | {fresh['calibrated']:.4f} | **{ratio:.2f}x** [{lo:.2f}-{hi:.2f}] | "
            f"{r['plain_requested']:.4f} | {r['plain_raised_start']:.4f} (x{r['chosen_factor']:g}) | "
            f"{r['per_step_fit']:.4f} | {r['calibrated']:.4f} (round {r['best_round']}/{r['rounds']}) | "
            f"{r['teacher']:.4f} | {r['minutes']:.1f} |")


SECTION = "## Where the gain comes from (held-out models beside digits)"


def gain_section(results, source="heldout.json"):
    """BENCHMARKS.md's section on where each calibration's gain comes from: the share of the plain solver's error
    that the calibration removed which the raised end, the per-step fit and the end-to-end stage each removed (on
    the test noises), per model, evaluation count and calibration batch; from heldout.py's results."""
    lines = [SECTION, "", f"From `benchmarks/heldout.py` ({source}; [HELDOUT.md](HELDOUT.md) has the whole table and "
             "the command). iia_dpmpp_2m, default calibration; test RMSE on the 200 test noises of the plain solver "
             "on the requested schedule, then after each stage of the calibration, and each stage's share of the "
             "whole drop (a negative share: that stage made it worse). The last column is the headline: best "
             "calibrated / best uncalibrated (raised ends included) on 600 fresh noises, with its 95% interval.", "",
             "| model | cfg | evals | noises | plain | raised end | per-step fit | end to end | "
             "shares: raised / per-step / e2e | fresh ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        model, cfg = r["setting"].split(" cfg ")
        plain, raised, fit, end = r["plain_requested"], r["plain_raised_start"], r["per_step_fit"], r["calibrated"]
        drop = plain - end
        steps = ((plain, raised), (raised, fit), (fit, end))
        shares = " / ".join(f"{(a - b) / drop:.0%}".replace("-0%", "0%") for a, b in steps) if drop > 0 else "no gain"
        ratio, lo, hi = r["fresh"]["ratio_interval"]
        kind = "held out" if model in HELD_OUT else "tuning"
        lines.append(f"| {model} ({kind}) | {cfg} | {r['evals']} | {r['noises']} | {plain:.4f} | {raised:.4f} "
                     f"(x{r['chosen_factor']:g}) | {fit:.4f} | {end:.4f} (check {r['best_round']}/{r['rounds']}) | "
                     f"{shares} | {ratio:.2f}x [{lo:.2f}-{hi:.2f}] |")
    return lines


def write_gain_section(results, path=os.path.join(HERE, "BENCHMARKS.md")):
    """Put gain_section in BENCHMARKS.md, in place of the one there (before "Not in this run" if none)."""
    with open(path) as f:
        text = f.read().split("\n")
    section = gain_section(results)
    if SECTION in text:
        a = text.index(SECTION)
        b = next((i for i in range(a + 1, len(text)) if text[i].startswith("## ")), len(text))
        text[a:b] = section + [""]
    else:
        b = text.index("## Not in this run") if "## Not in this run" in text else len(text)
        text[b:b] = section + [""]
    with open(path, "w") as f:
        f.write("\n".join(text))


def write_tables(results, runs, out, benchmarks=False):
    """HELDOUT.md (and with ``benchmarks`` the gain section of BENCHMARKS.md) in ``out`` from ``results``; ``runs``
    says which commands produced them."""
    lines = [f"# The default calibration on held-out models ({datetime.date.today().isoformat()})", "", runs,
             "Protocol: PROTOCOL.md (held-out models measured with the defaults only).",
             "", "iia_dpmpp_2m, default calibration from the given number of noises (seed 0). **fresh**: best "
             "uncalibrated (chosen on the 200 test noises among run.py's sweep, raised ends included) and the "
             "calibration, endpoint RMSE on 600 fresh noises against the 100-step reference, their ratio and its "
             "95% paired bootstrap interval. **Where the gain comes from** (test noises): the plain solver on the "
             "requested Karras/shift-1 schedule, on the raised start the probe chose (factor), after the per-step fit, "
             "after the end-to-end stage (the check it kept / its checks); the teacher the fit matches, against the "
             "same reference.", "",
             "| setting | evals | noises | best uncalibrated (fresh) | calibrated (fresh) | ratio (fresh) | plain | "
             "raised start | per-step fit | end to end | teacher | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r) for r in results]
    with open(os.path.join(out, "HELDOUT.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if benchmarks:
        write_gain_section(results, os.path.join(out, "BENCHMARKS.md"))
    print("\n".join(lines))
