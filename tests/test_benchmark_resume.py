"""The benchmark's --resume: a job's saved result reads back as it was made, and only under the same code."""
import dataclasses
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location("bench_run", os.path.join(BENCH, "run.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(BENCH)


def _job(bench, out, code, kind="cells", n=5):
    return bench.Job(kind, "digits-eps", 1.0, n, 200, 256, 1, str(out), False, ["iia_dpmpp_2m"], code)


def test_saved_job_reads_back_with_integer_evaluation_keys(bench, tmp_path):
    result = {"kind": "cells", "setting": "digits-eps cfg 1", "evaluations": 5,
              "rows": {"dpmpp_2m (karras)": {5: {"rmse": 0.05, "fd": 3.0}}},
              "kinds": {"dpmpp_2m (karras)": "uncalibrated"},
              "headline": {5: {"test": [0.57, 0.49, 0.66], "noises": [200, 600]}},
              "cal_rows": [{"name": "iia_dpmpp_2m", "evaluations": 5}]}
    job = _job(bench, tmp_path, "abc")
    bench.save_job(job, result)
    reused, remaining = bench.finished_jobs([job, _job(bench, tmp_path, "abc", n=6)], "abc")
    assert reused == [result]  # the same dict: evaluation counts are ints again, as the report indexes them
    assert [j.evaluations for j in remaining] == [6]


def test_other_code_or_samplers_rerun_the_job(bench, tmp_path):
    job = _job(bench, tmp_path, "abc")
    bench.save_job(job, {"kind": "cells"})
    assert bench.finished_jobs([job], "def") == ([], [job])
    other = dataclasses.replace(job, calibrated=["iia_dpmpp_2m", "amed_dpmpp_2m"])
    assert bench.finished_jobs([other], "abc") == ([], [other])
    with open(bench.job_file(job), "w") as f:  # a file cut short is no result
        f.write('{"fingerprint": "abc", "calib')
    assert bench.finished_jobs([job], "abc") == ([], [job])


def test_fingerprint_follows_the_measured_code(bench, tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "solver.py").write_text("A = 1\n")
    monkeypatch.setattr(bench, "PACK", str(tmp_path))
    monkeypatch.setattr(bench, "FINGERPRINTED", ("pkg",))
    first = bench.fingerprint()
    (pkg / "__pycache__" / "solver.cpython-311.pyc").write_bytes(b"\0")
    assert bench.fingerprint() == first
    (pkg / "solver.py").write_text("A = 2\n")
    assert bench.fingerprint() != first
