"""The calibration engine: it helps on noises it never saw, recovers known coefficients, and behaves as a tool.

Endpoint errors are measured against the exact probability-flow ODE of the analytic Gaussian mixture (an
independent RK4 solve on the exact denoiser), on noises not used for fitting.
"""
import math

import pytest
import torch

from calibrated_samplers.calibration import Calibration, CalibrationCancelled, calibrate, load
from calibrated_samplers.samplers import SAMPLERS, steps_for_evaluations
from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras, rmse

MIXTURE = GaussianMixture()
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
CALIBRATED = [n for n, f in SAMPLERS.items() if f.kind != "plain"]
EVALUATIONS = [4, 5, 6, 8, 10]
# 256 noises each: the mixture's endpoint errors are heavy-tailed (a few noises end in another component),
# so smaller test sets measure luck more than the calibration.
FIT_NOISE = MIXTURE.noise(256, seed=1) * SIGMA_MAX
TEST_NOISE = MIXTURE.noise(256, seed=2) * SIGMA_MAX
_REFERENCES = {}


def schedule(name, evaluations):
    steps, zero = steps_for_evaluations(name, evaluations)
    return karras(steps if zero else steps + 1, SIGMA_MIN, SIGMA_MAX, zero=zero)


def reference(sig):
    key = tuple(sig.tolist())
    if key not in _REFERENCES:
        _REFERENCES[key] = MIXTURE.reference(TEST_NOISE, SIGMA_MAX, float(sig[-1]), steps_per_unit=100)
    return _REFERENCES[key]


# Cells expected to fail, kept visible as strict xfails. amed_ipndm at 10 evaluations was
# one until the engine fitted both iPNDM weightings and kept the better on held-out noises: with exact
# variable-step weights two of the 256 test noises switched mixture component and carried the RMSE.
# amed_dpmpp_2m at 10 evaluations (5 steps ending at sigma_min) with the end-to-end stage: typical noises end 5x
# closer to the exact solution (median per-noise error 0.047 -> 0.009), but the RMSE is carried by the ~2% of
# test noises that end in another mixture component (errors ~1.3), and with the learned time steps a few more
# of them switch; 64 held-out noises rarely contain one, so the held-out check cannot see it. It passes since the
# stage's learning rate doubled and the time steps learn at 5x it (ratio 0.79); kept in the parametrisation.
# iia_spndm at 10 evaluations was one from the day the end-to-end stage kept its last iterate (rather than the best of
# its held-out checks) until its learning rate was measured on the model: at the fixed 0.02 the RMSE was 1.02x plain
# S-PNDM's, carried by the few test noises that end in another component; at the measured rate 0.74x.
KNOWN_MISSES = set()


def _cases():
    for name in CALIBRATED:
        for n in EVALUATIONS:
            marks = [pytest.mark.xfail(strict=True, reason="see KNOWN_MISSES")] if (name, n) in KNOWN_MISSES else []
            yield pytest.param(name, n, marks=marks, id=f"{name}-{n}")


@pytest.mark.parametrize("name,evaluations", list(_cases()))
def test_calibration_lowers_held_out_endpoint_error(name, evaluations):
    sig = schedule(name, evaluations)
    assert SAMPLERS[name].evaluations(sig) == evaluations
    cal = calibrate(MIXTURE.edm(), sig, name, FIT_NOISE, family="edm")
    ref = reference(sig)
    plain = SAMPLERS[name](MIXTURE.edm(), TEST_NOISE, sig, disable=True)
    tuned_x = SAMPLERS[name](MIXTURE.edm(), TEST_NOISE, sig, disable=True, calibration=cal)
    base, tuned = rmse(plain, ref), rmse(tuned_x, ref)
    per_noise = [(x - ref).flatten(1).pow(2).mean(1).sqrt().median() for x in (plain, tuned_x)]
    print(f"{name} at {evaluations} evaluations: held-out endpoint RMSE {base:.4f} -> {tuned:.4f} "
          f"(ratio {tuned / base:.2f}; median per-noise ratio {per_noise[1] / per_noise[0]:.2f}; strength "
          f"{cal.info['strength']}, {int(cal.fallback.sum())} steps fell back)")
    assert tuned < base


