"""Side-by-side benchmark: uncalibrated samplers on several fixed schedules, the schedule-learning peers (GITS-style,
LD3-style) and this pack's calibrated samplers, at equal model evaluations, on the tiny learned digit models.

    bash benchmarks/run.sh             # sets up .venv-bench and runs this; writes benchmarks/BENCHMARKS.md
    python benchmarks/run.py --quick   # a smaller run to check the plumbing

Per cell: endpoint RMSE against a 100-step Heun reference from the same noise (200 test noises, seeds from 1000,
20 per class), the Frechet distance in the digit classifier's features and the class accuracy. Everything that
is fitted (GITS's dynamic programme, LD3's time steps, the pack's calibrations) sees the same 256 calibration
noises (seed 0) and never a test noise. "Best uncalibrated" is the best of k-diffusion's euler, heun, dpm_2, lms
and dpmpp_2m and the pack's ipndm, spndm and gddim, each on every fixed schedule tried (Karras with rho 3, 5, 7
and 10 and log-uniform sigmas for the eps models, and Karras rho 7 and 5 ending at a raised last sigma of 0.1, 0.2
or 0.4 instead of the model's sigma_min; t uniform with shift 1, 2 and 3, t uniform down to a raised last t of 0.3
or 0.4, and Karras for the flow model).
digits-eps-narrow is digits-eps at another width and seed. shapes-eps and textures-flow are the held-out testbed of
other data (benchmarks/PROTOCOL.md): no setting of the calibration was chosen on them; they are only measured, and
have no Frechet distance or class accuracy (the digit classifier knows digits only).
"""
import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from calibrated_samplers.calibration import calibrate  # noqa: E402
from calibrated_samplers.calibration.engine import BUDGET_FACTOR  # noqa: E402
from calibrated_samplers.calibration.testbed import testbed  # noqa: E402
from calibrated_samplers.calibration.testbed.analytic import flow_sigmas, karras, rmse  # noqa: E402
from calibrated_samplers.calibration.testbed.kdiffusion import load_k_diffusion_sampling  # noqa: E402
from calibrated_samplers.samplers import SAMPLERS, steps_for_evaluations  # noqa: E402
from jobs import Results, code_fingerprint  # noqa: E402  (benchmarks/jobs.py)
from memory import proc_status, reset_peak  # noqa: E402  (benchmarks/memory.py)
from peers import gits_schedule  # noqa: E402  (benchmarks/peers.py)
from suite import CALIBRATED, CALIBRATED_AS, CONFIRM_FACTOR, best  # noqa: E402  (benchmarks/suite.py)

# uncalibrated: label -> (callable maker, the pack sampler with the same evaluation count per schedule)
K_SAMPLERS = {"euler": "iia_ddim", "heun": "iia_edm", "dpm_2": "amed_dpm_2", "lms": "iia_ipndm",
              "dpmpp_2m": "iia_dpmpp_2m"}
PACK_PLAIN = {"ipndm": "iia_ipndm", "spndm": "iia_spndm", "gddim": "gddim"}
# the default pick, and it with the analytic first step (benchmarks/afs.py: better on some models, worse on others);
# the other calibrated samplers cost the same again each (earlier runs: no better)
PEER_SOLVERS = {"dpmpp_2m": "iia_dpmpp_2m", "ipndm": "iia_ipndm"}  # plain solver -> the pack sampler that is it
SETTINGS = [("digits-eps", 1.0), ("digits-eps", 5.0), ("digits-flow", 1.0), ("digits-eps-narrow", 1.0),
            ("shapes-eps", 1.0), ("shapes-eps", 5.0), ("textures-flow", 1.0)]


# Raised last positive sigmas: at few steps, ending the schedule well above the model's sigma_min (ComfyUI's
# KarrasScheduler node takes it as an input) helps every uncalibrated sampler a lot, so they are tried too, and the
# calibration's learned last sigma is compared against them.
RAISED_LAST = {"eps": (0.1, 0.2, 0.4), "flow": (0.3, 0.4)}


