"""Uncalibrated samplers against independent references: PyPI k-diffusion's samplers and exact integrals."""
import math

import pytest
import torch

from calibrated_samplers.samplers import SAMPLERS
from calibrated_samplers.samplers.core import Family, adams_bashforth
from calibrated_samplers.samplers.gddim import step_coefficients
from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras

MIXTURE = GaussianMixture()
SCHEDULES = {
    "karras": karras(8, 0.03, 14.6),
    "karras-no-zero": karras(7, 0.1, 14.6, zero=False),
    "uniform": torch.cat([torch.linspace(14.6, 0.5, 9, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]),
}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def refined(sigmas):
    """The grid AMED-Plugin runs its base on when uncalibrated: geometric midpoints between nonzero sigmas."""
    s = sigmas.tolist()
    out = []
    for a, b in zip(s, s[1:]):
        out += [a, math.sqrt(a * b)] if b > 0 else [a]
    return torch.tensor(out + [s[-1]], dtype=torch.float64)


def lms4(K):
    return lambda *a, **kw: K.sample_lms(*a, order=4, **kw)


CASES = [
    # (sampler, options, k-diffusion sampler name or callable, run k-diffusion on the refined grid)
    ("iia_ddim", {}, "sample_euler", False),
    ("iia_ddim_cfg", {}, "sample_euler", False),
    ("iia_edm", {}, "sample_heun", False),
    ("biia_edm", {}, "sample_heun", False),
    ("iia_dpmpp_2m", {}, "sample_dpmpp_2m", False),
    ("iia_ipndm", {"variable_step": True}, lms4, False),
    ("amed", {}, "sample_dpm_2", False),
    ("amed_dpm_2", {}, "sample_dpm_2", False),
    ("amed_euler", {}, "sample_euler", True),
    ("amed_dpmpp_2m", {}, "sample_dpmpp_2m", True),
    ("amed_ipndm", {"variable_step": True}, lms4, True),
    ("gddim", {"order": 1, "corrector": False}, "sample_euler", False),
]


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name,options,kd,on_refined", CASES, ids=[c[0] + ("-v" if c[1] else "") for c in CASES])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_equals_k_diffusion(K, name, options, kd, on_refined, schedule, cfg):
    sig = SCHEDULES[schedule]
    x = MIXTURE.noise(6, 3) * float(sig[0])
    extra = {"cond": torch.tensor([0, 1, 2, 3, 0, 1]), "cfg": cfg}
    model = MIXTURE.edm()
    ours = SAMPLERS[name](model, x, sig, extra_args=extra, disable=True, **options)
    kd_fn = getattr(K, kd) if isinstance(kd, str) else kd(K)
    theirs = kd_fn(model, x.clone(), refined(sig) if on_refined else sig, extra_args=extra, disable=True)
    assert rel(ours, theirs) < 1e-5


def test_fixed_weight_ipndm_is_lms_on_uniform_grid(K):
    """On a uniform grid iPNDM's fixed weights are the exact Adams-Bashforth weights: k-diffusion's lms."""
    sig = torch.linspace(14.6, 0.0, 9, dtype=torch.float64)
    x = MIXTURE.noise(6, 3) * float(sig[0])
    ours = SAMPLERS["iia_ipndm"](MIXTURE.edm(), x, sig, disable=True)
    assert rel(ours, K.sample_lms(MIXTURE.edm(), x.clone(), sig, disable=True, order=4)) < 1e-10


def test_gddim_lambda_one_is_ddim_eta_one(K):
    """The stochastic lambda form at lam = 1, order 1 is DDIM with eta = 1: k-diffusion's euler_ancestral."""
    sig = SCHEDULES["karras"]
    x = MIXTURE.noise(6, 3) * float(sig[0])
    noises = [torch.randn_like(x) for _ in range(len(sig))]

    def noise_sampler():
        it = iter(noises)
        return lambda s, t: next(it)

    ours = SAMPLERS["gddim"](MIXTURE.edm(), x, sig, disable=True, order=1, corrector=False, lam=1.0,
                             noise_sampler=noise_sampler())
    theirs = K.sample_euler_ancestral(MIXTURE.edm(), x.clone(), sig, disable=True, eta=1.0,
                                      noise_sampler=noise_sampler())
    assert rel(ours, theirs) < 1e-10


def test_gddim_seeded_noise_is_reproducible():
    sig = SCHEDULES["karras"]
    x = MIXTURE.noise(3, 3) * float(sig[0])
    a = SAMPLERS["gddim"](MIXTURE.edm(), x, sig, disable=True, lam=0.5, seed=7)
    b = SAMPLERS["gddim"](MIXTURE.edm(), x, sig, disable=True, lam=0.5, seed=7)
    c = SAMPLERS["gddim"](MIXTURE.edm(), x, sig, disable=True, lam=0.5, seed=8)
    d = SAMPLERS["gddim"](MIXTURE.edm(), x, sig, disable=True, lam=0.5, extra_args={"seed": 7})
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


@pytest.mark.parametrize("family", ["ve", "flow"])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_gddim_second_order_weights_are_exact(family, lam):
    """Against the closed form of int kappa e^{-kappa(v'-u)} (D_i + (u - v_i)(D_i - D_{i-1})/h_last) du."""
    fam = Family(family)
    sig = [0.9, 0.6, 0.3, 0.0] if family == "flow" else [14.6, 3.0, 0.7, 0.0]
    v = [fam.half_log_snr(s) for s in sig]
    factor, b, noise_std = step_coefficients(sig, fam, 1, 2, lam)
    kappa, h, h_last = 1 + lam * lam, v[2] - v[1], v[1] - v[0]
    const = 1 - math.exp(-kappa * h)                          # int of kappa e^{-kappa(h - t)} over [0, h]
    slope = h - (1 - math.exp(-kappa * h)) / kappa             # int of kappa e^{-kappa(h - t)} t dt
    alpha = fam.alpha(sig[2])
    expect = [alpha * (const + slope / h_last), -alpha * slope / h_last]
    assert b == pytest.approx(expect, rel=1e-12)
    assert factor == pytest.approx(sig[2] / sig[1] * math.exp(-lam * lam * h), rel=1e-12)
    assert noise_std == pytest.approx(sig[2] * math.sqrt(1 - math.exp(-2 * lam * lam * h)), rel=1e-12, abs=0)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_variable_step_adams_bashforth_integrates_polynomials_exactly(order):
    """Exact variable-step weights integrate every polynomial of degree < order over a non-uniform step."""
    nodes = [2.0, 3.1, 3.7, 5.5][:order]
    target = 0.8
    w = adams_bashforth(nodes, target, variable_step=True)
    for degree in range(order):
        exact = (target ** (degree + 1) - nodes[0] ** (degree + 1)) / (degree + 1)
        assert sum(wj * s ** degree for wj, s in zip(w, nodes)) == pytest.approx(exact, rel=1e-12, abs=1e-12)


def polynomial_velocity_model(coeffs):
    """A model whose ODE is dx/dsigma = p(sigma), independent of x: every solver's result is an exact integral."""
    def model(x, sigma, **kw):
        s = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        p = sum(c * s ** k for k, c in enumerate(coeffs))
        return x - s * p
    return model


def exact_integral(coeffs, a, b):
    return sum(c * (b ** (k + 1) - a ** (k + 1)) / (k + 1) for k, c in enumerate(coeffs))


@pytest.mark.parametrize("name,options,degree", [
    ("iia_spndm", {}, 1), ("iia_spndm", {"variable_step": True}, 1),
    ("iia_edm", {}, 1), ("biia_edm", {}, 1), ("iia_ddim", {}, 0), ("iia_ipndm", {"variable_step": True}, 0),
])
def test_exact_on_polynomial_velocity(name, options, degree):
    """Each method is exact when the velocity is a polynomial in sigma of the degree its order covers
    from the first step on (S-PNDM: Heun start, then 2-step AB; iPNDM: Euler start limits it to constants)."""
    coeffs = [0.3, -0.7][: degree + 1]
    grid = [8.0, 5.0, 4.0, 2.5, 1.0, 0.4] if "variable_step" in options or name not in ("iia_spndm",) \
        else [8.0, 6.5, 5.0, 3.5, 2.0, 0.5]
    sig = torch.tensor(grid, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    out = SAMPLERS[name](polynomial_velocity_model(coeffs), x, sig, disable=True, **options)
    assert torch.allclose(out, x + exact_integral(coeffs, grid[0], grid[-1]), rtol=0, atol=1e-12)
