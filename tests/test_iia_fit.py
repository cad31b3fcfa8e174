"""First checks of the IIA fit (calibration-engine issue, in progress): it must help on held-out noise."""
import pytest
import torch

from calibrated_samplers.calibration.iia_fit import fit_iia
from calibrated_samplers.samplers import SAMPLERS
from calibrated_samplers.tests.analytic import GaussianMixture, karras, rmse

MIXTURE = GaussianMixture()


LOCAL_TARGET_HURTS = pytest.mark.xfail(
    strict=True, reason="known: the paper's local target lowers each step's held-out residual yet raises the "
    "endpoint error of IIA-EDM here (1.76x); calibration-notes.md saw the same. The engine issue must fix it")


@pytest.mark.parametrize("name", ["iia_ddim", pytest.param("iia_edm", marks=LOCAL_TARGET_HURTS), "iia_dpmpp_2m"])
def test_local_fit_beats_base_on_held_out_noise(name):
    sig = karras(6, 0.03, 14.6)
    fit_noise, test_noise = MIXTURE.noise(96, 100) * 14.6, MIXTURE.noise(48, 200) * 14.6
    coeffs, before, after, fallback, calls = fit_iia(MIXTURE.edm(), sig, name, fit_noise, fine_steps=10)
    assert coeffs.shape[0] == 6 and (after <= before).all()
    assert calls > 0 and torch.equal(coeffs[fallback == 1], torch.zeros_like(coeffs[fallback == 1]))
    ref = MIXTURE.reference(test_noise, 14.6, 0.0, steps_per_unit=50)
    base = rmse(SAMPLERS[name](MIXTURE.edm(), test_noise, sig, disable=True), ref)
    tuned = rmse(SAMPLERS[name](MIXTURE.edm(), test_noise, sig, disable=True, calibration={"coeffs": coeffs}), ref)
    print(f"{name}: held-out endpoint error ratio calibrated/base = {tuned / base:.2f}")
    assert tuned < 0.95 * base
