"""The ComfyUI node logic without ComfyUI: fingerprints, the calibration library, the residual picture, the
sampler functions ComfyUI calls, the Calibrate node's run, registration and both node APIs (stand-ins in
tests/comfy_standins.py; tests/test_comfyui_integration.py runs the real server)."""
import logging
import os

import pytest
import torch

from calibrated_samplers.calibration import Calibration, calibrate, load
from calibrated_samplers.calibration.identity import fingerprint
from calibrated_samplers.calibration.library import Library, ModelMismatch, check_model, no_match_message
from calibrated_samplers.calibration.engine import plan
from calibrated_samplers.calibration.picture import residual_image
from calibrated_samplers.calibration.progress import planned_text
from calibrated_samplers import hosts
from calibrated_samplers.nodes import declare, runtime
from calibrated_samplers.samplers import SAMPLERS, CalibrationMismatch
from calibrated_samplers.tests import comfy_standins as cs
from calibrated_samplers.calibration.testbed.analytic import karras

SIGMAS = karras(6, 0.03, 14.6).float()


def denoiser(patcher=None, cfg=3.0):
    return cs.Denoiser(cs.Guider(patcher or cs.Patcher(), cfg))


def fitted(method="iia_dpmpp_2m", patcher=None, cfg=3.0, sigmas=SIGMAS, n=24, **info):
    """A calibration made through the same entry the Calibrate node uses, for ``patcher`` at ``cfg``."""
    model = denoiser(patcher, cfg)
    fp = runtime.model_fingerprint(model.inner_model.model_patcher)
    noise = cs.MIXTURE.noise(n, seed=1, dtype=torch.float32) * float(sigmas[0])
    # these files feed the library's choice, not a test of the stage: a fixed minibatch of 16 keeps the toy's
    # overhead-bound Adam steps few (the default's minibatch of 2 took the slowest test from 12 s to 66 s)
    return calibrate(model, sigmas, method, noise, fine_steps=4, fit_batch=16,
                     info={"cfg": cfg, "fingerprint": fp["id"], "fingerprint_detail": fp, **info})


# ---------------------------------------------------------------------------------------------- identity
def named(patcher):
    return list(patcher.model.diffusion_model.state_dict().items())


def test_fingerprint_ignores_storage_dtype_and_sees_weights_prediction_shift_and_patches():
    p = cs.Patcher()
    base = runtime.model_fingerprint(p)
    half = cs.Patcher()
    half.model.diffusion_model.half()
    assert runtime.model_fingerprint(half)["id"] == base["id"]
    assert runtime.model_fingerprint(cs.Patcher(seed=1))["id"] != base["id"]
    assert runtime.model_fingerprint(cs.Patcher(cs.ModelSamplingContinuousEDM()))["id"] != base["id"]
    assert (runtime.model_fingerprint(cs.Patcher(cs.ModelSamplingDiscreteFlow(3.0)))["id"]
            != runtime.model_fingerprint(cs.Patcher(cs.ModelSamplingDiscreteFlow(1.0)))["id"])
    lora = cs.Patcher()
    lora.patches = {"diffusion_model.proj": [(0.8, ("lora", (torch.ones(2, 8), torch.ones(16, 2))), 1.0, None, None)]}
    with_lora = runtime.model_fingerprint(lora)
    assert with_lora["id"] != base["id"] and with_lora["patch_count"] == 1
    with pytest.raises(ModelMismatch, match="different LoRAs"):
        check_model(Calibration("iia_ddim", SIGMAS, {"coeffs": torch.zeros(6, 2)},
                                info={"fingerprint": base["id"], "fingerprint_detail": base}), with_lora)


def test_fingerprint_reads_the_unpatched_weight_when_a_patch_replaced_it_in_place():
    p = cs.Patcher()
    base = runtime.model_fingerprint(p)["id"]
    original = p.model.diffusion_model.norm.detach().clone()
    with torch.no_grad():
        p.model.diffusion_model.norm += 1.0  # ComfyUI patches in place and keeps the original in .backup
    assert runtime.model_fingerprint(p)["id"] != base
    p.backup["diffusion_model.norm"] = type("Backup", (), {"weight": original})()
    assert runtime.model_fingerprint(p)["id"] == base


def test_fingerprint_sees_every_kind_of_weight_but_not_storage_dtype_or_order():
    a = fingerprint([("b", torch.ones(3)), ("w", torch.ones(3, 3))], "eps", "ve")
    b = fingerprint([("w", torch.ones(3, 3, dtype=torch.float16)), ("b", torch.ones(3, dtype=torch.float16))], "eps", "ve")
    c = fingerprint([("b", torch.ones(3) * 2), ("w", torch.ones(3, 3))], "eps", "ve")
    d = fingerprint([("b", torch.ones(3)), ("w", torch.ones(3, 3) * 2)], "eps", "ve")  # only a conv/linear differs
    assert a["id"] == b["id"] and len({a["id"], c["id"], d["id"]}) == 3
    assert a["rule"] == "cs2" and a["tensors_hashed"] == 1 and a["tensors_sampled"] == 1
    many = [(f"w{k:02d}", torch.full((40, 40), float(k))) for k in range(50)]
    assert fingerprint(many, "eps", "ve")["tensors_sampled"] == 16


def cs1_id(named, prediction, family, shift=1.0):
    """The first rule, re-implemented from its published description: 1-D tensors only."""
    import hashlib
    import json
    h = hashlib.sha256()
    for name, t in sorted((kv for kv in named if kv[1].ndim == 1), key=lambda kv: kv[0])[:32]:
        h.update(name.encode())
        h.update(t[:4096].to(torch.float16).numpy().tobytes())
    ident = {"rule": "cs1", "weights": h.hexdigest()[:16], "prediction": prediction, "family": family,
             "shift": round(shift, 6), "patches": "none"}
    return "cs1-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def test_files_made_with_the_first_fingerprint_rule_still_match(tmp_path):
    p = cs.Patcher()
    fp = runtime.model_fingerprint(p)
    named = list(p.model.diffusion_model.state_dict().items())
    assert fp["cs1_id"] == cs1_id(named, "eps", "ve")
    old = Calibration("iia_dpmpp_2m", SIGMAS, {"coeffs": torch.zeros(6, 4)}, info={"fingerprint": fp["cs1_id"]})
    old.save(tmp_path / "old.safetensors")
    cal, _, _ = Library(lambda: [str(tmp_path / "old.safetensors")]).find("iia_dpmpp_2m", SIGMAS, "ve", fp)
    assert cal is not None
    other = runtime.model_fingerprint(cs.Patcher(seed=5))
    with pytest.raises(ModelMismatch, match="another model"):
        check_model(old, other)