def test_local_target_also_helps():
    sig = schedule("iia_ddim", 6)
    cal = calibrate(MIXTURE.edm(), sig, "iia_ddim", FIT_NOISE, family="edm", target="local")
    ref = reference(sig)
    base = rmse(SAMPLERS["iia_ddim"](MIXTURE.edm(), TEST_NOISE, sig, disable=True), ref)
    assert rmse(SAMPLERS["iia_ddim"](MIXTURE.edm(), TEST_NOISE, sig, disable=True, calibration=cal), ref) < base
    assert cal.info["target"] == "local"


# ------------------------------------------------------------------ known optimum

class IsotropicGaussian:
    """Data N(0, s^2 I): D(x, sigma) = x s^2 / (s^2 + sigma^2), so every Euler step is a scalar multiple of x."""

    def __init__(self, s=0.5):
        self.s2 = s * s

    def __call__(self, x, sigma, **unused):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return x * self.s2 / (self.s2 + s * s)


def euler_factor(a, b, s2):
    return 1 + (b - a) * a / (s2 + a * a)


@pytest.mark.parametrize("target", ["local", "trajectory"])
def test_recovers_known_coefficient_on_a_linear_model(target):
    """IIA-DDIM-CFG's one coefficient beta on eps makes Euler equal to the fine Euler teacher exactly here.

    The teacher over one interval multiplies x by the product of its sub-steps' Euler factors P; the coarse
    Euler step multiplies by f = euler_factor(sigma, sigma'), and eps = x sigma / (s^2 + sigma^2), so the optimum
    is beta = (P - f) (s^2 + sigma^2) / sigma. Sub-steps are equal in log sigma (linear into zero).
    """
    model, s2, fine = IsotropicGaussian(), 0.25, 10
    sig = karras(5, 0.05, 10.0)
    noise = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    # the per-step fit's optimum on the requested schedule (the end-to-end stage would start from a raised last sigma,
    # where the fit's own optimum is another; its known optima are tested in test_end_to_end.py)
    cal = calibrate(model, sig, "iia_ddim_cfg", noise, family="edm", fine_steps=fine, target=target, end_to_end=False)
    s = sig.tolist()
    for i, (a, b) in enumerate(zip(s, s[1:])):
        if b > 0:
            grid = [math.exp(math.log(a) + (math.log(b) - math.log(a)) * j / fine) for j in range(fine + 1)]
        else:
            grid = [a + (b - a) * j / fine for j in range(fine + 1)]
        P = math.prod(euler_factor(u, v, s2) for u, v in zip(grid, grid[1:]))
        beta = (P - euler_factor(a, b, s2)) * (s2 + a * a) / a
        assert cal.params["coeffs"][i, 0].item() == pytest.approx(beta, rel=1e-5, abs=1e-9), f"step {i}"
    assert cal.fallback[:-1].sum() == 0 and cal.info["strength"] == 1.0


# ------------------------------------------------------------------ file, chunks, conditions

def test_saved_calibration_samples_bit_identically(tmp_path):
    sig = schedule("iia_dpmpp_2m", 6)
    cal = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", FIT_NOISE[:64], family="edm", info={"seed": 1, "cfg": 1.0})
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    loaded = load(path)
    assert loaded.info["seed"] == 1 and loaded.info["fine_steps"] == 10
    assert torch.equal(loaded.residual_before, cal.residual_before)
    a = SAMPLERS["iia_dpmpp_2m"](MIXTURE.edm(), TEST_NOISE[:8], sig, disable=True, calibration=cal)
    b = SAMPLERS["iia_dpmpp_2m"](MIXTURE.edm(), TEST_NOISE[:8], sig, disable=True, calibration=loaded)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["iia_ipndm", "amed_dpmpp_2m"])
def test_chunk_size_changes_nothing_but_rounding(name):
    sig = schedule(name, 6)
    # at the default learning rate this toy's component switches make the stage's first, large steps chaotic: the
    # rounding of two chunkings grows until their last iterates are different points (7x apart); at 0.005 it does not
    one = calibrate(MIXTURE.edm(), sig, name, FIT_NOISE[:48], family="edm", chunk_size=48, learning_rate=0.005)
    many = calibrate(MIXTURE.edm(), sig, name, FIT_NOISE[:48], family="edm", chunk_size=5, learning_rate=0.005)
    # the end-to-end stage's Adam divides by the gradients' own size, so summation-order rounding grows over its
    # iterations to ~1e-5 relative, far below what a different draw of minibatches changes
    for k in one.params:
        torch.testing.assert_close(one.params[k], many.params[k], rtol=1e-4, atol=1e-6)
    assert one.info["model_evaluations_per_sample"] == many.info["model_evaluations_per_sample"]


