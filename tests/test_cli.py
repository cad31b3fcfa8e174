"""The calibration command line: calibrate a bundled model, inspect and plot the file it wrote."""
import subprocess
import sys

import pytest

from calibrated_samplers.calibration import load
from calibrated_samplers.calibration.cli import main


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


def test_module_entry_point_and_clear_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "calibrated_samplers.calibration", "inspect", str(tmp_path / "none.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "none.safetensors" in r.stderr
    with pytest.raises(SystemExit, match="cannot take exactly"):
        main(["calibrate", "--model", "analytic-edm", "--sampler", "iia_edm", "--evaluations", "0", "--out",
              str(tmp_path / "x.safetensors")])
