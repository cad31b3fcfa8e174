"""Orders of convergence against the exact ODE solution, and the same ODE in every family's coordinates."""
import functools
import math

import pytest
import torch

from calibrated_samplers.samplers import SAMPLERS
from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras, rmse, ve_to_flow

MIXTURE = GaussianMixture()
SMOOTH = GaussianMixture(std=0.5, seed=1)  # wider components: the asymptotic range starts at fewer steps
SIGMA_MIN, SIGMA_MAX = 0.05, 14.6
STEPS = (8, 16, 32, 64, 128, 256)

# (sampler, options, order it must show). Multistep methods start with lower-order steps; on this smooth
# problem the start (at high noise, where the trajectory is nearly straight) stays below the asymptotic
# error over these step counts, so the full order shows. Heun-type methods are second order, iPNDM with
# its fixed uniform-grid weights is second order on a non-uniform grid.
ORDERS = [
    ("iia_ddim", {}, 1), ("iia_edm", {}, 2), ("amed", {}, 2), ("amed_euler", {}, 1), ("amed_dpm_2", {}, 2),
    ("iia_dpmpp_2m", {}, 2), ("amed_dpmpp_2m", {}, 2), ("iia_spndm", {}, 2), ("iia_ipndm", {}, 2),
    ("iia_ipndm", {"variable_step": True}, 3), ("amed_ipndm", {"variable_step": True}, 3),
    ("gddim", {"order": 1, "corrector": False}, 1), ("gddim", {"order": 2, "corrector": False}, 2),
    ("gddim", {"order": 3, "corrector": False}, 3), ("gddim", {"order": 4, "corrector": False}, 4),
    ("gddim", {"order": 2, "corrector": True}, 3), ("gddim", {"order": 3, "corrector": True}, 4),
]


@pytest.fixture(scope="module")
def problem():
    x = SMOOTH.noise(8, 11) * SIGMA_MAX
    return x, SMOOTH.reference(x, SIGMA_MAX, SIGMA_MIN, steps_per_unit=400)


@pytest.mark.parametrize("name,options,order", ORDERS, ids=[f"{n}-{o}" for n, o, _ in ORDERS])
def test_order_of_convergence(problem, name, options, order):
    x, ref = problem
    errors = [rmse(SAMPLERS[name](SMOOTH.edm(), x, karras(n + 1, SIGMA_MIN, SIGMA_MAX, zero=False),
                                  disable=True, **options), ref) for n in STEPS]
    slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    print(name, options, "errors", ["%.2e" % e for e in errors], "observed orders", ["%.2f" % s for s in slopes])
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # the finest pairs are in the asymptotic range; one pair alone can be bent by error cancellation
    assert max(slopes[-2:]) > order - 0.35, slopes


def test_reference_solver_is_converged(problem):
    x, ref = problem
    coarse = SMOOTH.reference(x, SIGMA_MAX, SIGMA_MIN, steps_per_unit=200)
    assert rmse(coarse, ref) < 1e-8  # far below the finest error the order tests read (~1e-6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_discrete_eps_and_v_views_give_the_same_samples(name):
    """SD1.x-style eps- and v-prediction networks behind the k-diffusion wrapper are the same ODE as EDM."""
    sig = MIXTURE.discrete_eps().schedule.karras(10)
    x = MIXTURE.noise(4, 5) * float(sig[0])
    edm = SAMPLERS[name](MIXTURE.edm(), x, sig, disable=True)
    for view in (MIXTURE.discrete_eps(), MIXTURE.v_prediction()):
        assert rmse(SAMPLERS[name](view, x, sig, disable=True), edm) < 1e-8


# Euler is DDIM and the exponential integrators are exact in the half-log-SNR in every family, so a flow
# model on the corresponding sigmas follows the same discrete path; the others differ by discretization only.
SAME_PATH = {"iia_ddim", "iia_ddim_cfg", "iia_dpmpp_2m", "gddim"}


@functools.lru_cache(maxsize=None)
def exact_guided(cfg):
    return MIXTURE.reference(MIXTURE.noise(4, 5) * 14.6, 14.6, 0.0, cond=torch.tensor([1, 2, 3, 0]), cfg=cfg)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_flow_coordinates_land_on_the_same_x0(name, cfg):
    extra = {"cond": torch.tensor([1, 2, 3, 0]), "cfg": cfg}
    ve = karras(12, 0.02, 14.6)
    flow = ve_to_flow(ve)
    x = MIXTURE.noise(4, 5) * float(ve[0])
    a = SAMPLERS[name](MIXTURE.edm(), x, ve, extra_args=extra, disable=True)
    b = SAMPLERS[name](MIXTURE.flow(), x * (1 - flow[0]), flow, extra_args=extra, disable=True, family="flow")
    exact = exact_guided(cfg)
    if name in SAME_PATH:
        assert rmse(a, b) < 1e-9
    else:  # both within the method's own error of the exact x0 (at 12 steps, 2nd order)
        assert rmse(b, exact) < 2.5 * rmse(a, exact) + 1e-3
        assert rmse(a, b) < 3e-2
    finer = SAMPLERS[name](MIXTURE.flow(), x * (1 - flow[0]), ve_to_flow(karras(48, 0.02, 14.6)),
                           extra_args=extra, disable=True, family="flow")
    assert rmse(finer, exact) < rmse(b, exact)


@functools.lru_cache(maxsize=None)
def exact_from_pure_noise():
    start = 1 - 1e-9  # the reference starts a hair below 1, where x is noise to 1e-9
    return MIXTURE.reference(MIXTURE.noise(4, 9) * start, start, 0.0, family="flow")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_flow_schedule_from_pure_noise(name):
    """A flow schedule starting at sigma = 1 (alpha = 0, infinite log-SNR), as SD3/Flux schedulers give."""
    noise = MIXTURE.noise(4, 9)
    exact = exact_from_pure_noise()
    errors = []
    for n in (24, 96):
        t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        sig = 3.0 * t / (1 + 2.0 * t)  # SD3's shift 3
        out = SAMPLERS[name](MIXTURE.flow(), noise, sig, disable=True, family="flow", shift=3.0)
        assert torch.isfinite(out).all()
        errors.append(rmse(out, exact))
    # the step into sigma = 0 is first order for every method, so halving is all that is promised
    assert errors[0] < 0.1 and errors[1] < errors[0] / 2, errors
