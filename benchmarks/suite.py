"""What the benchmark (run.py) compares, read by its report (report.py) too: the calibrated samplers it runs, the
size of the confirmation set, and how the best of a kind is picked from the measured rows."""

CALIBRATED = ["iia_dpmpp_2m", "iia_dpmpp_2m (afs)"]
CALIBRATED_AS = {"iia_dpmpp_2m (afs)": ("iia_dpmpp_2m", {"afs": True})}  # label -> (sampler, solver options)
CONFIRM_FACTOR = 3  # the confirmation set is this many times the test set


def best(rows, kinds, n, kind, standard=False, metric="rmse"):
    """The lowest RMSE (or other ``metric``) of ``kind`` at ``n`` evaluations and its label; ``standard``: only
    schedules that end at the model's own sigma_min (as every scheduler a UI offers by default does)."""
    cands = [(r[n][metric], label) for label, r in rows.items() if n in r and kinds[label] == kind
             and metric in r[n] and not (standard and "(last " in label)]
    return min(cands) if cands else (float("nan"), None)