def test_family_of_comfy_model_sampling_classes():
    assert runtime.prediction_of(cs.ModelSamplingDiscrete()) == "eps"
    assert runtime.prediction_of(cs.ModelSamplingContinuousEDM()) == "edm"
    fam = runtime.family_of(cs.ModelSamplingDiscreteFlow(3.0))
    assert (fam.name, fam.shift) == ("flow", 3.0)
    assert runtime.family_of(cs.ModelSamplingContinuousEDM()).name == "ve"


# ---------------------------------------------------------------------------------------------- library
def test_library_picks_the_newest_match_and_says_why_others_missed(tmp_path):
    p = cs.Patcher()
    good = fitted(patcher=p)
    good.save(tmp_path / "a_good.safetensors")
    fitted(patcher=p).save(tmp_path / "b_newer.safetensors")
    os.utime(tmp_path / "a_good.safetensors", ns=(1, 1))
    fitted(patcher=p, cfg=5.0).save(tmp_path / "c_cfg.safetensors")
    fitted(patcher=cs.Patcher(seed=7)).save(tmp_path / "d_other.safetensors")
    fitted(patcher=p, sigmas=karras(5, 0.03, 14.6).float()).save(tmp_path / "e_steps.safetensors")
    fitted("iia_ddim", patcher=p).save(tmp_path / "f_method.safetensors")
    (tmp_path / "g_broken.safetensors").write_bytes(b"not a file")
    lib = Library(lambda: sorted(str(f) for f in tmp_path.iterdir()))
    fp = runtime.model_fingerprint(p)
    cal, path, notes = lib.find("iia_dpmpp_2m", SIGMAS, "ve", fp, 3.0)
    assert os.path.basename(path) == "b_newer.safetensors" and cal.method == "iia_dpmpp_2m"
    text = "\n".join(notes)
    assert "c_cfg.safetensors: was made for cfg 5" in text
    assert "d_other.safetensors: was made for another model (different weights" in text
    assert "e_steps.safetensors: calibration was made for 5 steps" in text
    assert "g_broken.safetensors: unreadable" in text
    assert "f_method" not in text
    assert lib.find("iia_dpmpp_2m", SIGMAS, "flow", fp, 3.0)[0] is None  # family mismatch
    assert lib.find("iia_dpmpp_2m", SIGMAS, "ve", fp, 4.0)[0] is None
    # files made for this model come first, the damaged one next, another model's last
    order = [n.split(":")[0] for n in notes]
    assert order == ["c_cfg.safetensors", "e_steps.safetensors", "g_broken.safetensors", "d_other.safetensors"]


def test_library_prefers_a_file_fitted_at_the_run_size_and_says_when_it_uses_another(tmp_path, caplog):
    p = cs.Patcher()
    fp = runtime.model_fingerprint(p)
    fitted(patcher=p, latent_shape=[4, 4, 4]).save(tmp_path / "a_small.safetensors")
    fitted(patcher=p, latent_shape=[4, 8, 8]).save(tmp_path / "b_large.safetensors")
    os.utime(tmp_path / "b_large.safetensors", ns=(1, 1))  # the larger is the older
    lib = Library(lambda: sorted(str(f) for f in tmp_path.iterdir()))

    def picked(shape):
        return os.path.basename(lib.find("iia_dpmpp_2m", SIGMAS, "ve", fp, 3.0, shape)[1])
    assert picked((4, 8, 8)) == "b_large.safetensors"  # the run's size beats the newer file
    assert picked((4, 7, 7)) == "b_large.safetensors"  # 49 vs 64 positions: within SIZE_TOLERANCE of the large
    assert picked((4, 4, 4)) == "a_small.safetensors"
    # beyond SIZE_TOLERANCE of both, the nearer wins: 36 positions are 2.25x 16 and 1/1.78 of 64; 25: 1.56x and 1/2.56
    assert picked((4, 6, 6)) == "b_large.safetensors" and picked((4, 5, 5)) == "a_small.safetensors"
    assert picked(None) == "a_small.safetensors"  # no size known: the newest, as before
    # a file of unknown size (no latent_shape) comes after one known to fit the run's size, before one known not to
    fitted(patcher=p).save(tmp_path / "c_unknown.safetensors")
    os.utime(tmp_path / "c_unknown.safetensors", ns=(2, 2))
    assert picked((4, 8, 8)) == "b_large.safetensors" and picked((4, 16, 16)) == "c_unknown.safetensors"

    # sampling with a file fitted at another size uses it and says so in the console
    (tmp_path / "c_unknown.safetensors").unlink()
    (tmp_path / "a_small.safetensors").unlink()
    x = cs.MIXTURE.noise(2, seed=9, dtype=torch.float32) * float(SIGMAS[0])  # 4 x 4 x 4: a quarter of 8 x 8
    with caplog.at_level(logging.WARNING, logger="calibrated_samplers"):
        out = runtime.dropdown_sampler("iia_dpmpp_2m", lib)(denoiser(p), x, SIGMAS)
    assert "b_large.safetensors was fitted on 8x8 latents and this run's are 4x4" in caplog.text
    expected = SAMPLERS["iia_dpmpp_2m"](denoiser(p), x, SIGMAS, calibration=load(tmp_path / "b_large.safetensors"))
    assert torch.equal(out, expected)
    caplog.clear()
    fitted(patcher=p, latent_shape=[4, 4, 4]).save(tmp_path / "d_own.safetensors")
    os.utime(tmp_path / "d_own.safetensors", ns=(0, 0))  # the oldest, but fitted at the run's size
    with caplog.at_level(logging.INFO, logger="calibrated_samplers"):
        runtime.dropdown_sampler("iia_dpmpp_2m", lib)(denoiser(p), x, SIGMAS)
    assert "using d_own.safetensors" in caplog.text and "was fitted on" not in caplog.text