def test_deterministic():
    sig = schedule("amed", 5)
    one = calibrate(MIXTURE.edm(), sig, "amed", FIT_NOISE[:32], family="edm")
    two = calibrate(MIXTURE.edm(), sig, "amed", FIT_NOISE[:32], family="edm")
    assert all(torch.equal(one.params[k], two.params[k]) for k in one.params)


def test_evaluation_count_is_what_the_model_saw():
    seen = []

    def model(x, sigma, **kw):
        seen.append(x.shape[0])
        return MIXTURE.edm()(x, sigma, **kw)

    sig = schedule("amed_ipndm", 6)
    cal = calibrate(model, sig, "amed_ipndm", FIT_NOISE[:40], family="edm", chunk_size=16)
    assert max(seen) <= 16
    assert cal.info["model_evaluations_per_sample"] == pytest.approx(sum(seen) / 40)
    assert cal.info["model_calls"] == len(seen)


def test_conditions_average_over_prompts_with_cfg():
    """A list of extra_args: each condition gets its share of the noises, and every model call sees one."""
    seen = set()

    def model(x, sigma, cond=None, cfg=1.0):
        seen.add((cond, cfg, x.shape[0]))
        return MIXTURE.edm()(x, sigma, cond=cond, cfg=cfg)

    conditions = [{"cond": 0, "cfg": 3.0}, {"cond": 2, "cfg": 3.0}]
    sig = schedule("iia_ddim_cfg", 6)
    cal = calibrate(model, sig, "iia_ddim_cfg", FIT_NOISE[:128], conditions, family="edm", chunk_size=64)
    assert {(c, w) for c, w, _ in seen} == {(0, 3.0), (2, 3.0)}
    assert cal.info["conditions"] == 2
    for cond in conditions:
        ref = MIXTURE.reference(TEST_NOISE[:128], SIGMA_MAX, 0.0, cond=cond["cond"], cfg=3.0, steps_per_unit=100)
        base = rmse(SAMPLERS["iia_ddim_cfg"](MIXTURE.edm(), TEST_NOISE[:128], sig, extra_args=cond, disable=True), ref)
        tuned = rmse(SAMPLERS["iia_ddim_cfg"](MIXTURE.edm(), TEST_NOISE[:128], sig, extra_args=cond, disable=True,
                                              calibration=cal), ref)
        print(f"class {cond['cond']} at cfg 3: {base:.4f} -> {tuned:.4f}")
        assert tuned < base


# ------------------------------------------------------------------ progress, cancel, refusals

def test_progress_reaches_total_and_cancel_stops():
    ticks = []
    sig = schedule("amed_euler", 5)
    calibrate(MIXTURE.edm(), sig, "amed_euler", FIT_NOISE[:40], family="edm", chunk_size=8,
              progress=lambda done, total: ticks.append((done, total)))
    assert ticks and ticks[-1][0] == ticks[-1][1] and [d for d, _ in ticks] == list(range(1, len(ticks) + 1))
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(CalibrationCancelled):
        calibrate(MIXTURE.edm(), sig, "amed_euler", FIT_NOISE[:40], family="edm", chunk_size=8, cancel=cancel)


def test_the_raised_end_probe_reports_progress_from_its_first_chunk():
    """The probe runs before the rest is planned; its share of the bar counts from its first chunk's first step,
    against a total that already holds the stages after it (the recheck of the requested schedule, which only a raise
    adds, comes on top)."""
    model, denoised, ticks = MIXTURE.edm(), [0], []

    def counted(x, sigma, **kw):
        denoised[0] += x.shape[0]
        return model(x, sigma, **kw)
    sig = schedule("iia_dpmpp_2m", 5)
    cal = calibrate(counted, sig, "iia_dpmpp_2m", FIT_NOISE[:40], family="edm", chunk_size=8, fine_steps=3, budget=50,
                    progress=lambda done, total: ticks.append((done, total, denoised[0])))
    assert ticks[0][:2] == (1, ticks[0][1]) and ticks[0][2] == 8 * 3  # one chunk through the first interval
    assert [d for d, _, _ in ticks] == list(range(1, len(ticks) + 1)) and ticks[-1][0] == ticks[-1][1]
    held = 2  # 10 held-out noises in chunks of 8
    raised = cal.info["start_schedule"]["chosen_factor"] != 1
    assert {t for _, t, _ in ticks} == ({ticks[0][1], ticks[0][1] + held} if raised else {ticks[0][1]})


