"""The end-to-end stage: it finds a known optimum, touches only the calibration's numbers, never ends worse than
its start on the held-out share, does not depend on chunking, and a file with learned time steps samples on them.
"""
import math

import pytest
import torch

from calibrated_samplers.calibration import calibrate, load
from calibrated_samplers.calibration import end_to_end as E
from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras
from calibrated_samplers.samplers import SAMPLERS, Family

MIXTURE = GaussianMixture()
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002


class IsotropicGaussian(torch.nn.Module):
    """Data N(0, s^2 I): D(x, sigma) = x s^2 / (s^2 + sigma^2). ``weight`` (exactly 1) requires grad, as a
    network's weights may in a UI: the calibration must leave it alone."""

    def __init__(self, s=0.5):
        super().__init__()
        self.s2 = s * s
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, sigma, **unused):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return self.weight * x * self.s2 / (self.s2 + s * s)


def dpmpp_2m_two_steps(s0, s1, s2, var):
    """Endpoint / start of DPM-Solver++(2M) on [s0, s1, s2, 0] for N(0, var I) data, written out from Lu et al.
    (2022) independently of the pack: DDIM first, the 2M extrapolation second, the denoiser into 0."""
    kappa = lambda v: var / (var + v * v)  # noqa: E731  (D = kappa x)
    x1 = s1 / s0 + (1 - s1 / s0) * kappa(s0)
    h, h_last = math.log(s1 / s2), math.log(s0 / s1)
    r = h_last / h
    d = (1 + 1 / (2 * r)) * kappa(s1) * x1 - (1 / (2 * r)) * kappa(s0)
    x2 = (s2 / s1) * x1 + (1 - s2 / s1) * d
    return kappa(s2) * x2


def test_learns_the_known_optimal_time_step():
    """One interior sigma of a 3-step DPM-Solver++(2M), learned alone (LD3-style), lands on the optimum.

    The exact ODE maps x to x sqrt((s^2 + s2^2) / (s^2 + s0^2)) down to s2, then the last step denoises. No s1 reaches
    that factor here, so the endpoint error is least where the solver's factor is largest: argmax over s1 of the
    closed form above (golden-section search). The teacher (200 sub-steps) matches the exact ODE to ~1e-6.
    """
    model, var = IsotropicGaussian(), 0.25
    s0, s2 = 2.0, 0.2
    gain = lambda s1: dpmpp_2m_two_steps(s0, s1, s2, var)  # noqa: E731
    exact = math.sqrt((var + s2 * s2) / (var + s0 * s0)) * var / (var + s2 * s2)
    lo, hi = s2 * 1.01, s0 * 0.99
    for _ in range(200):
        a, b = lo + 0.382 * (hi - lo), hi - 0.382 * (hi - lo)
        lo, hi = (a, hi) if gain(a) < gain(b) else (lo, b)
    best = 0.5 * (lo + hi)
    assert gain(best) < exact  # the optimum is interior and unique
    start = torch.tensor([s0, 1.6, s2, 0.0], dtype=torch.float64)  # deliberately far from it
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s0
    cal = calibrate(model, start, "iia_dpmpp_2m", noise, family="edm", fine_steps=200, sigma_min=s2,
                    learn_params=False, learn_sigmas="interior", optimizer="lbfgs", budget=5000)
    learned = cal.sample_sigmas
    assert learned is not None and learned[0] == s0 and learned[2] == s2 and learned[3] == 0
    print(f"learned s1 {float(learned[1]):.5f}, optimum {best:.5f}")
    assert float(learned[1]) == pytest.approx(best, rel=0.01)
    assert torch.equal(cal.sigmas, start) and not cal.params["coeffs"].any()  # key unchanged, solver plain
    assert model.weight.grad is None


def _golden_max(f, lo, hi):
    for _ in range(200):
        a, b = lo + 0.382 * (hi - lo), hi - 0.382 * (hi - lo)
        lo, hi = (a, hi) if f(a) < f(b) else (lo, b)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("floor", [0.05, 0.6])