def test_a_file_that_fits_all_but_the_cfg_is_named_before_one_for_another_schedule(tmp_path):
    """The toast shows the first note: the file that only needs another cfg is the closest, whatever its name."""
    p = cs.Patcher()
    fitted(patcher=p, sigmas=karras(5, 0.03, 14.6).float()).save(tmp_path / "a_steps.safetensors")
    fitted(patcher=p, cfg=5.0).save(tmp_path / "z_cfg.safetensors")
    lib = Library(lambda: sorted(str(f) for f in tmp_path.iterdir()))
    _, _, notes = lib.find("iia_dpmpp_2m", SIGMAS, "ve", runtime.model_fingerprint(p), 3.0)
    assert [n.split(":")[0] for n in notes] == ["z_cfg.safetensors", "a_steps.safetensors"]


def test_no_match_message_lists_every_file_or_counts_the_rest():
    notes = [f"f{k}.safetensors: was made for cfg 5" for k in range(11)]
    text = no_match_message("amed_euler", SAMPLERS["amed_euler"].uncalibrated, SIGMAS, 3.0, notes, "calibrate")
    assert all(f"f{k}.safetensors" in text for k in range(8)) and "f8.safetensors" not in text
    assert "... and 3 more files passed over" in text
    # amed_euler without a file is not Euler: it evaluates each step's midpoint too
    assert "UNCALIBRATED: euler on the schedule with each step's geometric-mean sigma added" in text
    assert "more files" not in no_match_message("x", "y", SIGMAS, 3.0, notes[:8], "calibrate")


