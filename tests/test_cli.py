"""The calibration command line: calibrate a bundled model, inspect and plot the file it wrote."""
import subprocess
import sys

import pytest

from calibrated_samplers.calibration import load
from calibrated_samplers.calibration.cli import main
from calibrated_samplers.samplers import SAMPLERS


def test_calibrate_inspect_plot(tmp_path, capsys):
    out = tmp_path / "cal.safetensors"
    main(["calibrate", "--model", "analytic-edm", "--sampler", "iia_dpmpp_2m", "--evaluations", "5",
          "--batch", "64", "--cfg", "2", "--quiet", "--out", str(out)])
    cal = load(out)
    assert cal.method == "iia_dpmpp_2m" and cal.steps == 5 and cal.info["cfg"] == 2.0
    assert cal.info["conditions"] == 4 and cal.info["fingerprint"].startswith("analytic:")
    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "iia_dpmpp_2m" in text and "resid_before" in text and len(text.strip().splitlines()) > 5 + 5
    pytest.importorskip("matplotlib")
    main(["plot", str(out), str(tmp_path / "cal.png")])
    assert (tmp_path / "cal.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrate_with_afs_takes_one_step_more_for_the_same_evaluations(tmp_path, capsys):
    out = tmp_path / "afs.safetensors"
    main(["calibrate", "--model", "analytic-edm", "--sampler", "iia_dpmpp_2m", "--evaluations", "5", "--afs",
          "--batch", "64", "--no-end-to-end", "--out", str(out)])
    cal = load(out)
    assert cal.steps == 6 and cal.options == {"afs": True}
    assert SAMPLERS["iia_dpmpp_2m"].evaluations(cal.sigmas, **cal.options) == 5
    # before the bar, what the work will spend, which is what it spent
    per_noise = cal.info["model_evaluations_per_sample"]
    assert capsys.readouterr().err.startswith(
        f"calibration: about {round(64 * per_noise):,} model evaluations planned ({per_noise:.0f} per noise for 64 "
        "noises, a backward pass counted as two)\n\rcalibrating [")


def test_module_entry_point_and_clear_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "calibrated_samplers.calibration", "inspect", str(tmp_path / "none.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "none.safetensors" in r.stderr
    with pytest.raises(SystemExit, match="cannot take exactly"):
        main(["calibrate", "--model", "analytic-edm", "--sampler", "iia_edm", "--evaluations", "0", "--out",
              str(tmp_path / "x.safetensors")])


def test_calibrate_a_range_file_and_inspect_every_entry(tmp_path, capsys):
    out = tmp_path / "range.safetensors"
    main(["calibrate", "--model", "analytic-eps", "--sampler", "iia_ddim", "--steps", "3", "--more-steps", "4",
          "--cfg-list", "1.5, 3", "--batch", "32", "--fine-steps", "2", "--no-end-to-end", "--quiet",
          "--out", str(out)])
    said = capsys.readouterr().out
    cal = load(out)
    assert len(cal) == 4 and sorted((c.steps, c.info["cfg"]) for c in cal.entries) == [
        (3, 1.5), (3, 3.0), (4, 1.5), (4, 3.0)]
    assert "4 calibrations (steps 3-4" not in said and "4 calibrations (steps 3, 4 at denoise 1, cfg 1.5-3" in said
    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert text.startswith("range file: iia_ddim, 4 calibrations") and text.count("--- entry") == 4
    with pytest.raises(SystemExit, match="pure noise"):  # refused before any work, as the UIs refuse it
        main(["calibrate", "--model", "analytic-eps", "--afs", "--denoise-list", "1, 0.5", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="list them"):
        main(["calibrate", "--model", "analytic-eps", "--denoise-list", "0.3-0.8", "--out", str(tmp_path / "x")])