def test_learns_the_known_optimal_last_positive_sigma(floor):
    """[s0, s1, 0]: DDIM to s1, then the denoiser. For N(0, var I) data the endpoint is x kappa(s1) (s1/s0 + (1 -
    s1/s0) kappa(s0)), below the exact ODE's factor for every s1, so the best s1 maximises it; the learned last
    positive sigma lands there, or, when that lies below the model's sigma_min, at sigma_min and never below."""
    model, var, s0 = IsotropicGaussian(), 0.25, 2.0
    kappa = lambda v: var / (var + v * v)  # noqa: E731
    gain = lambda s1: kappa(s1) * (s1 / s0 + (1 - s1 / s0) * kappa(s0))  # noqa: E731
    best = _golden_max(gain, 1e-3, s0)
    assert gain(best) < math.sqrt(var / (var + s0 * s0))  # no s1 is exact: the optimum is the maximum
    assert 0.05 < best < 0.6  # one floor below the optimum, one above it
    start = torch.tensor([s0, 1.2, 0.0], dtype=torch.float64)
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s0
    cal = calibrate(model, start, "iia_dpmpp_2m", noise, family="edm", fine_steps=200, sigma_min=floor,
                    learn_params=False, optimizer="lbfgs", budget=5000)
    learned = float(cal.sample_sigmas[1])
    print(f"floor {floor}: learned {learned:.5f}, optimum {best:.5f}")
    if best > floor:
        assert learned == pytest.approx(best, rel=0.01)
    else:
        assert floor <= learned <= floor * 1.01
    assert torch.equal(cal.sigmas, start)


def test_start_schedule_raises_the_last_sigma_where_the_plain_solver_ends_closest():
    """Before the fit, the last positive sigma is raised by the factor whose plain DPM-Solver++(2M) ends closest to the
    teacher; on Gaussian data that is the factor whose closed-form endpoint (above) is nearest the exact ODE's."""
    from calibrated_samplers.calibration.engine import END_FACTORS
    model, var = IsotropicGaussian(), 0.25
    s0, s1, s2 = 2.0, 0.5, 0.01
    exact = math.sqrt(var / (var + s0 * s0))
    errors = {}
    for f in END_FACTORS:
        lowest = s2 * f
        if f > 1 and math.log(s0 / lowest) < 0.25 * math.log(s0 / s2):
            break
        # the interior sigma keeps its place in log sigma relative to the span
        t = math.log(s0 / s1) / math.log(s0 / s2)
        mid = s0 * (lowest / s0) ** t
        errors[f] = abs(dpmpp_2m_two_steps(s0, mid, lowest, var) - exact)
    best = min(errors, key=errors.get)
    assert 1.0 < best < max(errors)  # a raised end helps, and not the largest one tried
    start = torch.tensor([s0, s1, s2, 0.0], dtype=torch.float64)
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s0
    cal = calibrate(model, start, "iia_dpmpp_2m", noise, family="edm", fine_steps=200, sigma_min=s2, budget=20)
    info = cal.info["start_schedule"]
    print({f: round(e, 5) for f, e in errors.items()}, info)
    assert info["factors"] == list(errors) and info["chosen_factor"] == best
    assert torch.equal(cal.sigmas, start) and cal.sample_sigmas is not None and float(cal.sample_sigmas[2]) > s2


