"""Per-block checkpointing in the end-to-end stage (calibration/blocks.py, issue 30): the same gradients and the same
calibration as without it, and the network left exactly as it was, after a calibration that completes, is cancelled
or fails."""
import pytest
import torch
import torch.nn as nn

from calibrated_samplers.calibration import CalibrationCancelled, calibrate
from calibrated_samplers.calibration.blocks import blocks_of, checkpointed_blocks
from calibrated_samplers.calibration.testbed import testbed as bundled
from calibrated_samplers.samplers import SAMPLERS
from calibrated_samplers.samplers.core import Denoiser, Family, integrate


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.act = nn.Conv2d(c, c, 3, padding=1), nn.SiLU()

    def forward(self, x, scale=1.0):
        return x + scale * self.act(self.conv(x))


class Net(nn.Module):
    """Blocks in a ModuleList and a Sequential, a parameterless module, a keyword argument through a block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv2d(2, 8, 3, padding=1)
        self.down = nn.ModuleList([Block(8), Block(8)])
        self.mid = nn.Sequential(Block(8), nn.Identity())
        self.act = nn.SiLU()
        self.out = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x, sigma):
        sigma = sigma.to(x.dtype)
        h = self.inp(x / (1 + sigma[:, None, None, None] ** 2).sqrt())
        for b in self.down:
            h = b(h, scale=0.5)
        return x - sigma[:, None, None, None] * self.out(self.act(self.mid(h)))


class Wrapper(nn.Module):
    """A host's model around its network (ComfyUI's BaseModel around ``diffusion_model``)."""

    def __init__(self, net):
        super().__init__()
        self.diffusion_model, self.scale = net, nn.Identity()

    def forward(self, x, sigma):
        return self.diffusion_model(x, sigma)


def test_blocks_are_the_highest_modules_with_weights_under_containers_and_wrappers():
    net = Net()
    want = [net.inp, net.down[0], net.down[1], net.mid[0], net.out]
    assert blocks_of(net) == want
    assert blocks_of(Wrapper(net)) == want  # a wrapper around one network gives the network's blocks


@torch.enable_grad()
def _gradient(net, blocks):
    scale = torch.ones((), requires_grad=True)
    sig = [2.0, 1.0, 0.3]
    x0 = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(1)) * 2.0 * scale
    step = SAMPLERS["iia_dpmpp_2m"].stepper(None, {})
    with checkpointed_blocks(net if blocks else None) as n_blocks:
        end = integrate(step, Denoiser(net, x0, torch.tensor(sig, dtype=torch.float64)), x0, sig, Family.of("edm"),
                        checkpoint=True)
        (grad,) = torch.autograd.grad(end.square().mean(), [scale])
    return grad, n_blocks


def test_checkpointed_blocks_give_the_gradient_of_none_and_leave_the_network_as_it_was():
    net = Net().requires_grad_(False)
    plain, none = _gradient(net, blocks=False)
    checkpointed, n_blocks = _gradient(net, blocks=True)
    assert none == 0 and n_blocks == 5
    assert torch.allclose(plain, checkpointed, rtol=1e-6, atol=0)
    assert all("forward" not in b.__dict__ for b in net.modules())


def test_leaving_restores_a_forward_another_patch_had_set_even_after_an_error():
    net = Net()
    own = net.down[0].forward  # an instance forward, as another patch (a hook library) sets it
    net.down[0].forward = own
    with pytest.raises(RuntimeError, match="boom"):
        with checkpointed_blocks(net):
            assert net.down[0].forward is not own and "forward" in net.down[1].__dict__
            raise RuntimeError("boom")
    assert net.down[0].__dict__["forward"] is own
    assert all("forward" not in b.__dict__ for b in net.modules() if b is not net.down[0])


# ------------------------------------------------------------------ through calibrate()
BED = bundled("digits-eps")
SIG = BED.sigmas(3)
NOISE = BED.noise(12, 0, SIG)
FIT = dict(family=BED.family, shift=BED.shift, fine_steps=2, chunk_size=4, budget=6, holdout=0.34, fit_batch=2)


def _state(module):
    """Everything a calibration could leave changed on a module: values, flags, hooks, instance attributes."""
    return ({k: v.clone() for k, v in module.state_dict().items()},
            [(n, p.requires_grad, p.dtype, p.is_inference()) for n, p in module.named_parameters()],
            [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(m.__dict__))
             for n, m in module.named_modules()], module.training)


def _same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


def test_the_calibration_with_blocks_checkpointed_is_the_one_without():
    model = BED.model
    plain = calibrate(model, SIG, "iia_dpmpp_2m", NOISE, **FIT)
    blocks = calibrate(model, SIG, "iia_dpmpp_2m", NOISE, network=model, **FIT)
    curves = [c.info["end_to_end"]["curve"] for c in (plain, blocks)]
    assert curves[0][1][1] != curves[0][0][1]  # its gradient steps moved the held-out error
    assert torch.allclose(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-6)
    assert plain.params.keys() == blocks.params.keys()
    for k, v in plain.params.items():
        assert torch.allclose(v, blocks.params[k], rtol=1e-5, atol=1e-7), k
    assert torch.allclose(plain.sampling_sigmas, blocks.sampling_sigmas, rtol=1e-6)


@pytest.mark.parametrize("ending", ["completes", "cancelled", "fails"])
def test_the_network_is_left_as_it_was_and_samples_the_same(ending):
    model = BED.model
    model.net.time_mlp.register_forward_hook(lambda m, i, o: None)  # a host's hook must survive
    before, image = _state(model), SAMPLERS["iia_dpmpp_2m"](model, NOISE[:2], SIG, extra_args={"cond": 3, "cfg": 2.0})
    patched = [0]  # model calls made while the stage had the blocks patched

    def in_stage():
        patched[0] += any("forward" in m.__dict__ for m in model.modules())
        return patched[0] > 0

    def failing(x, sigma, **kw):
        if ending == "fails" and in_stage():
            raise RuntimeError("out of memory (a stand-in)")
        return model(x, sigma, **kw)
    cancel = in_stage if ending == "cancelled" else None
    try:
        calibrate(failing, SIG, "iia_dpmpp_2m", NOISE, network=model, cancel=cancel, **FIT)
    except (CalibrationCancelled, RuntimeError) as e:
        assert ending != "completes", e
    assert patched[0] > 0 or ending == "completes"  # it did end inside the stage
    _same(before, _state(model))
    again = SAMPLERS["iia_dpmpp_2m"](model, NOISE[:2], SIG, extra_args={"cond": 3, "cfg": 2.0})
    assert torch.equal(image, again)
    model.net.time_mlp._forward_hooks.clear()


# ------------------------------------------------------------------ the backward passes planned by the free memory
class FakeMemory:
    """A device whose free memory and per-noise backward peak the test sets (DeviceMemory's interface)."""

    def __init__(self, free, per_noise):
        self.free_bytes, self.per_noise, self.probes = free, per_noise, 0

    def free(self):
        return self.free_bytes

    def peak(self, work):
        work()
        self.probes += 1
        return self.per_noise


def _with_memory(monkeypatch, memory, **options):
    from calibrated_samplers.calibration import end_to_end as E
    monkeypatch.setattr(E, "device_memory", lambda device: memory)
    return calibrate(BED.model, SIG, "iia_dpmpp_2m", NOISE, network=BED.model, **dict(FIT, **options))


def test_a_small_free_memory_cuts_the_backward_passes_to_what_fits_and_learns_the_same(monkeypatch):
    gib = 2 ** 30
    roomy = _with_memory(monkeypatch, FakeMemory(free=100 * gib, per_noise=gib), budget=12, fit_batch=4)
    tight_memory = FakeMemory(free=3 * gib, per_noise=gib)  # 80% of 3 GiB holds 2 noises' backward passes
    tight = _with_memory(monkeypatch, tight_memory, budget=12, fit_batch=4)
    assert tight_memory.probes == 1
    assert roomy.info["end_to_end"]["backward_chunk"] == 4  # whole chunks
    assert tight.info["end_to_end"]["backward_chunk"] == 2  # chunk_size 4 cut in two
    assert tight.info["model_calls"] > roomy.info["model_calls"]  # smaller calls, more of them
    curves = [c.info["end_to_end"]["curve"] for c in (roomy, tight)]
    assert len({rmse for _, rmse in curves[0]}) > 1  # its steps moved the held-out error
    assert torch.allclose(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-5)


def test_where_one_noise_does_not_fit_the_stage_is_skipped_with_a_message_the_user_sees(monkeypatch):
    from calibrated_samplers import hosts
    cal = _with_memory(monkeypatch, FakeMemory(free=2 ** 30, per_noise=2 ** 31))
    e2e = cal.info["end_to_end"]
    assert e2e["rounds"] == 0 and e2e["best_round"] == 0 and e2e["steps"] == 0
    assert "skipped" in e2e["skipped"] and "2.00 GiB" in e2e["skipped"] and "1.00 GiB is free" in e2e["skipped"]
    assert hosts.warnings_of(cal) == [e2e["skipped"]]
    assert cal.info["end_to_end"]["held_out_rmse"] == e2e["start_held_out_rmse"]  # the per-step fit stands