def test_a_damaged_file_is_named_once_even_when_another_file_matches(tmp_path, caplog):
    p = cs.Patcher()
    fitted(patcher=p).save(tmp_path / "good.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    lib = Library(lambda: sorted(str(f) for f in tmp_path.iterdir()))
    x = cs.MIXTURE.noise(2, seed=9, dtype=torch.float32) * float(SIGMAS[0])
    with caplog.at_level(logging.WARNING, logger="calibrated_samplers"):
        for _ in range(3):
            runtime.dropdown_sampler("iia_dpmpp_2m", lib)(denoiser(p), x, SIGMAS)
    assert caplog.text.count("skipped the damaged file broken.safetensors") == 1
    caplog.clear()
    (tmp_path / "broken.safetensors").write_bytes(b"damaged again, differently")  # a new version: named again
    with caplog.at_level(logging.WARNING, logger="calibrated_samplers"):
        runtime.dropdown_sampler("iia_dpmpp_2m", lib)(denoiser(p), x, SIGMAS)
    assert caplog.text.count("skipped the damaged file broken.safetensors") == 1


# ---------------------------------------------------------------------------------------------- picture
def test_residual_image_is_a_labelled_chart_of_steps_and_endpoint_errors():
    from calibrated_samplers.calibration import picture
    endpoint = [{"strength": 1.0, "rmse": 0.08}, {"strength": 0.0, "rmse": 0.2}, {"stage": "end_to_end", "rmse": 0.05}]
    cal = Calibration("iia_ddim", SIGMAS, {"coeffs": torch.zeros(6, 2)},
                      residual_before=torch.tensor([1.0, 0.5, 0.2, 0.1, 0.05, 0.01]),
                      residual_after=torch.tensor([0.5, 0.4, 0.1, 0.1, 0.04, 0.01]),
                      fallback=torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
                      info={"cfg": 5.0, "schedule": "karras, 6 steps", "endpoint_rmse_held_out": endpoint})
    assert picture.endpoint_errors(cal) == (0.2, 0.08, 0.05)
    assert picture.title_of(cal) == "iia_ddim, 6 steps, karras, cfg 5"
    img = residual_image(cal)
    assert img.shape == (360, 768, 3) and img.min() >= 0 and img.max() <= 1
    pixels = (img * 255).round()

    def where(colour):
        return (pixels - torch.tensor(colour, dtype=torch.float32)).abs().sum(-1) < 1

    split = int(768 * 0.62)
    green, red, grey, blue = (where(getattr(picture, c)) for c in ("GREEN", "RED", "GREY", "BLUE"))
    assert green[:, :split].any() and grey[:, :split].any() and not blue[:, :split].any()
    slot = (split - 20 - 58) / 6  # the step chart's axis runs from x = 58 to split - 20, six slots
    red_columns = red[:360 - 64, :split].any(0).nonzero().flatten()  # above the axis (the legend is below it)
    assert 58 + 3 * slot <= red_columns.min() and red_columns.max() < 58 + 4 * slot  # the fourth step fell back
    heights = green[:360 - 64, :split].sum(0)
    assert heights[:int(58 + slot)].max() > heights[int(58 + 5 * slot):split].max()  # step 1's bar is the taller
    assert blue[:, split:].sum(0).max() < grey[:, split:].sum(0).max()  # end to end below the base solver
    ink = where(picture.INK)
    assert ink[:30].any() and ink[-40:, split:].any()  # the title, and the gain written under the endpoint chart
    bare = residual_image(Calibration("iia_ddim", SIGMAS, {"coeffs": torch.zeros(6, 2)}))
    assert bare.shape == (360, 768, 3)  # an old or schedule-only file still gets a picture


# ---------------------------------------------------------------------------------------------- sampler functions
def test_dropdown_sampler_uses_the_matching_file(tmp_path):
    p = cs.Patcher()
    cal = fitted(patcher=p)
    cal.save(tmp_path / "mine.safetensors")
    lib = Library(lambda: [str(tmp_path / "mine.safetensors")])
    x = cs.MIXTURE.noise(4, seed=9, dtype=torch.float32) * float(SIGMAS[0])
    model = denoiser(p)
    seen = []
    out = runtime.dropdown_sampler("iia_dpmpp_2m", lib)(model, x, SIGMAS, extra_args={"seed": 0},
                                                        callback=seen.append, disable=True)
    want = SAMPLERS["iia_dpmpp_2m"](denoiser(p), x, SIGMAS, calibration=load(tmp_path / "mine.safetensors"))
    plain = SAMPLERS["iia_dpmpp_2m"](denoiser(p), x, SIGMAS)
    assert torch.equal(out, want) and not torch.equal(out, plain)
    assert len(seen) == 6 and {"x", "i", "sigma", "denoised"} <= set(seen[0])  # ComfyUI's previews hang off this


def test_a_file_with_learned_time_steps_samples_on_them_in_every_node_path(comfy, tmp_path):
    """KSampler's dropdown (given the scheduler's sigmas) and the sampler nodes (given their SIGMAS output) both
    run on the learned schedule, with the file's parameters, exactly as the plain sampler call does."""
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    p = cs.Patcher()
    fp = runtime.model_fingerprint(p)
    learned = SIGMAS.double().clone()
    learned[1:-2] = learned[1:-2] * torch.tensor([0.9, 1.1, 0.95, 1.05], dtype=torch.float64)
    coeffs = torch.zeros(6, 4, dtype=torch.float64)
    coeffs[1:, 1] = 0.01
    cal = Calibration("iia_dpmpp_2m", SIGMAS, {"coeffs": coeffs, "a": torch.full((6,), 1.02, dtype=torch.float64)},
                      info={"cfg": 3.0, "fingerprint": fp["id"], "fingerprint_detail": fp}, sample_sigmas=learned)
    cal.save(tmp_path / "models" / "calibrated_samplers" / "learned.safetensors")
    x = cs.MIXTURE.noise(4, seed=9, dtype=torch.float32) * float(SIGMAS[0])
    want = SAMPLERS["iia_dpmpp_2m"](denoiser(p), x, learned.float(), calibration=dict(cal.params))
    plain_call = SAMPLERS["iia_dpmpp_2m"](denoiser(p), x, SIGMAS, calibration=cal)
    seen = []
    dropdown = runtime.dropdown_sampler("iia_dpmpp_2m", pack.LIBRARY)(denoiser(p), x, SIGMAS, callback=seen.append)
    classes, _ = declare.build(pack.NODES)
    sampler, node_sigmas, _ = classes["CalibratedSamplersSamplerFromFile"]().run(calibration_file="learned.safetensors")
    assert torch.equal(node_sigmas, learned.float())
    node = sampler.sampler_function(denoiser(p), x, node_sigmas, **sampler.extra_options)
    for out in (plain_call, dropdown, node):
        assert torch.equal(out, want)
    assert [float(d["sigma"]) for d in seen] == [float(s) for s in learned.float()[:-1]]


def test_dropdown_sampler_without_a_match_runs_the_base_and_warns(tmp_path, caplog):
    p = cs.Patcher()
    fitted(patcher=p, cfg=5.0).save(tmp_path / "cfg5.safetensors")
    lib = Library(lambda: [str(tmp_path / "cfg5.safetensors")])
    x = cs.MIXTURE.noise(4, seed=9, dtype=torch.float32) * float(SIGMAS[0])
    with caplog.at_level(logging.WARNING, logger="calibrated_samplers"):
        out = runtime.dropdown_sampler("iia_dpmpp_2m", lib)(denoiser(p, cfg=3.0), x, SIGMAS)
    assert torch.equal(out, SAMPLERS["iia_dpmpp_2m"](denoiser(p, cfg=3.0), x, SIGMAS))
    assert "UNCALIBRATED: the dpmpp_2m solver" in caplog.text and "Fit calibration" in caplog.text
    assert "cfg5.safetensors: was made for cfg 5" in caplog.text


def test_dropdown_sampler_passes_the_flow_family():
    p = cs.Patcher(cs.ModelSamplingDiscreteFlow(3.0))
    sig = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    x = cs.MIXTURE.noise(3, seed=2, dtype=torch.float32)
    out = runtime.dropdown_sampler("gddim", Library(list))(denoiser(p), x, sig)
    assert torch.equal(out, SAMPLERS["gddim"](denoiser(p), x, sig, family="flow", shift=3.0))
    assert not torch.equal(out, SAMPLERS["gddim"](denoiser(p), x, sig, family="ve"))


def test_calibrated_sampler_refuses_another_models_file_unless_allowed(caplog):
    cal = fitted(patcher=cs.Patcher(seed=3))
    x = cs.MIXTURE.noise(2, seed=9, dtype=torch.float32) * float(SIGMAS[0])
    with pytest.raises(ModelMismatch, match="mine.safetensors was made for another model"):
        runtime.sample_calibrated(denoiser(), x, SIGMAS, calibration=cal, label="mine.safetensors")
    with caplog.at_level(logging.WARNING, logger="calibrated_samplers"):
        out = runtime.sample_calibrated(denoiser(cfg=4.0), x, SIGMAS, calibration=cal, allow_other_model=True)
    assert torch.equal(out, SAMPLERS["iia_dpmpp_2m"](denoiser(cfg=4.0), x, SIGMAS, calibration=cal))
    assert "allowed by allow_other_model" in caplog.text and "was made for cfg 3" in caplog.text
    with pytest.raises(CalibrationMismatch, match="this run has 5"):
        runtime.sample_calibrated(denoiser(patcher=cs.Patcher(seed=3)), x, karras(5, 0.03, 14.6), calibration=cal)


def test_calibration_run_scales_the_whole_batch_like_comfy_and_walks_every_prompt():
    """The SAMPLER function of the Calibrate node equals calibrate() on the batch scaled as ComfyUI scales noise."""
    noise = cs.MIXTURE.noise(16, seed=4, dtype=torch.float32)
    first = noise[:4].clone()
    job = hosts.Job("iia_ddim", noise, 2, {"fine_steps": 3, "chunk_size": 4}, {"seed": 4}, first_noise=first)
    guider = cs.CFGGuider(cs.Patcher())
    guider.set_cfg(2.0)
    model = cs.Denoiser(guider)
    scale = 4.0  # a power of two, so the scaled batch is exact in float32 and the comparison can be tight
    runtime.sample_calibration_run(model, first * scale, SIGMAS, extra_args={"seed": 4}, job=job)
    assert model.prompts_seen == {0, 1}
    fp = runtime.model_fingerprint(guider.model_patcher)
    assert job.result.info["fingerprint"] == fp["id"] and job.result.info["cfg"] == 2.0

    def direct(x, sigma, prompt=0, **kw):
        guider.active_prompt = prompt
        return model(x, sigma, **kw)
    sigma_min = guider.model_patcher.get_model_object("model_sampling").sigma_min  # the teacher stops there
    want = calibrate(direct, SIGMAS, "iia_ddim", noise * scale, [{"seed": 4, "prompt": k} for k in range(2)],
                     fine_steps=3, chunk_size=4, sigma_min=sigma_min)
    assert job.result.info["sigma_min"] == sigma_min
    assert torch.equal(job.result.params["coeffs"], want.params["coeffs"])
    assert (job.result.sample_sigmas is None) == (want.sample_sigmas is None)
    if want.sample_sigmas is not None:
        assert torch.equal(job.result.sample_sigmas, want.sample_sigmas)


class WeightedDenoiser(cs.Denoiser):
    """A stand-in whose output passes through the network's weight, as a real one's does (autograd saves it)."""

    def __call__(self, x, sigma, **kw):
        proj = self.inner_model.model_patcher.model.diffusion_model.proj
        touch = (x.flatten(1)[:, :8].to(proj.dtype) @ proj.T).sum() * 0
        return super().__call__(x, sigma, **kw) + touch


def test_end_to_end_runs_on_a_model_loaded_in_inference_mode(monkeypatch):
    """ComfyUI loads models and runs nodes under torch.inference_mode: the weights are inference tensors, which
    autograd cannot save; the Calibrate node's run turns them into normal ones first (and never lets them learn)."""
    def run():
        with torch.inference_mode():
            patcher = cs.Patcher()
            noise = cs.MIXTURE.noise(16, seed=4, dtype=torch.float32)
            job = hosts.Job("iia_dpmpp_2m", noise, 1, {"fine_steps": 3, "chunk_size": 8, "budget": 60}, {},
                            first_noise=noise[:4].clone())
            guider = cs.CFGGuider(patcher)
            guider.set_cfg(1.0)
            runtime.sample_calibration_run(WeightedDenoiser(guider), noise[:4] * 14.6, SIGMAS, job=job)
        return job.result, patcher

    cal, patcher = run()
    assert cal.info["end_to_end"]["forward_evaluations"] > 0
    weights = list(patcher.model.diffusion_model.parameters())
    assert not any(w.is_inference() or w.requires_grad or w.grad is not None for w in weights)
    monkeypatch.setattr(runtime, "normal_weights", lambda module: 0)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        run()


def test_prompt_pairs_and_their_errors():
    pos, neg = [["p0", {}], ["p1", {}]], [["n0", {}], ["n1", {}]]
    assert runtime.prompt_conds(pos, neg, 5.0) == [([pos[0]], [neg[0]]), ([pos[1]], [neg[1]])]
    assert runtime.prompt_conds(pos, neg[:1], 5.0) == [([pos[0]], neg[:1]), ([pos[1]], neg[:1])]
    assert runtime.prompt_conds(pos, None, 1.0) == [([pos[0]], None), ([pos[1]], None)]
    with pytest.raises(ValueError, match="no negative CONDITIONING"):
        runtime.prompt_conds(pos, None, 5.0)
    with pytest.raises(ValueError, match="needs a positive"):
        runtime.prompt_conds([], neg, 5.0)


def test_output_path_and_latent_shape(tmp_path):
    from calibrated_samplers.calibration.requests import output_path
    assert output_path(str(tmp_path), "sd15 v2.safetensors", False) == str(tmp_path / "sd15 v2.safetensors")
    for bad in ("../evil", "a/b", "", "..", "/abs", "two\nlines", "tab\there", "x" * 201):
        with pytest.raises(ValueError, match="not usable|at most 200"):
            output_path(str(tmp_path), bad, False)
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="turn on overwrite"):
        output_path(str(tmp_path), "taken", False)
    assert output_path(str(tmp_path), "taken", True).endswith("taken.safetensors")
    p = cs.Patcher()
    assert runtime.latent_shape(p, 512, 768) == (4, 96, 64)
    assert runtime.latent_shape(p, 1, 1, {"samples": torch.zeros(1, 16, 5, 8, 8)}) == (16, 5, 8, 8)
    video = cs.LatentFormat()
    video.latent_dimensions = 3
    with pytest.raises(ValueError, match="connect a LATENT"):
        runtime.latent_shape(cs.Patcher(latent_format=video), 512, 512)