def schedules(bed):
    """name -> f(steps, zero) for every fixed schedule tried with this model's family."""
    if bed.family == "flow":
        def shifted(shift):
            def make(steps, zero):
                sig = flow_sigmas(steps, shift=shift)
                return sig if zero else torch.cat([sig[:-1], sig.new_tensor([bed.sigma_min])])
            return make
        out = {f"shift {s:g}": shifted(s) for s in (1.0, 2.0, 3.0)}
        out["karras"] = lambda steps, zero: karras(steps if zero else steps + 1, 0.002, 1.0, zero=zero)
        for last in RAISED_LAST["flow"]:  # t linear from 1 to a raised last positive t, then 0
            out[f"shift 1 (last {last:g})"] = lambda steps, zero, last=last: (
                torch.cat([torch.linspace(1, last, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
                if zero and steps > 1 else None)
        return out

    def karras_rho(rho, lowest=None):
        def make(steps, zero):
            if lowest is not None and not zero:  # a schedule ending at a raised sigma would leave visible noise
                return None
            return karras(steps if zero else steps + 1, lowest or bed.sigma_min, bed.sigma_max, rho, zero)
        return make
    out = {("karras" if rho == 7 else f"karras rho {rho}"): karras_rho(rho) for rho in (7, 3, 5, 10)}
    out["log-uniform"] = karras_rho(1e6)
    for rho in (7, 5):
        for last in RAISED_LAST["eps"]:
            out[f"karras{'' if rho == 7 else f' rho {rho}'} (last {last:g})"] = karras_rho(rho, last)
    return out


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

    def features(self, x):
        return self.stats(self.clf.features(x.float().clamp(-1, 1)))

    def frechet(self, x, against=None):
        """Frechet distance of samples ``x`` to the real digits, or to ``against`` (another sample set's
        ``features``)."""
        mu, cov = self.features(x)
        mu_b, cov_b = against or (self.mu, self.cov)
        covmean = np.sqrt(np.clip(np.linalg.eigvals(cov @ cov_b).real, 0, None)).sum()
        return float(((mu - mu_b) ** 2).sum() + np.trace(cov) + np.trace(cov_b) - 2 * covmean)

    def accuracy(self, x, labels):
        return float((self.clf(x.float().clamp(-1, 1)).argmax(1) == labels).float().mean())


class NoFeatures:
    """The models of other data have no classifier: their Frechet distance and accuracy are NaN."""

    def features(self, x):
        return None

    def frechet(self, x, against=None):
        return float("nan")

    def accuracy(self, x, labels):
        return float("nan")


def features_for(model_name):
    from calibrated_samplers.calibration.testbed import tiny
    return Digits() if tiny.MODELS.get(model_name, (None,) * 4)[3] == "digits" else NoFeatures()


def per_noise_rmse(x, reference):
    return (x.to(torch.float64) - reference.to(torch.float64)).flatten(1).pow(2).mean(1).sqrt()


def ratio_interval(errors, base, resamples=2000, seed=0):
    """RMSE ratio of per-noise ``errors`` to ``base`` (the same noises) and its 95% paired bootstrap interval: the
    RMSE is carried by a few noises, so the ratio moves with which of them a set of noises happens to hold."""
    e2, b2 = errors.pow(2), base.pow(2)
    idx = torch.randint(len(e2), (resamples, len(e2)), generator=torch.Generator().manual_seed(seed))
    ratios = (e2[idx].mean(1) / b2[idx].mean(1)).sqrt()
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=ratios.dtype)).tolist()
    return float((e2.mean() / b2.mean()).sqrt()), lo, hi


class Setting:
    cache = None  # a folder where the references are kept between jobs (run_one sets it: OUT/partial/<fingerprint>)

    def __init__(self, model_name, cfg, n_test, n_cal):
        self.bed = testbed(model_name)
        self.name = f"{model_name} cfg {cfg:g}"
        self.cfg = cfg
        self.conditions = self.bed.conditions(cfg)
        self.fam = dict(family=self.bed.family, shift=self.bed.shift)
        self.per = max(1, n_test // len(self.conditions))
        self.labels = torch.arange(len(self.conditions)).repeat_interleave(self.per)
        self.n_cal = n_cal
        self.unit = torch.randn(self.per * len(self.conditions), *self.bed.shape,
                                generator=torch.Generator().manual_seed(1000))
        self.reference = self.reference_of(self.unit, "test")
        self.n_confirm = CONFIRM_FACTOR * self.per * len(self.conditions)
        self._confirm = None

    def sample(self, fn, sig, unit=None, **kw):
        unit = self.unit if unit is None else unit
        per = unit.shape[0] // len(self.conditions)
        x = unit if self.bed.family == "flow" else unit * float(sig[0])
        return torch.cat([fn(self.bed.model, x[j * per:(j + 1) * per], sig, extra_args=c, disable=True,
                             **kw) for j, c in enumerate(self.conditions)])

    def reference_of(self, unit, tag=None):
        """The 100-step Heun solve from ``unit`` noises, against which every endpoint is measured; with a ``tag``
        and a cache folder, solved once per code fingerprint and read back by the other jobs of the setting."""
        path = None if tag is None or self.cache is None else os.path.join(
            self.cache, f"reference_{self.name.replace(' ', '_')}_{tag}_{unit.shape[0]}.pt")
        if path is not None and os.path.exists(path):
            return torch.load(path)
        ref = self.sample(SAMPLERS["iia_edm"], self.bed.sigmas(100), unit, **self.fam)
        if path is not None:
            os.makedirs(self.cache, exist_ok=True)
            torch.save(ref, path + f".{os.getpid()}.tmp")
            os.replace(path + f".{os.getpid()}.tmp", path)
        return ref

    def confirmation(self):
        """(noises, reference) of the confirmation set: fresh noises (seeds from 2000, never a test or calibration
        noise) on which the pair a headline compares is measured again, after the test noises picked it."""
        if self._confirm is None:
            unit = torch.randn(self.n_confirm, *self.bed.shape, generator=torch.Generator().manual_seed(2000))
            self._confirm = unit, self.reference_of(unit, "fresh")
        return self._confirm

    def cal_noise(self, sig):
        return self.bed.noise(self.n_cal, 0, sig)

    def calibrate(self, sig, name, **kw):
        return calibrate(self.bed.model, sig, name, self.cal_noise(sig), self.conditions, chunk_size=64,
                         sigma_min=self.bed.sigma_min, **self.fam, **kw)


def uncalibrated_samplers(st, n, scheds, K):
    """(label, f(noises or None) -> endpoints) of every uncalibrated sampler on every fixed schedule in ``scheds`` at
    ``n`` evaluations; ``K`` is k-diffusion's sampling module."""
    for name, twin in list(K_SAMPLERS.items()) + list(PACK_PLAIN.items()):
        found = steps_for_evaluations(twin, n)
        if found is None:
            continue
        for sched, make in scheds.items():
            sig = make(*found)
            if sig is None:
                continue
            if name in K_SAMPLERS:
                yield f"{name} ({sched})", (lambda unit, fn=getattr(K, f"sample_{name}"), sig=sig:
                                            st.sample(fn, sig, unit))
            else:
                yield f"{name} ({sched})", (lambda unit, fn=SAMPLERS[twin], sig=sig:
                                            st.sample(fn, sig, unit, **st.fam))


def run_setting(st, evals, digits, log, calibrated=CALIBRATED):
    K = load_k_diffusion_sampling()
    rows = {}  # label -> {evaluations: metrics}
    kinds = {}  # label -> "uncalibrated" | "peer" | "calibrated"
    cal_rows = []
    scheds = schedules(st.bed)

    reference_features = digits.features(st.reference)
    reference = {"fd": digits.frechet(st.reference), "accuracy": digits.accuracy(st.reference, st.labels)}
    headline = {}  # evaluations -> the headline pair's ratio intervals

    per_noise_of, redo = {}, {}  # label -> per-noise RMSE on the test noises; label -> f(noises) sampling them again

    def record(label, kind, n, x, extra=None, again=None):
        per_noise = per_noise_rmse(x, st.reference)
        per_noise_of[label], redo[label] = per_noise, again
        m = {"rmse": rmse(x, st.reference), "median": float(per_noise.median()), "fd": digits.frechet(x),
             "fd_reference": digits.frechet(x, reference_features), "accuracy": digits.accuracy(x, st.labels)}
        m.update(extra or {})
        rows.setdefault(label, {})[n] = m
        kinds[label] = kind
        log(f"  {st.name:22s} {label:44s} {n:2d} evals  rmse {m['rmse']:.4f}  fd {m['fd']:.2f}")
        return m

    def timed_calibration(sig, name, **kw):
        start_rss = reset_peak()
        t0 = time.perf_counter()
        cal = st.calibrate(sig, name, **kw)
        seconds = time.perf_counter() - t0
        peak = proc_status("VmHWM")
        return cal, seconds, (peak - start_rss) / 2 ** 20 if peak and start_rss else float("nan")

    for n in evals:
        for label, again in uncalibrated_samplers(st, n, scheds, K):
            record(label, "uncalibrated", n, again(None), again=again)
        # peers: GITS-style and LD3-style schedules for the plain DPM-Solver++(2M) and iPNDM
        default = next(iter(scheds.values()))
        for solver, twin in PEER_SOLVERS.items():
            found = steps_for_evaluations(twin, n)
            sig = default(*found)
            t0 = time.perf_counter()
            gits, cost = gits_schedule(st.bed.model, sig, st.cal_noise(sig), st.conditions, **st.fam)
            record(f"{solver} (GITS-style schedule)", "peer", n, st.sample(SAMPLERS[twin], gits, **st.fam),
                   {"sigmas": gits.tolist(), "seconds": time.perf_counter() - t0, "evaluations_per_noise": cost})
            cal, seconds, peak = timed_calibration(sig, twin, learn_params=False)
            learned = cal.sampling_sigmas.tolist()
            record(f"{solver} (LD3-style schedule)", "peer", n, st.sample(SAMPLERS[twin], sig, calibration=cal,
                                                                           **st.fam),
                   {"sigmas": learned, "seconds": seconds, "evaluations_per_noise":
                    cal.info["end_to_end"]["start_evaluations_per_sample"]
                    + cal.info["end_to_end"]["evaluations_per_sample"]})
        # the pack's calibrations: the default (end to end), and the per-step fit alone for the record
        for name, label, kw in [(name, m, kw) for m in calibrated for name, kw in [CALIBRATED_AS.get(m, (m, {}))]] + [
                ("iia_dpmpp_2m", "iia_dpmpp_2m (per-step fit only)", {"end_to_end": False})]:
            found = steps_for_evaluations(name, n, **{k: v for k, v in kw.items() if k == "afs"})
            if found is None:
                continue
            sig = default(*found)
            cal, seconds, peak = timed_calibration(sig, name, **kw)
            again = (lambda unit, name=name, sig=sig, cal=cal:
                     st.sample(SAMPLERS[name], sig, unit, calibration=cal, **st.fam))
            e2e = cal.info.get("end_to_end") or {}
            m = record(f"{label} (calibrated)", "calibrated", n, again(None), again=again)
            cal_rows.append({"sampler": label, "evaluations": n, "seconds": seconds, "peak_mib": peak,
                             # the run's total counts the end-to-end stage's forward passes too
                             "sequential_evaluations": e2e.get("start_evaluations_per_sample",
                                                               cal.info["model_evaluations_per_sample"]),
                             "end_to_end_evaluations": e2e.get("evaluations_per_sample", 0.0),
                             "budget": e2e.get("budget"), "rounds": e2e.get("rounds"),
                             "best_round": e2e.get("best_round"), "curve": e2e.get("curve"),
                             "held_out": [e2e.get("start_held_out_rmse"), e2e.get("held_out_rmse")],
                             "learned_sigmas": cal.sample_sigmas is not None,
                             "sigmas": cal.sampling_sigmas.tolist(), "rmse": m["rmse"]})
        # the headline pair again: its ratio's bootstrap interval on the test noises, then the same two samplers on
        # the fresh confirmation noises (the test noises chose the best uncalibrated, which flatters it a little)
        c_label, u_label = best(rows, kinds, n, "calibrated")[1], best(rows, kinds, n, "uncalibrated")[1]
        unit, confirm_reference = st.confirmation()
        fresh = {lab: per_noise_rmse(redo[lab](unit), confirm_reference) for lab in (c_label, u_label)}
        headline[n] = {"calibrated": c_label, "uncalibrated": u_label,
                       "test": ratio_interval(per_noise_of[c_label], per_noise_of[u_label]),
                       "confirmation": ratio_interval(fresh[c_label], fresh[u_label]),
                       "confirmation_rmse": [float(fresh[lab].pow(2).mean().sqrt()) for lab in (c_label, u_label)],
                       "noises": [len(st.unit), len(unit)]}
        log(f"  {st.name:22s} headline {n} evals: {headline[n]}")
    return rows, kinds, cal_rows, reference, headline


CURVE_FACTORS = (1.0, 2.0, 4.0, 8.0, 16.0)  # end-to-end budgets tried, in multiples of the per-step fit's evaluations


def cost_curve(st, n, factors, log):
    """What the default calibration gains for what it spends: one calibration per end-to-end budget (each with its
    own cosine decay, as a user setting ``budget`` would run it), from a budget of 0 (the stage's start: the per-step
    fit) to ``factors[-1]`` times the per-step fit's evaluations. Gains are read on the 200 test noises against the
    reference; the held-out RMSE against the teacher (what the stage itself judges by) is reported beside them."""
    name = "iia_dpmpp_2m"
    sig = schedules(st.bed)["karras" if st.bed.family != "flow" else "shift 1"](*steps_for_evaluations(name, n))
    points = []
    sequential = None
    for factor in (0.0,) + tuple(factors):
        budget = 0.0 if sequential is None else factor * sequential
        cal = st.calibrate(sig, name, budget=budget)
        e2e = cal.info["end_to_end"]
        sequential = sequential or e2e["start_evaluations_per_sample"]
        x = st.sample(SAMPLERS[name], sig, calibration=cal, **st.fam)
        points.append({"factor": factor, "evaluations": cal.info["model_evaluations_per_sample"],
                       "held_out": e2e["held_out_rmse"], "test_rmse": rmse(x, st.reference),
                       "seconds": cal.info["seconds"]})
        log(f"cost curve {st.name} {n} evals, budget {factor:g}x: test RMSE {points[-1]['test_rmse']:.4f}, "
            f"held-out {e2e['held_out_rmse']:.4f}, {cal.info['seconds']:.0f} s")
    start, final = points[0]["test_rmse"], points[-1]["test_rmse"]
    gain = start - final
    reach = next((p["factor"] for p in points if start - p["test_rmse"] >= 0.8 * gain), float("nan")) \
        if gain > 0 else float("nan")
    default = next(p for p in points if p["factor"] == BUDGET_FACTOR)
    log(f"cost curve {st.name} {n} evals: test RMSE {start:.4f} -> {final:.4f} at {factors[-1]:g}x; the default "
        f"{BUDGET_FACTOR:g}x budget reaches {default['test_rmse']:.4f}, "
        f"{(start - default['test_rmse']) / gain:.0%} of that gain" if gain > 0 else "no gain")
    return {"setting": st.name, "evaluations": n, "sequential": sequential, "points": points,
            "reach80": reach, "default_share": (start - default["test_rmse"]) / gain if gain > 0 else float("nan")}


def image_grid(st, path, evals=(5, 6)):
    """Rows: the best uncalibrated sampler and iia_dpmpp_2m calibrated at 4-6 evaluations, then the reference."""
    from calibrated_samplers.calibration.testbed.tiny import save_grid
    K = load_k_diffusion_sampling()
    pick = torch.arange(len(st.conditions)) * st.per
    rows, names = [], []
    scheds = schedules(st.bed)
    for n in evals:
        cands = []
        for name, twin in K_SAMPLERS.items():
            found = steps_for_evaluations(twin, n)
            for sched, make in scheds.items():
                sig = make(*found)
                if sig is None:  # a raised-end schedule for a sampler that does not step into sigma = 0
                    continue
                x = st.sample(getattr(K, f"sample_{name}"), sig)
                cands.append((rmse(x, st.reference), f"{name} ({sched}) {n}", x))
        e, label, x = min(cands, key=lambda c: c[0])
        rows.append(x[pick])
        names.append(label)
        sig = scheds["karras"](*steps_for_evaluations("iia_dpmpp_2m", n))
        cal = st.calibrate(sig, "iia_dpmpp_2m")
        rows.append(st.sample(SAMPLERS["iia_dpmpp_2m"], sig, calibration=cal, **st.fam)[pick])
        names.append(f"iia_dpmpp_2m calibrated {n}")
    rows.append(st.reference[pick])
    names.append("reference")
    save_grid(rows, path)
    return names


EVALS = {("digits-eps", 1.0): [4, 5, 6, 8, 10], ("digits-eps", 5.0): [5, 6], ("digits-flow", 1.0): [5, 6],
         ("digits-eps-narrow", 1.0): [5, 6], ("shapes-eps", 1.0): [5, 6], ("shapes-eps", 5.0): [5, 6],
         ("textures-flow", 1.0): [5, 6]}
COST = {4: 0.7, 5: 1.0, 6: 1.3, 8: 2.0, 10: 2.8}  # rough relative cost of one cell, to start the longest jobs first


PACK = os.path.dirname(HERE)
# what a finished job's result depends on: the pack's solver and calibration code (bundled weights included), the
# peers and this file (report.py, which only writes, is left out); a job saved under another fingerprint runs again
FINGERPRINTED = ("samplers", "calibration", "benchmarks/peers.py", "benchmarks/memory.py", "benchmarks/suite.py")


def fingerprint():
    return code_fingerprint(PACK, FINGERPRINTED + ("benchmarks/run.py",))


@dataclasses.dataclass(frozen=True)
class Job:
    """One measurement run in a process of its own: a setting's cells at one evaluation count, its image grid or its
    cost curve, with what every job shares (noises, threads, output folder, samplers, the code's fingerprint)."""
    kind: str  # "cells", "grid" or "curve"
    model: str
    cfg: float
    evaluations: int
    n_test: int
    n_cal: int
    threads: int
    out: str
    with_curve: bool
    calibrated: list
    code: str


def job_file(job):
    """Where one job's result is kept, so a run cut short can go on (``--resume``) with the jobs it has not done."""
    return _store(job).path(_job_name(job))


def _store(job):
    return Results(os.path.join(job.out, "partial"))


def _job_name(job):
    return f"{job.kind}_{job.model}_cfg{job.cfg:g}_{job.evaluations}_{job.n_test}x{job.n_cal}"


def _int_keys(obj):
    """JSON turned the evaluation counts a result is keyed by into strings: turn them back."""
    if isinstance(obj, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_int_keys(v) for v in obj]
    return obj


def finished_jobs(jobs, code):
    """(results of the ``jobs`` an earlier run finished under the code fingerprint ``code``, the jobs still to run)."""
    reused, remaining = [], []
    for j in jobs:
        saved = _store(j).load(_job_name(j), fingerprint=code, calibrated=j.calibrated)
        if saved is None:
            remaining.append(j)
        else:
            reused.append(_int_keys(saved))
    return reused, remaining


def save_job(job, result):
    """Keep one job's result for ``--resume``."""
    _store(job).save(_job_name(job), result, fingerprint=job.code, calibrated=job.calibrated)


def run_one(job):
    """One job in its own process (one thread each: small batches scale better so): a setting at one evaluation
    count, its image grid, or its cost curve."""
    kind, model_name, n, out = job.kind, job.model, job.evaluations, job.out
    torch.set_num_threads(job.threads)
    torch.set_grad_enabled(False)
    Setting.cache = os.path.join(out, "partial", job.code)
    st = Setting(model_name, job.cfg, job.n_test, job.n_cal)
    t0 = time.perf_counter()

    def log(s):
        print(s, flush=True)

    result = {"kind": kind, "setting": st.name, "evaluations": n}
    if kind == "cells":
        result["rows"], result["kinds"], result["cal_rows"], result["reference"], result["headline"] = run_setting(
            st, [n], features_for(model_name), log, job.calibrated)
    elif kind == "grid":
        result["grid_names"] = image_grid(st, os.path.join(out, "grid.png"))
    else:
        result["curve"] = cost_curve(st, n, CURVE_FACTORS, log)
    result["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    log(f"{st.name} {kind} {n}: {result['minutes']:.1f} min")
    save_job(job, result)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer counts, noises and samplers, to check the plumbing")
    p.add_argument("--jobs", type=int, default=2, help="jobs run in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=HERE)
    p.add_argument("--no-curve", action="store_true", help="skip the cost curve (the longest job)")
    p.add_argument("--no-grid", action="store_true", help="skip the image grid (digits-eps cfg 5)")
    p.add_argument("--evals", type=int, nargs="+",
                   help="evaluation counts to measure on every setting run, instead of each setting's own (EVALS)")
    p.add_argument("--only", nargs="+", help="settings to run, e.g. 'digits-eps:5' 'digits-flow:1'")
    p.add_argument("--curve-from", metavar="RESULTS_JSON",
                   help="skip the cost curve and report the one in an earlier run's results.json (say which in the "
                        "commit: only valid while the calibration code is unchanged since)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the jobs an earlier run (cut short) finished under OUT/partial, where the code they "
                        "depend on is unchanged (same fingerprint); run only the rest")
    args = p.parse_args()
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    n_test, n_cal = (200, 256) if not args.quick else (40, 64)
    calibrated = CALIBRATED
    with_curve = not (args.quick or args.no_curve or args.curve_from)
    settings = SETTINGS if not args.only else [(s.split(":")[0], float(s.split(":")[1])) for s in args.only]
    code = fingerprint()
    common = dict(n_test=n_test, n_cal=n_cal, threads=args.threads, out=args.out, with_curve=with_curve,
                  calibrated=calibrated, code=code)
    jobs = [Job("cells", m, c, n, **common) for m, c in settings
            for n in ([5] if args.quick else args.evals or EVALS.get((m, c), [5, 6]))]
    if ("digits-eps", 5.0) in settings and not args.no_grid:
        jobs.append(Job("grid", "digits-eps", 5.0, 0, **common))
    if with_curve and ("digits-eps", 1.0) in settings:
        jobs.append(Job("curve", "digits-eps", 1.0, 6, **common))
    weight = {"cells": 1.0, "grid": 0.8, "curve": 3.7}
    jobs.sort(key=lambda j: -weight[j.kind] * COST.get(j.evaluations, 1.3))
    reused = []
    if args.resume:
        reused, jobs = finished_jobs(jobs, code)
        print(f"resuming: {len(reused)} jobs reused from {os.path.join(args.out, 'partial')} (code {code}), "
              f"{len(jobs)} to run", flush=True)
    if not jobs:
        done = []
    elif args.jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = list(pool.imap_unordered(run_one, jobs, chunksize=1))
    else:
        done = [run_one(j) for j in jobs]
    done += reused
    import report
    report.write(done, settings, args, started, reused, jobs, code)


if __name__ == "__main__":
    main()