def test_a_raised_start_that_does_worse_on_held_out_noises_gives_way_to_the_requested_schedule(monkeypatch):
    """The final check compares with the plain solver on the schedule the user asked for: forced to start from a
    last sigma raised 16x (worse than none on Gaussian data, by the closed form above) and given no budget to move,
    the calibration is the plain solver on the requested schedule."""
    from calibrated_samplers.calibration import engine
    model, var = IsotropicGaussian(), 0.25
    s0, s1, s2 = 2.0, 0.5, 0.01
    exact = math.sqrt(var / (var + s0 * s0))
    mid = s0 * (16 * s2 / s0) ** (math.log(s0 / s1) / math.log(s0 / s2))
    assert abs(dpmpp_2m_two_steps(s0, mid, 16 * s2, var) - exact) > abs(dpmpp_2m_two_steps(s0, s1, s2, var) - exact)
    monkeypatch.setattr(engine, "END_FACTORS", (16.0,))
    start = torch.tensor([s0, s1, s2, 0.0], dtype=torch.float64)
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s0
    cal = calibrate(model, start, "iia_dpmpp_2m", noise, family="edm", fine_steps=200, sigma_min=s2,
                    learn_params=False, budget=1)
    info = cal.info["start_schedule"]
    assert info["chosen_factor"] == 16.0 and info["kept_requested"]
    assert info["requested_held_out_rmse"] < cal.info["end_to_end"]["held_out_rmse"]
    assert cal.sample_sigmas is None and not cal.params["coeffs"].any() and cal.info["strength"] == 0.0
    fn = SAMPLERS["iia_dpmpp_2m"]
    torch.testing.assert_close(fn(model, noise, start, disable=True, calibration=cal),
                               fn(model, noise, start, disable=True), rtol=0, atol=0)


def test_with_its_numbers_learned_a_losing_raise_gives_way_to_the_per_step_fit_on_the_requested_schedule():
    """On the mixture (iia_spndm, 10 evaluations, these 256 noises) the probe raises the last sigma 3x, and the fit
    on that schedule then ends farther from the teacher on the held-out noises than the plain solver as asked: the
    calibration is the per-step fit on the requested schedule, exactly, with the attempt's cost counted."""
    from calibrated_samplers.samplers import steps_for_evaluations
    steps, zero = steps_for_evaluations("iia_spndm", 10)
    sig = karras(steps if zero else steps + 1, SIGMA_MIN, SIGMA_MAX, zero=zero)
    noise = MIXTURE.noise(256, seed=1) * SIGMA_MAX
    cal = calibrate(MIXTURE.edm(), sig, "iia_spndm", noise, family="edm", budget=1)
    info = cal.info["start_schedule"]
    assert info["chosen_factor"] > 1 and info["kept_requested"]
    assert info["requested_held_out_rmse"] < cal.info["raised_attempt"]["end_to_end"]["held_out_rmse"]
    alone = calibrate(MIXTURE.edm(), sig, "iia_spndm", noise, family="edm", end_to_end=False)
    assert cal.sample_sigmas is None and torch.equal(cal.params["coeffs"], alone.params["coeffs"])
    assert cal.info["model_evaluations_per_sample"] == pytest.approx(
        alone.info["model_evaluations_per_sample"] + cal.info["raised_attempt"]["model_evaluations_per_sample"])


def test_gradients_reach_the_leaves_and_not_the_model():
    from calibrated_samplers.calibration.engine import _Run
    model = IsotropicGaussian()
    sig = karras(5, 0.05, 10.0)
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10.0
    run = _Run(model, sig, noise, [{}], Family("edm"), 16, 0.25, None, None, None)
    params = {k: torch.full((5,), v, dtype=torch.float64) for k, v in (("r", 0.5), ("c", 1.0), ("a", 1.0))}
    learn = E.Learnable("amed", params, run.sig, learn_sigmas=True)
    stage = E.Stage(run, "amed_euler", {}, learn, torch.zeros_like(noise))
    stage.gradient(stage.fit)
    for name, leaf in learn.leaves.items():
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, name
    assert model.weight.grad is None
    assert stage.forward > 0 and stage.backward > 0
    # checkpointing re-ran each step's evaluations in the backward pass: twice the forward evaluations
    assert stage.forward == 2 * stage.backward