# ---------------------------------------------------------------------------------------------- the pack in (stand-in) ComfyUI
@pytest.fixture
def comfy(monkeypatch, tmp_path):
    return cs.install(monkeypatch, str(tmp_path))


def test_dropdown_registration_appends_once_in_place_and_keeps_comfys_own(comfy, caplog):
    from calibrated_samplers.nodes import pack
    ksampler_names, sampler_names = comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES
    comfy.k_sampling.sample_gddim = lambda *a, **k: None  # pretend ComfyUI grew its own "gddim"
    with caplog.at_level(logging.WARNING, logger="calibrated_samplers"):
        added = pack.register_dropdown()
        pack.register_dropdown()
    assert comfy.samplers.KSAMPLER_NAMES is ksampler_names and comfy.samplers.SAMPLER_NAMES is sampler_names
    assert "gddim" not in added and "already has a sampler 'gddim'" in caplog.text
    assert set(added) == set(SAMPLERS) - {"gddim"}
    for names in (ksampler_names, sampler_names):
        assert [n for n in names if n in SAMPLERS] == added  # once each, after ComfyUI's own
    assert ksampler_names[:3] == ["euler", "dpmpp_2m", "ipndm"] and comfy.samplers.SCHEDULER_NAMES == ["simple", "karras", "normal"]
    assert comfy.k_sampling.sample_iia_ddim.calibrated_samplers


