"""The analytical first step (AFS) on the IIA samplers: the first model call is replaced, nothing else, and a
calibration fitted with it samples with it and one evaluation fewer."""
import math

import pytest
import torch

from calibrated_samplers.calibration import calibrate, load
from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras
from calibrated_samplers.samplers import SAMPLERS, CalibrationMismatch

MIXTURE = GaussianMixture()
IIA = sorted(n for n, f in SAMPLERS.items() if f.kind == "iia")
SIG = karras(6, 0.03, 14.6)


class FirstCallAnalytic:
    """The model with its first call answered as AMED's paper states AFS (Zhou et al. 2024, sec. 3.4): the first
    direction is d = x / sqrt(1 + sigma^2), so the denoised is x - sigma * d; later calls go to the model."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        if self.calls == 1:
            s = float(sigma.flatten()[0])
            return x - s * x / math.sqrt(1 + s * s)
        return self.model(x, sigma, **kw)


class Counting:
    def __init__(self, model):
        self.model, self.sigmas = model, []

    def __call__(self, x, sigma, **kw):
        self.sigmas.append(float(sigma.flatten()[0]))
        return self.model(x, sigma, **kw)


@pytest.mark.parametrize("name", IIA)
def test_afs_is_the_base_sampler_with_its_first_model_call_answered_analytically(name):
    x = MIXTURE.noise(4, 3) * 14.6
    model = Counting(MIXTURE.edm())
    with_afs = SAMPLERS[name](model, x, SIG, disable=True, afs=True)
    assert SIG[0].item() not in model.sigmas  # the model never sees the first sigma
    by_hand = SAMPLERS[name](FirstCallAnalytic(MIXTURE.edm()), x, SIG, disable=True)
    torch.testing.assert_close(with_afs, by_hand, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(with_afs, SAMPLERS[name](MIXTURE.edm(), x, SIG, disable=True))


def test_a_calibration_fitted_with_afs_samples_with_it_and_one_evaluation_fewer(tmp_path):
    sig = karras(5, 0.002, 80.0)
    fit, test = MIXTURE.noise(128, seed=7) * 80.0, MIXTURE.noise(128, seed=8) * 80.0
    ref = MIXTURE.reference(test, 80.0, 0.0, steps_per_unit=100)
    fn = SAMPLERS["iia_dpmpp_2m"]
    cal = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", fit, family="edm", afs=True, end_to_end=False)
    assert cal.options.get("afs") is True
    back = load(cal.save(str(tmp_path / "afs.safetensors")))
    assert back.options == cal.options
    model = Counting(MIXTURE.edm())
    out = fn(model, test, sig, disable=True, calibration=back)
    assert len(model.sigmas) == fn.evaluations(sig, afs=True) == fn.evaluations(sig) - 1
    with pytest.raises(CalibrationMismatch, match="afs"):
        fn(MIXTURE.edm(), test, sig, disable=True, calibration=back, afs=False)

    def median_error(y):
        return float((y - ref).flatten(1).pow(2).mean(1).sqrt().median())

    # the per-step fit saw the analytic first step (its first step's error before correction is the AFS step's, not
    # the model-evaluated one's), and its coefficients help the AFS sampler on noises it never saw
    without = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", fit, family="edm", end_to_end=False)
    print("first step's error before correction: afs", float(cal.residual_before[0]), "model",
          float(without.residual_before[0]))
    assert not math.isclose(cal.residual_before[0], without.residual_before[0], rel_tol=1e-3)
    plain = fn(MIXTURE.edm(), test, sig, disable=True, afs=True)
    assert median_error(out) < 0.7 * median_error(plain)