def test_never_ends_worse_than_its_start_on_held_out_noises():
    sig = karras(6, SIGMA_MIN, SIGMA_MAX)
    noise = MIXTURE.noise(64, seed=5) * SIGMA_MAX
    start = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", noise, family="edm", end_to_end=False)
    # "interior": no raised start schedule, so the start is exactly the sequential fit above
    wild = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", noise, family="edm", learning_rate=30.0, budget=300,
                     learn_sigmas="interior")
    e2e = wild.info["end_to_end"]
    assert e2e["held_out_rmse"] <= e2e["start_held_out_rmse"]
    assert e2e["best_round"] == 0  # every step made it worse: the start is kept, exactly
    assert torch.equal(wild.params["coeffs"], start.params["coeffs"]) and wild.sample_sigmas is None
    # from a raised start schedule the kept start is the fit on that schedule, and the file samples on it
    raised = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", noise, family="edm", learning_rate=30.0, budget=300)
    assert raised.info["end_to_end"]["best_round"] == 0
    factor = raised.info["start_schedule"]["chosen_factor"]
    if factor == 1.0:
        assert raised.sample_sigmas is None
    else:
        assert float(raised.sample_sigmas[-2]) == pytest.approx(float(sig[-2]) * factor, rel=1e-9)
        assert raised.sample_sigmas[0] == sig[0] and torch.equal(raised.sigmas, sig)
    tuned = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", noise, family="edm", budget=300)
    assert tuned.info["end_to_end"]["held_out_rmse"] <= tuned.info["end_to_end"]["start_held_out_rmse"]


def test_the_measured_rate_moves_the_endpoints_by_the_asked_share_of_their_error():
    """Adam's real first step at the measured rate (not the linearisation the rate was measured by) moves the fit
    noises' endpoints by about ``step_fraction`` of their error, on two models (data scales 0.5 and 0.05)."""
    from calibrated_samplers.calibration.engine import _Run
    sig = karras(5, 0.05, 10.0)
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10.0
    rates = []
    for s in (0.5, 0.05):
        model = IsotropicGaussian(s)
        run = _Run(model, sig, noise, [{}], Family("edm"), 16, 0.25, None, None, None)
        params = {k: torch.full((5,), v, dtype=torch.float64) for k, v in (("r", 0.5), ("c", 1.0), ("a", 1.0))}
        learn = E.Learnable("amed", params, run.sig, learn_sigmas=False)
        # the exact ODE's endpoint: x sqrt(s^2 / (s^2 + sigma_0^2)) (the teacher, without sub-stepping)
        target = run.x0 * math.sqrt(s * s / (s * s + 100.0))
        for fraction in (0.1, 0.5):
            stage = E.Stage(run, "amed_euler", {}, learn, target, step_fraction=fraction)
            with torch.enable_grad():
                stage.gradient(stage.fit)
            groups = [{"params": learn.parameters(), "scale": 1.0}]
            lr = stage.measured_lr(stage.fit, groups)
            with torch.no_grad():
                before = torch.cat([stage._endpoint(ch, grad=False)[0] for ch in stage.fit])
                error = (before - target[:before.shape[0]]).pow(2).mean().sqrt()
                saved = learn.state()
                torch.optim.Adam(learn.parameters(), lr=lr).step()
                after = torch.cat([stage._endpoint(ch, grad=False)[0] for ch in stage.fit])
                learn.load_state(saved)
            moved = (after - before).pow(2).mean().sqrt()
            assert float(moved / error) == pytest.approx(fraction, rel=0.25), (s, fraction)
            rates.append(lr)
    assert rates[1] == pytest.approx(5 * rates[0], rel=0.05)  # linear in the fraction


def test_stage_cannot_help_where_the_start_is_already_exact():
    """Gaussian data, time steps fixed: the per-step fit of IIA-DPM-Solver++(2M) is already exact on this linear
    model, so no change of the coefficients can lower the endpoint error. At the measured rate (its own measure of a
    tiny error) the stage must still end no worse than its start on the held-out share."""
    model = IsotropicGaussian()
    sig = karras(5, 0.05, 10.0)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10.0
    start = calibrate(model, sig, "iia_dpmpp_2m", noise, family="edm", fine_steps=20, end_to_end=False)
    cal = calibrate(model, sig, "iia_dpmpp_2m", noise, family="edm", fine_steps=20, budget=100, learn_sigmas=False)
    e2e = cal.info["end_to_end"]
    assert e2e["learning_rate_measured"]
    assert e2e["held_out_rmse"] <= e2e["start_held_out_rmse"]
    if e2e["best_round"] == 0:
        assert torch.equal(cal.params["coeffs"], start.params["coeffs"])