def test_models_folder_is_registered_and_merged(comfy, tmp_path):
    from calibrated_samplers.nodes import pack
    comfy.folder_paths.folder_names_and_paths["calibrated_samplers"] = (["/elsewhere"], {".bin"})
    pack.register_folder()
    pack.register_folder()
    paths, exts = comfy.folder_paths.folder_names_and_paths["calibrated_samplers"]
    assert paths == ["/elsewhere", str(tmp_path / "models" / "calibrated_samplers")]
    assert exts == {".bin", ".safetensors"}


def test_classic_nodes_declare_inputs_and_outputs(comfy):
    from calibrated_samplers.nodes import pack
    classes, names = declare.build(pack.NODES)
    calib = classes["CalibratedSamplersCalibrate"]
    types = calib.INPUT_TYPES()
    assert list(types["required"])[:3] == ["model", "positive", "cfg"]
    assert types["required"]["scheduler"][0] == ["simple", "karras", "normal"]
    assert types["required"]["method"][0] == [n for n, f in SAMPLERS.items() if f.kind != "plain"]
    assert types["required"]["seed"][1]["control_after_generate"] is True
    assert set(types["optional"]) == {"negative", "latent", "sigmas", "chunk_size", "overwrite", "end_to_end",
                                      "learn_sigmas", "max_minutes", "more_steps", "cfg_list", "denoise_list", "afs"}
    assert calib.RETURN_TYPES == ("CALIBRATION", "SIGMAS", "IMAGE") and calib.OUTPUT_NODE
    assert names["CalibratedSamplersCalibrate"] == "Fit calibration (run once, saves a file)"
    assert classes["CalibratedSamplersSampler"].RETURN_TYPES == ("SAMPLER", "SIGMAS")


def test_calibrate_node_writes_a_file_the_sampler_nodes_use(comfy, tmp_path):
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    classes, _ = declare.build(pack.NODES)
    patcher = cs.Patcher()
    pos, neg = [["p0", {}], ["p1", {}]], [["n", {}]]
    cal, sigmas, image = classes["CalibratedSamplersCalibrate"]().run(
        model=patcher, positive=pos, negative=neg, cfg=2.0, method="iia_dpmpp_2m", scheduler="karras", steps=5,
        fine_steps=3, batch_size=8, seed=3, filename="mine", width=32, height=32, chunk_size=4)
    path = tmp_path / "models" / "calibrated_samplers" / "mine.safetensors"
    saved = load(path)
    assert torch.equal(saved.params["coeffs"], cal.params["coeffs"]) and saved.info["prompts"] == 2
    assert saved.info["cfg"] == 2.0 and saved.info["schedule"] == "karras, 5 steps"
    assert image.shape == (1, 360, 768, 3) and torch.equal(sigmas, cal.sampling_sigmas.float())
    assert comfy.bars and comfy.bars[0].values[-1][0] == comfy.bars[0].values[-1][1]  # the bar reached its end
    # the node's text says what the work will spend from its first report on (engine.plan's figure)
    planned = plan(comfy.samplers.calculate_sigmas(None, "karras", 5), "iia_dpmpp_2m", 8, [{}, {}], fine_steps=3,
                   chunk_size=4, sigma_min=patcher.get_model_object("model_sampling").sigma_min)
    assert comfy.texts[0][0].startswith("calibrating: 1%, estimating the time left; about ")
    assert all(text.endswith(planned_text(planned)) for text, _ in comfy.texts)
    with pytest.raises(FileExistsError):
        classes["CalibratedSamplersCalibrate"]().run(
            model=patcher, positive=pos, negative=neg, cfg=2.0, method="iia_dpmpp_2m", scheduler="karras", steps=5,
            fine_steps=3, batch_size=8, seed=3, filename="mine", width=32, height=32)
    sampler, sig, loaded = classes["CalibratedSamplersSamplerFromFile"]().run(calibration_file="mine.safetensors")
    assert sampler.extra_options["label"] == "mine.safetensors" and torch.equal(sig, sigmas)
    with pytest.raises(CalibrationMismatch, match="5 steps, this run has 6"):
        classes["CalibratedSamplersSampler"]().run(calibration=loaded, sigmas=karras(6, 0.03, 14.6))
    x = cs.MIXTURE.noise(2, seed=1, dtype=torch.float32) * float(sig[0])
    guider = cs.Guider(patcher, 2.0)
    guider.active_prompt = 1
    out = sampler.sampler_function(cs.Denoiser(guider), x, sig, **sampler.extra_options)
    assert torch.equal(out, SAMPLERS["iia_dpmpp_2m"](cs.Denoiser(guider), x, sig, calibration=saved))