def test_refuses_what_it_cannot_do():
    sig = schedule("iia_ddim", 5)
    with pytest.raises(ValueError, match="needs no calibration"):
        calibrate(MIXTURE.edm(), sig, "gddim", FIT_NOISE[:16])
    with pytest.raises(ValueError, match="unknown sampler"):
        calibrate(MIXTURE.edm(), sig, "euler", FIT_NOISE[:16])
    with pytest.raises(ValueError, match="too small"):
        calibrate(MIXTURE.edm(), sig, "iia_ddim", FIT_NOISE[:2], [{}, {}, {}])
    with pytest.raises(ValueError, match="target"):
        calibrate(MIXTURE.edm(), sig, "iia_ddim", FIT_NOISE[:16], target="endpoint")
    with pytest.raises(ValueError, match="history depth"):
        calibrate(MIXTURE.edm(), sig, "iia_ddim", FIT_NOISE[:16], history=2)


def test_flow_family_calibrates():
    from calibrated_samplers.calibration.testbed.analytic import flow_sigmas
    sig = flow_sigmas(7, shift=3.0)[1:]  # starts below 1, where the exact reference can start

    def start(seed):  # x = (1 - sigma) x0 + sigma n: the marginal at sigma_0
        s0 = float(sig[0])
        return (1 - s0) * MIXTURE.sample_data(128, seed=seed) + s0 * MIXTURE.noise(128, seed=seed + 100)

    cal = calibrate(MIXTURE.flow(), sig, "iia_dpmpp_2m", start(3), family="flow", shift=3.0)
    assert isinstance(cal, Calibration) and cal.family == "flow"
    test = start(4)
    ref = MIXTURE.reference(test, float(sig[0]), 0.0, family="flow", steps_per_unit=100)
    base = rmse(SAMPLERS["iia_dpmpp_2m"](MIXTURE.flow(), test, sig, disable=True, family="flow"), ref)
    tuned = rmse(SAMPLERS["iia_dpmpp_2m"](MIXTURE.flow(), test, sig, disable=True, family="flow", calibration=cal), ref)
    print(f"flow iia_dpmpp_2m 6 steps: {base:.4f} -> {tuned:.4f}")
    assert tuned < base


@pytest.mark.parametrize("name,basis,history,n_terms", [("iia_ddim", "paper", 1, 2), ("iia_ipndm", "paper", 3, 1),
                                                        ("iia_spndm", "paper", 1, 1)])
def test_the_papers_bases_are_an_option(name, basis, history, n_terms, tmp_path):
    """The basis choice travels in the file: the sampler rebuilds the same basis from the options."""
    sig = schedule(name, 6)
    cal = calibrate(MIXTURE.edm(), sig, name, FIT_NOISE, family="edm", basis=basis, history=history)
    assert cal.options["basis"] == basis and cal.params["coeffs"].shape[1] == n_terms * (history + 1)
    cal.save(tmp_path / "c.safetensors")
    loaded = load(tmp_path / "c.safetensors")
    ref = reference(sig)
    base = rmse(SAMPLERS[name](MIXTURE.edm(), TEST_NOISE, sig, disable=True), ref)
    tuned = rmse(SAMPLERS[name](MIXTURE.edm(), TEST_NOISE, sig, disable=True, calibration=loaded), ref)
    print(f"{name} basis={basis} history={history} at 6 evaluations: {base:.4f} -> {tuned:.4f} ({tuned / base:.2f})")
    assert tuned < base
    with pytest.raises(Exception, match="basis"):
        calibrate(MIXTURE.edm(), sig, name, FIT_NOISE[:16], family="edm", basis="nonsense")