def test_the_held_out_share_vetoes_an_iterate_only_for_a_worse_mean_or_no_typical_gain():
    """Per-noise squared errors of 40 held-out noises: one far-off noise carries much of the mean, as a noise whose
    trajectory ends near another mode does."""
    start = torch.full((40,), 0.01, dtype=torch.float64)
    start[0] = 1.0
    better = start * 0.5  # every noise closer
    assert E.held_out_accepts(better, start, 1.0)
    lucky = start.clone()
    lucky[0] = 0.5  # the mean falls by a third, but only the one far-off noise moved
    assert not E.held_out_accepts(lucky, start, 1.0)
    typical = start * 0.25
    typical[0] = 1.4  # every typical noise 2x closer, the far-off one farther: the mean rises
    assert not E.held_out_accepts(typical, start, 1.0)
    typical[0] = 1.0  # ... and with the far-off one unchanged it is a gain
    assert E.held_out_accepts(typical, start, 1.0)


def test_keeps_the_settled_last_iterate():
    """On Gaussian data (smooth: no noise ends in another mode) the stage's last iterate is its result. The time steps
    alone are learned: the per-step fit of any IIA basis is already exact on this linear model."""
    model = IsotropicGaussian()
    sig = karras(5, 0.05, 10.0)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10.0
    cal = calibrate(model, sig, "iia_dpmpp_2m", noise, family="edm", fine_steps=20, budget=300,
                    learn_params=False, learn_sigmas="interior")
    e2e = cal.info["end_to_end"]
    assert e2e["rounds"] > 1 and e2e["best_round"] == e2e["rounds"]
    assert e2e["held_out_rmse"] == e2e["curve"][-1][1] < e2e["start_held_out_rmse"]