def test_calibrate_node_with_afs_writes_a_file_the_dropdown_samples_with_one_evaluation_fewer(comfy, tmp_path):
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    patcher = cs.Patcher()
    pack.calibrate_node(patcher, [["p0", {}]], 2.0, "iia_dpmpp_2m", "karras", 5, 3, 8, 0, "first_free", 32, 32,
                        negative=[["n", {}]], chunk_size=4, end_to_end=False, afs=True)
    saved = load(tmp_path / "models" / "calibrated_samplers" / "first_free.safetensors")
    assert saved.options == {"afs": True}
    sig = comfy.samplers.calculate_sigmas(None, "karras", 5)
    x = cs.MIXTURE.noise(2, seed=9, dtype=torch.float32) * float(sig[0])
    model = denoiser(patcher, 2.0)
    out = runtime.dropdown_sampler("iia_dpmpp_2m", pack.LIBRARY)(model, x, sig)
    assert model.calls == 4  # 5 steps, the first without the model
    assert torch.equal(out, SAMPLERS["iia_dpmpp_2m"](model, x, sig, calibration=saved))
    with pytest.raises(ValueError, match="pure noise"):
        pack.calibrate_node(patcher, [["p0", {}]], 2.0, "iia_dpmpp_2m", "karras", 5, 3, 8, 0, "mixed", 32, 32,
                            negative=[["n", {}]], chunk_size=4, end_to_end=False, afs=True, denoise_list="1, 0.5")


def test_calibrate_node_over_ranges_writes_one_file_that_every_listed_setting_finds(comfy, tmp_path):
    """more_steps, cfg_list and denoise_list: one file; KSampler's dropdown finds it at each step count and denoise,
    interpolates between the fitted cfgs, and outside them runs the base solver with a toast in the browser."""
    from calibrated_samplers.calibration.file import CalibrationSet
    from calibrated_samplers.calibration.entries import denoise_schedule
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    patcher = cs.Patcher()
    result, sigmas, image = pack.calibrate_node(
        patcher, [["p0", {}], ["p1", {}]], 2.0, "iia_dpmpp_2m", "karras", 4, 3, 8, 0, "spread", 32, 32,
        negative=[["n", {}]], chunk_size=4, end_to_end=False, more_steps="5", cfg_list="2, 3", denoise_list="1, 0.5")
    saved = load(tmp_path / "models" / "calibrated_samplers" / "spread.safetensors")
    assert isinstance(saved, CalibrationSet) and len(saved) == 8 and isinstance(result, CalibrationSet)
    assert saved.primary().steps == 4 and saved.primary().info["cfg"] == 2.0
    assert torch.equal(sigmas, saved.primary().sampling_sigmas.float()) and image.shape == (1, 360, 768, 3)
    assert saved.info["schedule"] == "karras, steps 4, 5" and saved.info["fingerprint"]
    schedule = comfy.samplers.calculate_sigmas
    x = cs.MIXTURE.noise(4, seed=9, dtype=torch.float32)
    for steps, denoise, cfg in [(4, 1.0, 2.0), (5, 1.0, 2.5), (5, 0.5, 3.0), (4, 0.5, 2.2)]:
        sig = denoise_schedule(lambda n: schedule(None, "karras", n), steps, denoise).float()
        want, why = saved.select(sig, "ve", cfg)
        assert why is None
        out = runtime.dropdown_sampler("iia_dpmpp_2m", pack.LIBRARY)(denoiser(patcher, cfg), x * float(sig[0]), sig)
        assert torch.equal(out, SAMPLERS["iia_dpmpp_2m"](denoiser(patcher, cfg), x * float(sig[0]), sig,
                                                         calibration=want))
    assert comfy.sent == []  # nothing to warn about
    sig = schedule(None, "karras", 4)
    runtime.dropdown_sampler("iia_dpmpp_2m", pack.LIBRARY)(denoiser(patcher, 6.0), x * float(sig[0]), sig)
    (event, data, client), = comfy.sent
    assert event == "calibrated_samplers.warning" and client == "client-1" and data["node"] == "7"
    assert "UNCALIBRATED" in data["message"] and "cfg 6" in data["message"]
    assert "spread.safetensors: was fitted for cfg 2-3" in data["message"]
    sampler, _ = pack.sampler_node(saved, label="spread.safetensors")  # the file node picks per run too
    sig = schedule(None, "karras", 5)
    out = sampler.sampler_function(denoiser(patcher, 2.5), x * float(sig[0]), sig, **sampler.extra_options)
    assert torch.equal(out, SAMPLERS["iia_dpmpp_2m"](denoiser(patcher, 2.5), x * float(sig[0]), sig,
                                                     calibration=saved.select(sig, "ve", 2.5)[0]))
    with pytest.raises(CalibrationMismatch, match="fitted for cfg 2-3"):
        sampler.sampler_function(denoiser(patcher, 9.0), x * float(sig[0]), sig, **sampler.extra_options)
    with pytest.raises(ValueError, match="SIGMAS input is one schedule"):
        pack.calibrate_node(patcher, [["p0", {}]], 1.0, "iia_ddim", "karras", 4, 3, 8, 0, "x", 32, 32,
                            sigmas=sig, more_steps="5")


def test_first_use_node_calibrates_a_missing_setting_once_then_uses_the_file(comfy, tmp_path):
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    (sampler,) = pack.first_use_node("iia_dpmpp_2m", batch_size=12, fine_steps=3)
    folder = tmp_path / "models" / "calibrated_samplers"
    patcher = cs.Patcher()
    x = cs.MIXTURE.noise(2, seed=1, dtype=torch.float32) * float(SIGMAS[0])
    args = {"seed": 5, "denoise_mask": None, "model_options": {}}
    out = sampler.sampler_function(denoiser(patcher, 3.0), x, SIGMAS, extra_args=dict(args), **sampler.extra_options)
    (written,) = list(folder.iterdir())
    cal = load(written)
    assert cal.info["made_by"] == "ComfyUI first-use calibration" and cal.info["cfg"] == 3.0 and cal.info["batch"] == 12
    assert torch.equal(out, SAMPLERS["iia_dpmpp_2m"](denoiser(patcher, 3.0), x, SIGMAS, extra_args=dict(args),
                                                     calibration=cal))
    assert comfy.bars and comfy.bars[-1].values[-1][0] == comfy.bars[-1].values[-1][1]  # progress reached its end
    assert len(comfy.sent) == 1 and "calibrated now and saved as" in comfy.sent[0][1]["message"]
    # the node's text carries what the fit spends, which is what it spent (no end-to-end stage by default)
    spent = round(12 * cal.info["model_evaluations_per_sample"])
    assert comfy.texts and all(f"; about {spent} model evaluations planned (" in t for t, _ in comfy.texts)
    model = denoiser(patcher, 3.0)
    sampler.sampler_function(model, x, SIGMAS, extra_args=dict(args), **sampler.extra_options)
    assert list(folder.iterdir()) == [written] and model.calls == 6  # the file was used: one run's evaluations
    (off,) = pack.first_use_node("iia_dpmpp_2m", calibrate_if_missing=False)
    plain = off.sampler_function(denoiser(patcher, 4.0), x, SIGMAS, extra_args=dict(args), **off.extra_options)
    assert torch.equal(plain, SAMPLERS["iia_dpmpp_2m"](denoiser(patcher, 4.0), x, SIGMAS, extra_args=dict(args)))
    assert "UNCALIBRATED" in comfy.sent[-1][1]["message"] and len(list(folder.iterdir())) == 1


