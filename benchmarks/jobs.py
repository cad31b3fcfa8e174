"""Benchmark fits run side by side, each in a process of its own (a multiprocessing pool ran them 20x slower here)."""
import argparse
import json
import os
import subprocess
import sys
import time


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