@pytest.mark.parametrize("name, fit_batch", [("iia_dpmpp_2m", "all"), ("iia_dpmpp_2m", 24), ("amed_dpmpp_2m", 24)])
def test_chunk_size_changes_nothing_but_rounding(name, fit_batch):
    """Full batch, and minibatches drawn by noise (the chunks only cut the work): the same result."""
    sig = karras(5, SIGMA_MIN, SIGMA_MAX)
    noise = MIXTURE.noise(96, seed=12) * SIGMA_MAX
    # a rate at which this toy's stage takes a result from the raised start schedule in each case (at 0.003 it keeps
    # its start for amed_dpmpp_2m, and then the test would compare nothing learned); at 0.01 the toy's component
    # switches in the first, large steps amplify the rounding until the last iterates differ by 0.4%
    kw = dict(family="edm", fit_batch=fit_batch, budget=150, learning_rate=0.005)
    one = calibrate(MIXTURE.edm(), sig, name, noise, chunk_size=96, **kw)
    many = calibrate(MIXTURE.edm(), sig, name, noise, chunk_size=5, **kw)
    assert one.info["end_to_end"]["best_round"] > 0
    assert one.info["start_schedule"] == many.info["start_schedule"]  # the probe is chunked too
    # Adam divides by the gradients' own size, so summation-order rounding grows over ~100 iterations to ~1e-5
    # relative, far below what a different draw of minibatches changes
    for k in one.params:
        torch.testing.assert_close(one.params[k], many.params[k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(one.sample_sigmas, many.sample_sigmas, rtol=1e-5, atol=0)


def test_end_to_end_lowers_the_held_out_error_further():
    """On noises it never saw, the end-to-end result beats the sequential fit it started from (exact reference).

    Per noise, by the median: on this mixture a few percent of the noises end in another component whatever the
    solver (errors near 1, the rest near 0.01-0.1), and those few carry the plain RMSE; the count of such
    noises may move by one either way, the typical error must drop.
    """
    sig = karras(5, SIGMA_MIN, SIGMA_MAX)
    fit, test = MIXTURE.noise(128, seed=7) * SIGMA_MAX, MIXTURE.noise(256, seed=8) * SIGMA_MAX
    ref = MIXTURE.reference(test, SIGMA_MAX, 0.0, steps_per_unit=100)
    seq = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", fit, family="edm", end_to_end=False)
    # at the defaults: the rate measured on this model (a fixed 0.02, chosen on the digit models, threw this toy's
    # noises between components from one check to the next, and the stage kept its start)
    e2e = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", fit, family="edm")
    assert e2e.info["end_to_end"]["learning_rate_measured"] and e2e.info["end_to_end"]["best_round"] > 0
    fn = SAMPLERS["iia_dpmpp_2m"]
    errors = [(fn(MIXTURE.edm(), test, sig, disable=True, calibration=c) - ref).flatten(1).pow(2).mean(1).sqrt()
              for c in (None, seq, e2e)]
    medians = [float(e.median()) for e in errors]
    switched = [int((e > 0.5).sum()) for e in errors]
    print("plain / sequential / end to end: median", [f"{m:.4f}" for m in medians], "switched", switched)
    assert medians[2] < 0.5 * medians[1] < 0.5 * medians[0]
    assert switched[2] <= switched[1] + 1 < switched[0]


def test_learned_time_steps_are_what_sampling_uses(tmp_path):
    sig = karras(5, SIGMA_MIN, SIGMA_MAX)
    noise = MIXTURE.noise(128, seed=7) * SIGMA_MAX
    # a learning rate small enough that the mixture's component switches do not throw the run about (this test is
    # about what the file does with learned time steps, not how fast they are found)
    cal = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", noise, family="edm", budget=200, learning_rate=0.003)
    assert cal.sample_sigmas is not None and not torch.equal(cal.sample_sigmas, cal.sigmas)
    path = tmp_path / "learned.safetensors"
    cal.save(path)
    loaded = load(path)
    assert torch.equal(loaded.sample_sigmas, cal.sample_sigmas)
    assert all(torch.equal(loaded.params[k], cal.params[k]) for k in cal.params)
    fn, x = SAMPLERS["iia_dpmpp_2m"], MIXTURE.noise(8, seed=10) * SIGMA_MAX
    raw = {k: v for k, v in cal.params.items()}  # a raw mapping is never checked: sampled on the sigmas given
    on_learned = fn(MIXTURE.edm(), x, cal.sample_sigmas, disable=True, calibration=raw)
    with_file = fn(MIXTURE.edm(), x, sig, disable=True, calibration=loaded)
    torch.testing.assert_close(with_file, on_learned, rtol=0, atol=0)
    # given the learned sigmas (the nodes' SIGMAS output) instead of the requested ones: the same
    torch.testing.assert_close(fn(MIXTURE.edm(), x, cal.sample_sigmas, disable=True, calibration=loaded), on_learned,
                               rtol=0, atol=0)
    seen = []
    fn(MIXTURE.edm(), x, sig, disable=True, calibration=loaded, callback=lambda d: seen.append(float(d["sigma"])))
    assert seen == [float(s) for s in cal.sample_sigmas[:-1]]
    assert fn.evaluations(cal.sample_sigmas) == fn.evaluations(sig)


def test_time_limit_and_budget_bound_the_stage():
    sig = karras(5, SIGMA_MIN, SIGMA_MAX)
    noise = MIXTURE.noise(32, seed=11) * SIGMA_MAX
    cal = calibrate(MIXTURE.edm(), sig, "amed_euler", noise, family="edm", budget=50)
    e2e = cal.info["end_to_end"]
    # the budget is checked between iterations: at most one iteration (4 equivalents per step per fit noise) over
    assert e2e["evaluations_per_sample"] <= 50 + 4 * 2 * 5
    assert e2e["forward_evaluations"] > 0 and e2e["budget"] == 50
    quick = calibrate(MIXTURE.edm(), sig, "amed_euler", noise, family="edm", budget=1e9, time_limit=0.0)
    assert quick.info["end_to_end"]["rounds"] == 0


class HalfPrecisionMixture(torch.nn.Module):
    """The analytic mixture's denoiser behind a bfloat16 layer, as ComfyUI runs fp16/bf16 checkpoints: the input
    is cast down, the frozen weight is bf16, the output comes back in the input's dtype."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x, sigma, **kw):
        d = MIXTURE.edm()(x.double(), sigma.double(), **kw).to(torch.bfloat16) * self.scale
        return d.to(x.dtype) + 0 * x  # x's dtype, and a path for the gradient through the bf16 values


def test_a_bfloat16_model_calibrates_end_to_end_with_float_parameters():
    sig = karras(5, SIGMA_MIN, SIGMA_MAX).float()
    noise = (MIXTURE.noise(64, seed=14) * SIGMA_MAX).float()
    cal = calibrate(HalfPrecisionMixture(), sig, "iia_dpmpp_2m", noise, family="edm", budget=60)
    e2e = cal.info["end_to_end"]
    assert e2e["rounds"] > 0 and math.isfinite(e2e["held_out_rmse"])
    assert e2e["held_out_rmse"] <= e2e["start_held_out_rmse"]
    assert cal.params["coeffs"].dtype == torch.float64 and torch.isfinite(cal.params["coeffs"]).all()
    if cal.sample_sigmas is not None:
        assert cal.sample_sigmas.dtype == torch.float64


def test_normal_tensors_copies_inference_tensors_wherever_the_conditioning_keeps_them():
    """The web UIs build conditioning under inference mode as named tuples of lists of objects holding tensors
    or dicts of them (SDXL); autograd cannot save those for backward, so the stage gets normal copies."""
    import collections
    Scheduled = collections.namedtuple("Scheduled", "end_at_step cond")

    class Composable:
        def __init__(self, schedules, weight):
            self.schedules, self.weight = schedules, weight
    with torch.inference_mode():
        a, b = torch.randn(2, 3), torch.randn(4)
        made = [[Composable([Scheduled(4, a), Scheduled(8, {"crossattn": a, "vector": b})], 1.0)]]
        net = torch.nn.Linear(3, 3)
    normal = E.normal_tensors(made)
    first, second = normal[0][0].schedules
    assert isinstance(first, Scheduled) and first.end_at_step == 4 and normal[0][0].weight == 1.0
    for t, like in ((first.cond, a), (second.cond["crossattn"], a), (second.cond["vector"], b)):
        assert not t.is_inference() and torch.equal(t, like)
    assert made[0][0].schedules[0].cond.is_inference()  # the web UI's own objects are left as they were
    plain = [torch.ones(2), {"k": "v"}]
    assert E.normal_tensors(plain) is plain
    assert E.normal_weights(net) == 2 and not any(p.is_inference() or p.requires_grad for p in net.parameters())
    x = torch.randn(5, 3, requires_grad=True)
    with torch.enable_grad():
        net(x).sum().backward()  # weights that autograd can save
    assert x.grad is not None


def test_a_small_batch_takes_as_many_steps_as_a_large_one():
    """The stage's budget is per noise, so a fixed minibatch gave 32 noises 1/8 of the Adam steps 256 get (too few to
    settle: digits-eps cfg 1, 5 evaluations, 32 noises, test RMSE 0.0356 at minibatch 16, 0.0285 at 2). By default
    the minibatch shrinks with the batch, and the same budget per noise buys about the same number of steps."""
    sig = karras(5, 0.05, 10.0)
    kw = dict(family="edm", fine_steps=4, budget=200, learn_params=False, learn_sigmas="interior")

    def stage(n, **more):
        noise = torch.randn(n, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 10.0
        return calibrate(IsotropicGaussian(), sig, "iia_dpmpp_2m", noise, **kw, **more).info["end_to_end"]

    small, large = stage(32), stage(256)
    assert (small["batch"], large["batch"]) == (E.MIN_BATCH, E.MAX_BATCH)
    assert 0.7 < small["steps"] / large["steps"] < 1.3
    fixed = stage(32, fit_batch=E.MAX_BATCH)  # the old default: the steps fall with the batch
    assert fixed["batch"] == E.MAX_BATCH and fixed["steps"] < 0.2 * large["steps"]
    assert stage(32, fit_batch="all")["batch"] == 24  # every fit noise (32 less the held-out 8) in each step