def test_first_use_node_fits_the_run_size_when_the_matching_file_was_fitted_at_another(comfy, tmp_path):
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    folder = tmp_path / "models" / "calibrated_samplers"
    folder.mkdir(parents=True, exist_ok=True)
    patcher = cs.Patcher()
    fitted(patcher=patcher, latent_shape=[4, 8, 8]).save(folder / "large.safetensors")  # 4x the run's positions
    (sampler,) = pack.first_use_node("iia_dpmpp_2m", batch_size=12, fine_steps=3)
    x = cs.MIXTURE.noise(2, seed=1, dtype=torch.float32) * float(SIGMAS[0])
    args = {"seed": 5, "denoise_mask": None, "model_options": {}}
    sampler.sampler_function(denoiser(patcher, 3.0), x, SIGMAS, extra_args=dict(args), **sampler.extra_options)
    (new,) = [f for f in folder.iterdir() if f.name != "large.safetensors"]
    assert new.name.endswith("_4x4.safetensors") and load(new).info["latent_shape"] == [4, 4, 4]
    model = denoiser(patcher, 3.0)
    sampler.sampler_function(model, x, SIGMAS, extra_args=dict(args), **sampler.extra_options)
    assert model.calls == 6 and len(list(folder.iterdir())) == 2  # the new file serves the next run


def test_first_use_calibration_cancelled_writes_nothing(monkeypatch, tmp_path):
    calls = []
    comfy = cs.install(monkeypatch, str(tmp_path), lambda: calls.append(1) or len(calls) > 3)
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    (sampler,) = pack.first_use_node("iia_ddim", batch_size=12, fine_steps=3)
    x = cs.MIXTURE.noise(2, seed=1, dtype=torch.float32) * float(SIGMAS[0])
    with pytest.raises(cs.Interrupted):
        sampler.sampler_function(denoiser(cs.Patcher(), 3.0), x, SIGMAS, extra_args={"seed": 0},
                                 **sampler.extra_options)
    folder = tmp_path / "models" / "calibrated_samplers"
    assert not folder.exists() or not list(folder.iterdir())
    assert comfy.sent == []


def test_a_file_made_for_another_cfg_warns_in_the_browser(comfy, tmp_path):
    from calibrated_samplers.nodes import pack
    p = cs.Patcher()
    cal = fitted(patcher=p, cfg=5.0)
    sampler, sig = pack.sampler_node(cal, label="cfg5.safetensors")
    x = cs.MIXTURE.noise(2, seed=1, dtype=torch.float32) * float(sig[0])
    sampler.sampler_function(denoiser(p, 3.0), x, sig, **sampler.extra_options)
    (event, data, _), = comfy.sent
    assert event == "calibrated_samplers.warning" and "cfg5.safetensors was made for cfg 5" in data["message"]


def test_cancel_writes_nothing(monkeypatch, tmp_path):
    calls = []

    def interrupted():
        calls.append(1)
        return len(calls) > 2
    cs.install(monkeypatch, str(tmp_path), interrupted)
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    with pytest.raises(cs.Interrupted):
        pack.calibrate_node(cs.Patcher(), [["p", {}]], 1.0, "iia_ddim", "karras", 5, 3, 16, 0, "cancelled", 32, 32,
                            chunk_size=4)
    folder = tmp_path / "models" / "calibrated_samplers"
    assert not folder.exists() or not list(folder.iterdir())


def test_first_use_with_afs_fits_a_file_of_its_own_and_fits_an_img2img_run_without_it(comfy, tmp_path):
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    folder = tmp_path / "models" / "calibrated_samplers"
    patcher = cs.Patcher()
    x = cs.MIXTURE.noise(2, seed=1, dtype=torch.float32) * float(SIGMAS[0])
    args = {"seed": 5, "denoise_mask": None, "model_options": {}}
    (sampler,) = pack.first_use_node("iia_dpmpp_2m", batch_size=12, fine_steps=3, afs=True)
    out = sampler.sampler_function(denoiser(patcher, 3.0), x, SIGMAS, extra_args=dict(args), **sampler.extra_options)
    (written,) = list(folder.iterdir())
    cal = load(written)
    assert written.name.endswith("_afs.safetensors") and cal.options == {"afs": True}
    model = denoiser(patcher, 3.0)
    again = sampler.sampler_function(model, x, SIGMAS, extra_args=dict(args), **sampler.extra_options)
    assert model.calls == len(SIGMAS) - 2 and torch.equal(again, out)  # the file is used: its first step is free
    # a run from an image (img2img: the latent is not empty) is fitted without afs, under the plain name, with a note
    sig = SIGMAS[2:]
    model = denoiser(patcher, 3.0)
    model.latent_image = torch.full((1, 4, 4, 4), 0.5)
    sampler.sampler_function(model, x * float(sig[0]) / float(SIGMAS[0]), sig, extra_args=dict(args),
                             **sampler.extra_options)
    plain = [p for p in folder.iterdir() if p != written]
    assert len(plain) == 1 and not plain[0].name.endswith("_afs.safetensors") and load(plain[0]).options == {}
    assert "without afs" in comfy.sent[-2][1]["message"]
