"""The checks every registered sampler must pass (in the spirit of diffusers' common scheduler tests)."""
import math
import types

import pytest
import torch

from calibrated_samplers.samplers import SAMPLERS, CalibrationMismatch
from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras, rmse

NAMES = sorted(SAMPLERS)
CALIBRATED = [n for n in NAMES if SAMPLERS[n].kind != "plain"]


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture()


def neutral_params(name, n_steps):
    """Parameters that must reproduce the base solver: zero IIA coefficients, AMED's (1/2, 1, 1)."""
    fn = SAMPLERS[name]
    if fn.kind == "iia":
        from calibrated_samplers.samplers.iia import VARIANT_BY_NAME
        v = VARIANT_BY_NAME[name]
        return {"coeffs": torch.zeros(n_steps, v.columns(v.max_depth), dtype=torch.float64)}
    return {"r": torch.full((n_steps,), 0.5), "c": torch.ones(n_steps), "a": torch.ones(n_steps)}


def perturbed_params(name, n_steps, seed=0):
    """Small non-neutral parameters, zero wherever a basis vector cannot exist: the first and last steps, and at
    step i the records of steps before i - 1 (step i - 1's record is the oldest sure to have its predecessor)."""
    g = torch.Generator().manual_seed(seed)
    p = neutral_params(name, n_steps)
    if "coeffs" in p:
        from calibrated_samplers.samplers.iia import VARIANT_BY_NAME
        c = 0.02 * torch.randn(p["coeffs"].shape, generator=g, dtype=torch.float64)
        for i in range(n_steps):
            c[i, VARIANT_BY_NAME[name].columns(max(i - 1, 0)):] = 0
        c[0] = 0
        c[-1] = 0
        return {"coeffs": c}
    return {"r": 0.4 + 0.2 * torch.rand(n_steps, generator=g), "c": 1 + 0.02 * torch.randn(n_steps, generator=g),
            "a": 1 + 0.02 * torch.randn(n_steps, generator=g)}


class Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.model(x, sigma, **kw)


