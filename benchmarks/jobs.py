"""What the benchmark scripts share: fits run side by side, each in a process of its own (a multiprocessing pool ran
them 20x slower here), and finished results kept under the fingerprint of the code they measured, so a run cut short
goes on with what it has not done."""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time


def code_fingerprint(root, entries, *texts):
    """16 hex digits of the files under ``entries`` (paths relative to ``root``: files or folders, compiled files
    left out) and of ``texts`` (e.g. the measuring part of a script whose report writing may change freely)."""
    h = hashlib.sha256()
    for entry in entries:
        path = os.path.join(root, entry)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, dirs, fs in os.walk(path) for f in fs
            if "__pycache__" not in d and not f.endswith(".pyc"))
        for f in files:
            h.update(os.path.relpath(f, root).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    for text in texts:
        h.update(text.encode())
    return h.hexdigest()[:16]


class Results:
    """Finished results, one JSON file each in ``folder``, with the keys they were made under (the code's
    fingerprint, the samplers...): ``load`` gives a result only where every key matches and the file is whole."""

    def __init__(self, folder):
        self.folder = folder

    def path(self, name):
        return os.path.join(self.folder, name + ".json")

    def load(self, name, **keys):
        try:
            with open(self.path(name)) as f:
                saved = json.load(f)
        except (OSError, ValueError):  # not run, or cut short while writing
            return None
        if not isinstance(saved, dict) or "result" not in saved or any(saved.get(k) != v for k, v in keys.items()):
            return None
        return saved["result"]

    def save(self, name, result, **keys):
        """Written whole, then renamed: a job killed mid-write leaves no result."""
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(dict(keys, result=result), f, default=str)
        os.replace(path + ".tmp", path)


def run_jobs(script, specs, workers):
    """Yield each spec's result, ``workers`` at a time: ``script --job <spec as JSON>`` prints its result as JSON on
    its last line of output."""
    pending, running = list(specs), []
    while pending or running:
        while pending and len(running) < workers:
            spec = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, os.path.abspath(script), "--job", json.dumps(spec)],
                                            stdout=subprocess.PIPE, text=True))
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            out = proc.stdout.read()
            if proc.returncode:
                raise RuntimeError(f"a fit failed (exit {proc.returncode}): {out[-2000:]}")
            yield json.loads(out.strip().splitlines()[-1])


def job_command_line(job):
    """The options of a script whose fits ``run_jobs`` runs: ``--workers``; with ``--job`` it runs that one fit,
    prints its result as JSON and exits."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        print(json.dumps(job(*json.loads(args.job))))
        sys.exit(0)
    return args
