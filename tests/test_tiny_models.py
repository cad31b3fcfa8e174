"""The committed tiny learned models: the files are the ones the project made, and they generate digits."""
import pytest
import torch

from calibrated_samplers.samplers import SAMPLERS
from calibrated_samplers.calibration.testbed import tiny
from calibrated_samplers.calibration.testbed.analytic import flow_sigmas, karras

MODELS = [m for m in tiny.MODELS if m in tiny.SHA256]


@pytest.mark.parametrize("name", sorted(tiny.SHA256))
def test_weight_files_are_the_committed_ones(name):
    assert tiny.file_sha256(tiny.weight_path(name)) == tiny.SHA256[name]


def test_every_shipped_model_is_checked():
    assert set(MODELS) == {"digits-eps", "digits-flow", "digits-eps-narrow"}, \
        "a tiny model lacks its committed weights and hash"


@pytest.mark.parametrize("name", MODELS)
def test_generates_digits_the_classifier_recognises(name):
    """30 digits (3 per class) at 50 steps of DPM-Solver++(2M) with cfg 3: at least 90% recognised."""
    model, clf = tiny.load(name), tiny.load_classifier()
    assert sum(p.numel() for p in model.parameters()) <= 2_000_000
    labels = torch.arange(10).repeat(3)
    x = torch.randn(30, *tiny.IMAGE_SHAPE, generator=torch.Generator().manual_seed(11))
    if model.family == "flow":
        sig = flow_sigmas(50, shift=1.0)
    else:
        sig = karras(50, model.sigma_min, model.sigma_max)
        x = x * float(sig[0])
    out = SAMPLERS["iia_dpmpp_2m"](model, x, sig, extra_args={"cond": labels, "cfg": 3.0}, disable=True,
                                   family=model.family)
    accuracy = (clf(out.clamp(-1, 1)).argmax(1) == labels).float().mean().item()
    print(f"{name}: class accuracy {accuracy:.2f} at 50 steps, cfg 3")
    assert accuracy >= 0.9


def test_classifier_knows_real_digits():
    x, y = tiny.digits_data()
    assert (tiny.load_classifier()(x).argmax(1) == y).float().mean() > 0.97


def test_guidance_batches_cond_and_uncond_in_one_call():
    model = tiny.load("digits-eps")
    calls = []
    net_forward = model.net.forward
    model.net.forward = lambda *a: calls.append(a[0].shape[0]) or net_forward(*a)
    x = torch.randn(4, *tiny.IMAGE_SHAPE)
    model(x, torch.full((4,), 2.0), cond=torch.tensor([1, 2, 3, 4]), cfg=3.0)
    assert calls == [8]
    plain = model(x, torch.full((4,), 2.0), cond=torch.tensor([1, 2, 3, 4]), cfg=1.0)
    assert calls == [8, 4] and plain.shape == x.shape