@pytest.mark.parametrize("name", NAMES)
class TestEverySampler:
    sig = karras(6, 0.03, 14.6)

    def x(self, mixture, n=4, seed=1):
        return mixture.noise(n, seed) * 14.6

    def test_registry_facts(self, name):
        fn = SAMPLERS[name]
        assert fn.sampler_name == name and fn.__name__ == f"sample_{name}"
        assert fn.kind in ("iia", "amed", "plain") and fn.nfe_per_step in (1, 2) and fn.base
        assert fn.__doc__

    @pytest.mark.parametrize("zero_end", [True, False])
    @pytest.mark.parametrize("afs", [False, True])
    def test_evaluations_counted(self, mixture, name, zero_end, afs):
        if afs and SAMPLERS[name].kind == "plain":
            pytest.skip("AFS is an option of the calibrated samplers")
        sig = karras(5, 0.03, 14.6, zero=zero_end)
        model = Counting(mixture.edm())
        opts = {"afs": True} if afs else {}
        SAMPLERS[name](model, self.x(mixture), sig, disable=True, **opts)
        assert model.calls == SAMPLERS[name].evaluations(sig, **opts)

    def test_neutral_calibration_is_base(self, mixture, name):
        if SAMPLERS[name].kind == "plain":
            pytest.skip("nothing to calibrate")
        a = SAMPLERS[name](mixture.edm(), self.x(mixture), self.sig, disable=True)
        b = SAMPLERS[name](mixture.edm(), self.x(mixture), self.sig, disable=True,
                           calibration=neutral_params(name, len(self.sig) - 1))
        assert torch.equal(a, b)

    def test_calibration_changes_result(self, mixture, name):
        if SAMPLERS[name].kind == "plain":
            pytest.skip("nothing to calibrate")
        a = SAMPLERS[name](mixture.edm(), self.x(mixture), self.sig, disable=True)
        b = SAMPLERS[name](mixture.edm(), self.x(mixture), self.sig, disable=True,
                           calibration=perturbed_params(name, len(self.sig) - 1))
        assert torch.isfinite(b).all()
        assert 1e-6 < rmse(a, b) < 0.5

    def test_deterministic_and_input_untouched(self, mixture, name):
        x = self.x(mixture)
        x_copy = x.clone()
        a = SAMPLERS[name](mixture.edm(), x, self.sig, disable=True)
        b = SAMPLERS[name](mixture.edm(), x, self.sig, disable=True)
        assert torch.equal(a, b) and torch.equal(x, x_copy)

    def test_batch_invariance(self, mixture, name):
        x = self.x(mixture, n=5)
        batch = SAMPLERS[name](mixture.edm(), x, self.sig, disable=True)
        alone = SAMPLERS[name](mixture.edm(), x[2:3], self.sig, disable=True)
        assert torch.allclose(batch[2:3], alone, rtol=0, atol=1e-12)

    @pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 4, 3, 4, 4)])
    def test_image_and_video_shapes(self, name, shape):
        mixture = GaussianMixture(shape=shape[1:])
        x = mixture.noise(shape[0]) * 14.6
        out = SAMPLERS[name](mixture.edm(), x, self.sig, disable=True)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()

    def test_low_precision_model_outputs(self, mixture, name):
        """An fp16 model and a bf16 latent: the solver's own arithmetic stays in float32."""
        def half_model(x, sigma, **kw):
            return mixture.edm()(x, sigma, **kw).to(torch.float16)

        x = self.x(mixture).float()
        ref = SAMPLERS[name](mixture.edm(), x.double(), self.sig.double(), disable=True)
        out16 = SAMPLERS[name](half_model, x, self.sig.float(), disable=True)
        assert out16.dtype == torch.float32
        assert rmse(out16, ref) < 2e-3  # fp16 output rounding, not solver drift
        outbf = SAMPLERS[name](mixture.edm(), x.to(torch.bfloat16), self.sig.float(), disable=True)
        assert outbf.dtype == torch.bfloat16 and torch.isfinite(outbf.float()).all()

    def test_single_step_and_no_zero_end(self, mixture, name):
        x = self.x(mixture)
        one = SAMPLERS[name](mixture.edm(), x, torch.tensor([14.6, 0.0], dtype=torch.float64), disable=True)
        assert torch.isfinite(one).all()
        two = SAMPLERS[name](mixture.edm(), x, torch.tensor([14.6, 1.0], dtype=torch.float64), disable=True)
        assert torch.isfinite(two).all()

    def test_callback_sees_every_step(self, mixture, name):
        seen = []
        SAMPLERS[name](mixture.edm(), self.x(mixture), self.sig, disable=True, callback=lambda d: seen.append(d))
        assert [d["i"] for d in seen] == list(range(len(self.sig) - 1))
        assert all(set(d) >= {"x", "i", "sigma", "sigma_hat", "denoised"} for d in seen)

    def test_mismatched_calibration_refused(self, mixture, name):
        if SAMPLERS[name].kind == "plain":
            with pytest.raises(ValueError, match="needs no calibration"):
                SAMPLERS[name](mixture.edm(), self.x(mixture), self.sig, disable=True, calibration={"x": 1})
            return
        n = len(self.sig) - 1
        good = types.SimpleNamespace(method=name, sigmas=self.sig, family="eps", params=neutral_params(name, n),
                                     options={})
        SAMPLERS[name](mixture.edm(), self.x(mixture), self.sig, disable=True, calibration=good)
        cases = {
            "other sampler": (dict(method="iia_edm" if name != "iia_edm" else "amed"), "not"),
            "other step count": (dict(sigmas=karras(7, 0.03, 14.6)), "steps"),
            "other sigmas": (dict(sigmas=karras(6, 0.03, 10.0)), "sigmas differ"),
            "other family": (dict(family="flow"), "flow model"),
            "short table": (dict(params={k: v[:-1] for k, v in good.params.items()}), "shape"),
            "option clash": (dict(options={"afs": True} if SAMPLERS[name].kind == "amed" else {"variable_step": True}),
                             "fitted with"),
        }
        for what, (change, message) in cases.items():
            bad = types.SimpleNamespace(**{**vars(good), **change})
            run_opts = {"afs": False} if SAMPLERS[name].kind == "amed" else {"variable_step": False}
            with pytest.raises(CalibrationMismatch, match=message):
                SAMPLERS[name](mixture.edm(), self.x(mixture), self.sig, disable=True, calibration=bad,
                               **(run_opts if what == "option clash" else {}))

    def test_converges_to_reference(self, mixture, name):
        """40 steps land close to the exact ODE solution; a sanity bound, orders are tested elsewhere."""
        x = self.x(mixture)
        ref = mixture.reference(x, 14.6, 0.0)
        out = SAMPLERS[name](mixture.edm(), x, karras(40, 0.01, 14.6), disable=True)
        first_order = SAMPLERS[name].base == "euler"
        assert rmse(out, ref) < (3e-2 if first_order else 3e-3) * math.sqrt(mixture.s2 + 1)
