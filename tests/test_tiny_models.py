"""The committed tiny learned models: the files are the ones the project made, the digits models generate digits, and
the held-out models (other data: procedural RGB shapes and textures) load, denoise their own data and are
deterministic."""
import pytest
import torch

from calibrated_samplers.samplers import SAMPLERS
from calibrated_samplers.calibration import testbed as beds
from calibrated_samplers.calibration.testbed import procedural, tiny
from calibrated_samplers.calibration.testbed.analytic import flow_sigmas, karras

MODELS = [m for m in tiny.MODELS if m in tiny.SHA256]


@pytest.mark.parametrize("name", sorted(tiny.SHA256))
def test_weight_files_are_the_committed_ones(name):
    assert tiny.file_sha256(tiny.weight_path(name)) == tiny.SHA256[name]


def test_every_shipped_model_is_checked():
    assert set(MODELS) == {"digits-eps", "digits-flow", "digits-eps-narrow", "shapes-eps", "textures-flow"}, \
        "a tiny model lacks its committed weights and hash"
    assert set(tiny.HELD_OUT) == {n for n in MODELS if tiny.MODELS[n][3] != "digits"}


@pytest.mark.parametrize("name", [m for m in MODELS if tiny.MODELS[m][3] == "digits"])
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


@pytest.mark.parametrize("name", tiny.HELD_OUT)
def test_held_out_model_loads_and_denoises_deterministically(name):
    """RGB 3x16x16 through the testbed; the same input gives the same output, bit for bit; guidance batches."""
    bed = beds.testbed(name)
    assert bed.shape == (3, 16, 16) and bed.classes == 10 and bed.family == {"eps": "eps", "flow": "flow"}[
        name.split("-")[1]]
    x = torch.randn(6, *bed.shape, generator=torch.Generator().manual_seed(3))
    sigma = torch.full((6,), 0.8)
    a = bed.model(x, sigma, cond=torch.arange(6), cfg=2.0)
    b = beds.testbed(name).model(x.clone(), sigma, cond=torch.arange(6), cfg=2.0)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", tiny.HELD_OUT)
def test_held_out_model_learned_its_data(name):
    """Denoising unseen images of its own data (drawn with a seed training never used) at a middle noise level
    removes most of the noise, and more with the right class than with a wrong one: the model learned that data
    and its classes (an untrained or digits-trained network fails both)."""
    data = tiny.MODELS[name][3]
    x0, labels = procedural.DATA[data](200, torch.Generator().manual_seed(12345))
    bed = beds.testbed(name)
    n = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    sigma = 0.5
    if bed.family == "flow":  # x = (1 - t) x0 + t n
        x, noise_rmse = (1 - sigma) * x0 + sigma * n, sigma * float((n - x0).pow(2).mean().sqrt())
    else:
        x, noise_rmse = x0 + sigma * n, sigma
    right = bed.model(x, torch.full((200,), sigma), cond=labels)
    wrong = bed.model(x, torch.full((200,), sigma), cond=(labels + 5) % 10)
    err_right = float((right - x0).pow(2).mean().sqrt())
    err_wrong = float((wrong - x0).pow(2).mean().sqrt())
    print(f"{name}: denoised RMSE {err_right:.3f} (wrong class {err_wrong:.3f}); noise {noise_rmse:.3f}")
    assert err_right < 0.5 * noise_rmse
    assert err_right < err_wrong


def test_procedural_data_is_seeded_and_in_range():
    for draw in procedural.DATA.values():
        a, la = draw(40, torch.Generator().manual_seed(5))
        b, lb = draw(40, torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and torch.equal(la, lb)
        assert a.shape == (40, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
        assert set(la.tolist()) <= set(range(10)) and a.std() > 0.2
