"""What a calibration says it will spend before it starts (engine.plan, ranges.plan_range) against what it spends.

The spent side is counted outside the code under test where it can be: a model wrapper that counts every sample
it is asked to denoise. The end-to-end stage's backward passes have no such outside count; there the plan is held
to the budget the stage was given and to the stage's own accounting.
"""
import pytest
import torch

from calibrated_samplers.calibration import calibrate
from calibrated_samplers.calibration.engine import plan
from calibrated_samplers.calibration.progress import TimeLeft, planned_text
from calibrated_samplers.calibration.ranges import calibrate_range, plan_range
from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras
from calibrated_samplers.samplers import steps_for_evaluations

MIXTURE = GaussianMixture()
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NOISES = 32


class Counted:
    """The mixture's exact denoiser, counting the samples it denoises."""

    def __init__(self):
        self.model, self.samples = MIXTURE.edm(), 0

    def __call__(self, x, sigma, **kwargs):
        self.samples += x.shape[0]
        return self.model(x, sigma, **kwargs)


def _setting(sampler, evaluations=5):
    steps, zero = steps_for_evaluations(sampler, evaluations)
    sig = karras(steps if zero else steps + 1, SIGMA_MIN, SIGMA_MAX, zero=zero)
    return sig, MIXTURE.noise(NOISES, seed=4, dtype=torch.float64) * SIGMA_MAX


# every stage but the end-to-end one, over the kinds, targets, teachers and options that change the count
EXACT = [
    ("iia_dpmpp_2m", {}),
    ("iia_dpmpp_2m", {"validate": False}),
    ("iia_dpmpp_2m", {"afs": True}),
    ("iia_edm", {"target": "local"}),  # a two-evaluation base, each step's own fine solve
    ("iia_spndm", {}),  # S-PNDM's two-evaluation start, once in the teacher
    ("amed_dpmpp_2m", {}),
    ("amed", {}),
    ("amed_ipndm", {}),  # two solver-option variants, each calibrated
]


@pytest.mark.parametrize("sampler,options", EXACT, ids=[f"{s}-{'-'.join(o) or 'default'}" for s, o in EXACT])
def test_the_plan_counts_every_sample_the_model_denoises(sampler, options):
    sig, noise = _setting(sampler)
    conditions = [{"cond": 0, "cfg": 2.0}, {"cond": 1, "cfg": 2.0}]
    settings = dict(fine_steps=3, chunk_size=8, sigma_min=SIGMA_MIN, end_to_end=False, **options)
    model = Counted()
    calibrate(model, sig, sampler, noise, conditions, **settings)
    planned = plan(sig, sampler, NOISES, conditions, **settings)
    if planned["upper_bound"]:  # AMED's search may find some refinements already tried
        assert 0.8 * planned["total"] <= model.samples <= planned["total"]
    else:
        assert model.samples == planned["total"]
    assert planned["stages"]["end to end"] == 0 and planned["noises"] == NOISES


def test_the_plan_gives_the_end_to_end_stage_the_budget_it_spends():
    sig, noise = _setting("iia_dpmpp_2m", 4)
    noise = noise[:16]
    settings = dict(fine_steps=3, chunk_size=8, sigma_min=SIGMA_MIN)
    cal = calibrate(MIXTURE.edm(), sig, "iia_dpmpp_2m", noise, None, **settings)
    planned = plan(sig, "iia_dpmpp_2m", 16, None, **settings)
    e2e = cal.info["end_to_end"]
    # planned at the highest raise the probe may choose: its teacher steps into 0 from further up
    assert planned["stages"]["raised start"] > 0 and planned["upper_bound"]
    assert planned["stages"]["end to end"] >= e2e["budget"] > 0.95 * planned["stages"]["end to end"]
    spent = cal.info["model_evaluations_per_sample"] + 2 * e2e["backward_evaluations"] / 16
    assert abs(spent - planned["per_noise"]) < 0.05 * planned["per_noise"]


def test_a_range_plan_is_the_sum_of_its_entries():
    noise = MIXTURE.noise(16, seed=2, dtype=torch.float64)

    def schedule(n):
        return karras(n, SIGMA_MIN, SIGMA_MAX)
    settings = dict(fine_steps=2, chunk_size=8, sigma_min=SIGMA_MIN, end_to_end=False)
    model = Counted()
    calibrate_range(model, schedule, "iia_dpmpp_2m", noise, None, steps=(3, 4), share_teacher=False, **settings)
    planned = plan_range(schedule, "iia_dpmpp_2m", 16, None, steps=(3, 4), **settings)
    each = [plan(schedule(n), "iia_dpmpp_2m", 16, None, **settings)["total"] for n in (3, 4)]
    assert planned["total"] == sum(each) == model.samples and planned["entries"] == 2


def test_the_plan_is_said_in_words_and_rides_on_the_time_left():
    planned = {"stages": {"per step fit": 20.0, "end to end": 160.0}, "per_noise": 180.0, "noises": 32,
               "total": 5760.0}
    text = planned_text(planned)
    assert text == ("about 5,760 model evaluations planned (180 per noise for 32 noises, a backward pass counted as "
                    "two; 89% of it the end-to-end stage)")
    left = TimeLeft(clock=lambda: 0.0)
    left.note = text
    assert left.text(0, 10) == f"0%, estimating the time left; {text}"
    assert left.estimate(0, 10) == "0%, estimating the time left"  # what the console repeats
    assert planned_text(dict(planned, time_limit=90.0)).endswith(
        "89% of it the end-to-end stage, which stops after 1.5 min if sooner)")


def test_the_plan_refuses_what_calibrate_refuses():
    sig, _ = _setting("iia_dpmpp_2m")
    with pytest.raises(ValueError, match="fine_steps must be at least 1"):
        plan(sig, "iia_dpmpp_2m", NOISES, fine_steps=0)
    with pytest.raises(ValueError, match="needs no calibration"):
        plan(sig, "gddim", NOISES)
