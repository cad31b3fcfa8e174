"""The A1111/Forge entry (scripts/calibrated_samplers.py) without a web UI: inert on import, the same model
fingerprint as the ComfyUI nodes, the sampler function's file lookup and infotext, calibration through the
web UI's batch-shaped conditioning, and registration into both web UIs' sampler lists (stand-ins for the web
UI's ``modules``; tests/test_webui_integration.py runs a real Forge)."""
import collections
import importlib.util
import logging
import os
import sys
import types

import pytest
import torch

from calibrated_samplers import hosts
from calibrated_samplers.calibration import calibrate, load
from calibrated_samplers.calibration.library import Library
from calibrated_samplers.nodes import runtime
from calibrated_samplers.samplers import SAMPLERS
from calibrated_samplers.tests import comfy_standins as cs
from calibrated_samplers.calibration.testbed.analytic import karras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMAS = karras(5, 0.03, 14.6).float()


@pytest.fixture(scope="module")
def script():
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("calibrated_samplers_webui_script",
                                                  os.path.join(ROOT, "scripts", "calibrated_samplers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "modules" not in sys.modules and not {m for m in set(sys.modules) - before if m.startswith("comfy")}
    return mod


class Predictor:
    def __init__(self, prediction_type="epsilon", shift=1.0):
        self.prediction_type, self.shift = prediction_type, shift


def forge_model(seed=0, predictor=None):
    net = cs.Net(seed)
    unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=net, predictor=predictor or Predictor()),
                                 lora_loader=types.SimpleNamespace(backup={}), lora_patches={})
    return types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet, vae=types.SimpleNamespace(latent_channels=4)))


class Cond:
    """Stands in for the web UI's batch-shaped MulticondLearnedConditioning of one prompt."""

    def __init__(self, label, batch):
        self.label, self.batch = label, batch


class CFGModel:
    """The web UI's CFG denoiser: conditioning is made for a fixed batch, which x must match."""

    def __init__(self, batch):
        self.comments = []
        self.p = types.SimpleNamespace(extra_generation_params={}, width=64, height=64, steps=5,
                                       comment=self.comments.append)  # Processing.comment: shown under the image
        self.batch, self.calls = batch, 0

    def __call__(self, x, sigma, cond, uncond, cond_scale, s_min_uncond, image_cond):
        assert x.shape[0] == cond.batch == self.batch == sigma.shape[0], "conditioning batch != x batch"
        self.calls += 1
        labels = torch.full((x.shape[0],), cond.label, dtype=torch.long)
        return cs.MIXTURE.edm()(x, sigma, cond=labels, cfg=cond_scale)


class Env:
    def __init__(self, sd_model, sgm=False):
        self.model, self.sgm = sd_model, sgm

    def sd_model(self):
        return self.model

    def sgm_noise_multiplier(self):
        return self.sgm

    def conds(self, p, prompt, batch):
        return Cond(["cat", "dog"].index(prompt), batch)

    def denoiser_module(self, sd_model):
        return sd_model.forge_objects.unet.model.diffusion_model

    def schedule(self, p):
        return lambda n: karras(n, 0.03, 14.6)

    def first_use(self):
        return getattr(self, "first_use_settings", None)

    def folder(self):
        return self.folder_path


def extra(batch, cfg=3.0):
    return {"cond": Cond(0, batch), "uncond": None, "cond_scale": cfg, "s_min_uncond": 0.0, "image_cond": None}


def test_importing_outside_a_web_ui_registers_nothing(script):
    assert script.setup() is None
    assert set(script.LABELS) == set(SAMPLERS) and len(set(script.LABELS.values())) == len(SAMPLERS)


def test_same_fingerprint_as_the_comfyui_nodes_for_the_same_weights(script):
    assert script.model_fingerprint(forge_model(0))["id"] == runtime.model_fingerprint(cs.Patcher(seed=0))["id"]
    assert script.model_fingerprint(forge_model(1))["id"] != runtime.model_fingerprint(cs.Patcher(seed=0))["id"]
    a1111 = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=cs.Net(0)), parameterization="eps")
    assert script.model_fingerprint(a1111)["id"] == runtime.model_fingerprint(cs.Patcher(seed=0))["id"]
    flow_forge = script.model_fingerprint(forge_model(0, Predictor("const", 3.0)))
    flow_comfy = runtime.model_fingerprint(cs.Patcher(cs.ModelSamplingDiscreteFlow(3.0), seed=0))
    assert flow_forge["id"] == flow_comfy["id"] and flow_forge["prediction"] == "flow"
    v = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=cs.Net(0)), parameterization="v")
    assert script.model_family(v)[0] == "v" and script.model_fingerprint(v)["id"] != flow_forge["id"]
    # A1111's SD3 (SD3Inferencer) says parameterization "eps"; its BaseModel's sampling is a shifted flow
    sd3 = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=cs.Net(0),
                                                            model_sampling=cs.ModelSamplingDiscreteFlow(3.0)),
                                parameterization="eps", latent_channels=16)
    prediction, family = script.model_family(sd3)
    assert (prediction, family.name, family.shift) == ("flow", "flow", 3.0)
    assert script.model_fingerprint(sd3)["id"] == flow_comfy["id"]


def test_fingerprint_reads_lora_backups(script):
    m = forge_model(0)
    base = script.model_fingerprint(m)["id"]
    net = m.forge_objects.unet.model.diffusion_model
    original = net.norm.detach().clone()
    with torch.no_grad():
        net.norm += 1
    m.forge_objects.unet.lora_loader.backup["diffusion_model.norm"] = original
    m.forge_objects.unet.lora_patches = {("lora.safetensors", 1.0, 1.0, False): {}}
    fp = script.model_fingerprint(m)
    assert fp["weights"] == script.model_fingerprint(forge_model(0))["weights"] and fp["id"] != base


def fitted_for(script, sd_model, cfg=3.0, method="iia_dpmpp_2m"):
    fp = script.model_fingerprint(sd_model)
    noise = cs.MIXTURE.noise(12, seed=1, dtype=torch.float32) * float(SIGMAS[0])

    def prompt_zero(x, sigma):
        return cs.MIXTURE.edm()(x, sigma, cond=torch.zeros(x.shape[0], dtype=torch.long), cfg=cfg)
    return calibrate(prompt_zero, SIGMAS, method, noise, fine_steps=3,
                     info={"cfg": cfg, "fingerprint": fp["id"], "fingerprint_detail": fp})


def test_sampler_uses_the_matching_file_and_says_so_in_the_infotext(script, tmp_path):
    sd = forge_model(0)
    fitted_for(script, sd).save(tmp_path / "mine.safetensors")
    fn = script.make_sampler("iia_dpmpp_2m", script.library_for(str(tmp_path)), Env(sd))
    x = cs.MIXTURE.noise(2, seed=5, dtype=torch.float32) * float(SIGMAS[0])
    model = CFGModel(2)
    out = fn(model, x, SIGMAS, extra_args=extra(2))
    want = SAMPLERS["iia_dpmpp_2m"](CFGModel(2), x, SIGMAS, extra_args=extra(2), calibration=load(tmp_path / "mine.safetensors"))
    assert torch.equal(out, want)
    assert model.p.extra_generation_params["Calibration"] == f"mine.safetensors ({script.file_hash(tmp_path / 'mine.safetensors')})"
    other_cfg = CFGModel(2)
    out = fn(other_cfg, x, SIGMAS, extra_args=extra(2, cfg=4.0))
    assert torch.equal(out, SAMPLERS["iia_dpmpp_2m"](CFGModel(2), x, SIGMAS, extra_args=extra(2, cfg=4.0)))
    assert other_cfg.p.extra_generation_params["Calibration"] == "none: uncalibrated, the dpmpp_2m solver"
    (shown,) = other_cfg.comments  # the visible warning under the image
    assert shown.startswith("IIA DPM++ 2M (calibrated) ran UNCALIBRATED") and "was made for cfg 3" in shown
    assert other_cfg.p.extra_generation_params["Calibration warning"] == shown  # what an API client reads
    assert model.comments == [] and "Calibration warning" not in model.p.extra_generation_params


def test_a_file_fitted_at_another_image_size_is_used_and_named_in_the_console(script, tmp_path, caplog):
    sd = forge_model(0)
    cal = fitted_for(script, sd)
    cal.info["latent_shape"] = [4, 8, 8]  # fitted on 8 x 8 latents; the run's are 4 x 4
    cal.save(tmp_path / "large.safetensors")
    fn = script.make_sampler("iia_dpmpp_2m", script.library_for(str(tmp_path)), Env(sd))
    x = cs.MIXTURE.noise(2, seed=5, dtype=torch.float32) * float(SIGMAS[0])
    model = CFGModel(2)
    with caplog.at_level(logging.WARNING, logger="calibrated_samplers"):
        out = fn(model, x, SIGMAS, extra_args=extra(2))
    want = SAMPLERS["iia_dpmpp_2m"](CFGModel(2), x, SIGMAS, extra_args=extra(2),
                                    calibration=load(tmp_path / "large.safetensors"))
    assert torch.equal(out, want)
    assert "large.safetensors was fitted on 8x8 latents and this run's are 4x4" in caplog.text
    assert model.p.extra_generation_params["Calibration"].startswith("large.safetensors (")
    assert "fitted on 8x8 latents" in model.p.extra_generation_params["Calibration warning"]


def test_hires_fix_states_both_passes_in_the_infotext(script, tmp_path):
    """The second pass (other sigmas, no file) gets its own line; the first pass's line stays."""
    sd = forge_model(0)
    fitted_for(script, sd).save(tmp_path / "mine.safetensors")
    fn = script.make_sampler("iia_dpmpp_2m", script.library_for(str(tmp_path)), Env(sd))
    model = CFGModel(2)
    x = cs.MIXTURE.noise(2, seed=5, dtype=torch.float32) * float(SIGMAS[0])
    fn(model, x, SIGMAS, extra_args=extra(2))
    model.p.is_hr_pass = True  # what the web UI's sample_hr_pass sets
    hires = karras(3, 0.03, 2.0).float()
    fn(model, x[:, :] * 2.0 / float(SIGMAS[0]), hires, extra_args=extra(2))
    params = model.p.extra_generation_params
    assert params["Calibration"].startswith("mine.safetensors (")
    assert params["Hires calibration"] == "none: uncalibrated, the dpmpp_2m solver"
    assert "UNCALIBRATED" in params["Hires calibration warning"] and "Calibration warning" not in params


def test_calibration_job_pads_chunks_to_the_conditionings_batch_and_walks_every_prompt(script):
    sd = forge_model(0)
    noise = cs.MIXTURE.noise(14, seed=2, dtype=torch.float32)
    # the per-step fit alone: it is exact to rounding, where the end-to-end stage's ~100 float32 Adam steps drift by
    # 1e-5 with how the work is cut (its chunk invariance is tested in test_end_to_end.py)
    job = hosts.Job("iia_ddim", noise, ["cat", "dog"], {"fine_steps": 3, "end_to_end": False}, {"seed": 2})
    script._pending.job = job
    try:
        model = CFGModel(4)
        x = cs.MIXTURE.noise(4, seed=3, dtype=torch.float32) * float(SIGMAS[0])
        assert script.make_sampler("iia_ddim", Library(list), Env(sd, sgm=True))(model, x, SIGMAS, extra_args=extra(4)) is x
    finally:
        script._pending.job = None
    cal = job.result
    assert cal.info["cfg"] == 3.0 and cal.info["fingerprint"] == script.model_fingerprint(sd)["id"]
    assert cal.info["conditions"] == 2 and model.calls > 0
    s0 = float(SIGMAS[0])

    def direct(x, sigma, prompt=0):
        labels = torch.full((x.shape[0],), prompt, dtype=torch.long)
        return cs.MIXTURE.edm()(x, sigma, cond=labels, cfg=3.0)
    want = calibrate(direct, SIGMAS, "iia_ddim", noise * (1 + s0 * s0) ** 0.5, [{"prompt": 0}, {"prompt": 1}],
                     fine_steps=3, chunk_size=4, end_to_end=False)
    assert torch.allclose(cal.params["coeffs"], want.params["coeffs"], rtol=1e-5, atol=1e-8)


def test_the_fit_ends_where_the_web_uis_denoiser_is_defined(script):
    """As in ComfyUI, the teacher stops at the model's smallest sigma: A1111's and Forge's CFG denoisers hold a
    k-diffusion wrapper (``inner_model``) that says it (Forge's through its predictor); a denoiser without one is
    taken as defined at every sigma."""
    class ForgeScheduleLinker:  # as Forge's k_diffusion/external.py has it: its own sigma_min raises
        def __init__(self, sigma_min):
            self.predictor = types.SimpleNamespace(sigma_min=torch.tensor(sigma_min))

        @property
        def sigma_min(self):
            return self.predictor.sigma_min()

    sd = forge_model(0)
    recorded = []
    for wrapper in (types.SimpleNamespace(sigma_min=torch.tensor(0.0292)), ForgeScheduleLinker(0.0146), None):
        job = hosts.Job("iia_ddim", cs.MIXTURE.noise(8, seed=2, dtype=torch.float32), ["cat"],
                        {"fine_steps": 2, "end_to_end": False}, {"seed": 2})
        model = CFGModel(4)
        if wrapper is not None:
            model.inner_model = wrapper
        script._pending.job = job
        try:
            x = cs.MIXTURE.noise(4, seed=3, dtype=torch.float32) * float(SIGMAS[0])
            script.make_sampler("iia_ddim", Library(list), Env(sd))(model, x, SIGMAS, extra_args=extra(4))
        finally:
            script._pending.job = None
        recorded.append(job.result.info["sigma_min"])
    assert recorded[0] == pytest.approx(0.0292) and recorded[1] == pytest.approx(0.0146) and recorded[2] is None


def test_an_afs_job_writes_a_file_whose_runs_make_one_model_call_fewer(script, tmp_path):
    """The tab's and the API's ``afs`` reaches calibrate(): the file keeps the option, and the web UI's sampler,
    finding the file, runs its first step without the model."""
    sd = forge_model(0)
    noise = cs.MIXTURE.noise(12, seed=2, dtype=torch.float32)
    job = hosts.Job("iia_dpmpp_2m", noise, ["cat"], {"fine_steps": 3, "end_to_end": False, "afs": True}, {"seed": 2})
    script._pending.job = job
    try:
        x = cs.MIXTURE.noise(4, seed=3, dtype=torch.float32) * float(SIGMAS[0])
        script.make_sampler("iia_dpmpp_2m", Library(list), Env(sd))(CFGModel(4), x, SIGMAS, extra_args=extra(4))
    finally:
        script._pending.job = None
    assert job.result.options == {"afs": True}
    # what the host said the job would spend before it began is what it spent
    assert job.planned["per_noise"] == job.result.info["model_evaluations_per_sample"]
    job.result.save(tmp_path / "afs.safetensors")
    fn = script.make_sampler("iia_dpmpp_2m", script.library_for(str(tmp_path)), Env(sd))
    model, plain = CFGModel(2), CFGModel(2)
    x = cs.MIXTURE.noise(2, seed=5, dtype=torch.float32) * float(SIGMAS[0])
    fn(model, x, SIGMAS, extra_args=extra(2))
    SAMPLERS["iia_dpmpp_2m"](plain, x, SIGMAS, extra_args=extra(2))
    assert model.calls == plain.calls - 1 == len(SIGMAS) - 2
    assert model.p.extra_generation_params["Calibration"].startswith("afs.safetensors (")


def test_afs_with_a_denoise_list_is_refused_before_the_web_ui_runs(script, monkeypatch):
    modules = types.ModuleType("modules")
    modules.call_queue = modules.processing = modules.shared = types.SimpleNamespace()  # touched only after the check
    monkeypatch.setitem(sys.modules, "modules", modules)
    with pytest.raises(ValueError, match="pure noise"):
        script.calibrate_in_webui(Env(forge_model(0)), "iia_dpmpp_2m", 8, "Karras", 5.0, 512, 512, ["a cat"],
                                  denoise_list="1, 0.5", afs=True)


def test_an_interrupt_during_the_calibration_is_a_refusal_and_writes_nothing(script, tmp_path, monkeypatch):
    """The web UI's Interrupt sets its flag; the calibration's cancel check raises inside the web UI's sampling, and
    the route answers 'interrupted' (409), not a server error, with no file."""
    import threading
    from calibrated_samplers.calibration import CalibrationCancelled
    state = types.SimpleNamespace(interrupted=False, begin=lambda job: None, end=lambda: None)
    ran = []

    def process_images(p):
        job = script.pending_job("iia_dpmpp_2m")
        state.interrupted = True  # the user pressed Interrupt while the job ran
        ran.append(job.cancel())
        raise CalibrationCancelled("calibration cancelled; nothing was saved")
    modules = types.ModuleType("modules")
    modules.call_queue = types.SimpleNamespace(queue_lock=threading.Lock())
    modules.processing = types.SimpleNamespace(process_images=process_images,
                                               StableDiffusionProcessingTxt2Img=types.SimpleNamespace)
    modules.shared = types.SimpleNamespace(sd_model=forge_model(0), state=state)
    monkeypatch.setitem(sys.modules, "modules", modules)
    env = Env(forge_model(0))
    env.folder_path, env.schedulers = str(tmp_path), lambda: ["Karras"]
    with pytest.raises(InterruptedError, match="nothing was written"):
        script.calibrate_in_webui(env, "iia_dpmpp_2m", 4, "Karras", 5.0, 64, 64, ["a cat"], batch_size=8,
                                  filename="stopped")
    assert ran == [True] and list(tmp_path.iterdir()) == [] and script.pending_job("iia_dpmpp_2m") is None


def test_a_range_calibration_serves_other_steps_cfgs_and_both_web_ui_denoise_cuts(script, tmp_path):
    """more_steps / cfg_list / denoise_list through the web UI's job: one file; img2img and hires fix cut a schedule
    differently for the same steps and denoise, and both are fitted; a hires pass finds its entry."""
    from calibrated_samplers.calibration.file import CalibrationSet
    from calibrated_samplers.calibration.entries import denoise_schedule, img2img_schedule
    sd = forge_model(0)
    noise = cs.MIXTURE.noise(12, seed=2, dtype=torch.float32)
    spread = {"steps": [4, 5], "cfgs": [2.0, 3.0], "denoises": [1.0, 0.5]}
    job = hosts.Job("iia_ddim", noise, ["cat"], {"fine_steps": 2, "end_to_end": False}, {"seed": 2}, spread=spread)
    script._pending.job = job
    try:
        x = cs.MIXTURE.noise(4, seed=3, dtype=torch.float32) * float(SIGMAS[0])
        script.make_sampler("iia_ddim", Library(list), Env(sd))(CFGModel(4), x, karras(4, 0.03, 14.6), extra_args=extra(4))
    finally:
        script._pending.job = None
    result = job.result
    assert isinstance(result, CalibrationSet) and result.primary().steps == 4
    cuts = {tuple(round(float(v), 6) for v in c.sigmas) for c in result.entries}
    schedule = Env(sd).schedule(None)
    for n in (4, 5):
        for rule in (denoise_schedule, img2img_schedule):
            assert tuple(round(float(v), 6) for v in rule(schedule, n, 0.5)) in cuts
    assert len(result) == 2 * (2 + 4)  # per cfg: 2 full schedules, 4 distinct denoise cuts
    result.save(tmp_path / "spread.safetensors")
    fn = script.make_sampler("iia_ddim", script.library_for(str(tmp_path)), Env(sd))
    model = CFGModel(2)
    model.p.is_hr_pass, model.p.hr_cfg = True, 2.5  # Forge guides its hires pass at hr_cfg, not cond_scale
    hires = denoise_schedule(schedule, 5, 0.5).float()
    fn(model, cs.MIXTURE.noise(2, seed=5, dtype=torch.float32) * float(hires[0]), hires, extra_args=extra(2, cfg=9.0))
    assert model.p.extra_generation_params["Hires calibration"].startswith("spread.safetensors (")
    assert model.comments == []


def test_first_use_setting_calibrates_a_txt2img_run_once_and_says_so_under_the_image(script, tmp_path):
    sd = forge_model(0)
    env = Env(sd)
    env.first_use_settings, env.folder_path = {"batch_size": 12, "fine_steps": 3}, str(tmp_path)
    fn = script.make_sampler("iia_dpmpp_2m", script.library_for(str(tmp_path)), env)
    x = cs.MIXTURE.noise(2, seed=5, dtype=torch.float32) * float(SIGMAS[0])
    model = CFGModel(2)
    model.step = 0
    out = fn(model, x, SIGMAS, extra_args=extra(2))
    (written,) = list(tmp_path.iterdir())
    cal = load(written)
    assert cal.info["made_by"] == "web UI first-use calibration" and cal.info["cfg"] == 3.0 and model.step == 0
    assert torch.equal(out, SAMPLERS["iia_dpmpp_2m"](CFGModel(2), x, SIGMAS, extra_args=extra(2), calibration=cal))
    assert "calibrated now and saved as" in model.comments[0]
    assert model.p.extra_generation_params["Calibration"].startswith(written.name)
    again = CFGModel(2)
    fn(again, x, SIGMAS, extra_args=extra(2))
    assert again.calls == 5 and again.comments == [] and list(tmp_path.iterdir()) == [written]
    hires = CFGModel(2)  # a hires pass starts from an image: not calibrated on first use, and said so
    hires.p.is_hr_pass = True
    fn(hires, x, karras(3, 0.03, 2.0).float(), extra_args=extra(2))
    assert "UNCALIBRATED" in hires.comments[0] and list(tmp_path.iterdir()) == [written]


def test_first_use_setting_fits_the_run_size_when_the_matching_file_was_fitted_at_another(script, tmp_path):
    sd = forge_model(0)
    cal = fitted_for(script, sd)
    cal.info["latent_shape"] = [4, 8, 8]  # 4x the run's positions
    cal.save(tmp_path / "large.safetensors")
    env = Env(sd)
    env.first_use_settings, env.folder_path = {"batch_size": 12, "fine_steps": 3}, str(tmp_path)
    fn = script.make_sampler("iia_dpmpp_2m", script.library_for(str(tmp_path)), env)
    x = cs.MIXTURE.noise(2, seed=5, dtype=torch.float32) * float(SIGMAS[0])
    model = CFGModel(2)
    fn(model, x, SIGMAS, extra_args=extra(2))
    (new,) = [f for f in tmp_path.iterdir() if f.name != "large.safetensors"]
    assert new.name.endswith("_4x4.safetensors") and "calibrated now and saved as" in model.comments[0]
    assert model.p.extra_generation_params["Calibration"].startswith(new.name)
    hires = CFGModel(2)  # a hires pass is never fitted on first use: the file of the other size serves it
    hires.p.is_hr_pass = True
    fn(hires, x, SIGMAS, extra_args=extra(2))
    assert len(list(tmp_path.iterdir())) == 2


def test_first_use_setting_with_afs_writes_its_own_file_whose_first_step_is_free(script, tmp_path):
    env = Env(forge_model(0))
    env.first_use_settings = {"batch_size": 12, "fine_steps": 3, "afs": True}
    env.folder_path = str(tmp_path)
    fn = script.make_sampler("iia_dpmpp_2m", script.library_for(str(tmp_path)), env)
    x = cs.MIXTURE.noise(2, seed=5, dtype=torch.float32) * float(SIGMAS[0])
    out = fn(CFGModel(2), x, SIGMAS, extra_args=extra(2))
    (written,) = list(tmp_path.iterdir())
    cal = load(written)
    assert written.name.endswith("_afs.safetensors") and cal.options == {"afs": True}
    again = CFGModel(2)
    assert torch.equal(fn(again, x, SIGMAS, extra_args=extra(2)), out)
    assert again.calls == len(SIGMAS) - 2 and list(tmp_path.iterdir()) == [written]


def test_registration_into_forge_and_a1111_lists_once(script, monkeypatch):
    SamplerData = collections.namedtuple("SamplerData", "name constructor aliases options")
    for forge in (True, False):
        sd_samplers = types.SimpleNamespace(all_samplers=[SamplerData("Euler", None, ["k_euler"], {})], all_samplers_map={},
                                            set_calls=[])
        sd_samplers.set_samplers = lambda s=sd_samplers: s.set_calls.append(1)
        if forge:
            sd_samplers.add_sampler = lambda data, s=sd_samplers: s.all_samplers.append(data)
        modules = types.ModuleType("modules")
        modules.sd_samplers = sd_samplers
        modules.sd_samplers_common = types.SimpleNamespace(SamplerData=SamplerData)
        modules.sd_samplers_kdiffusion = types.SimpleNamespace(KDiffusionSampler=lambda fn, model: ("sampler", fn, model))
        monkeypatch.setitem(sys.modules, "modules", modules)
        added = script.register(Library(list), Env(forge_model()))
        assert script.register(Library(list), Env(forge_model())) == []
        names = [s.name for s in sd_samplers.all_samplers]
        assert names[0] == "Euler" and names[1:] == list(script.LABELS.values()) == added
        amed = next(s for s in sd_samplers.all_samplers if s.name == "AMED Euler (calibrated)")
        assert amed.options == {"second_order": True} and amed.aliases == ["amed_euler"]
        kind, fn, model = amed.constructor("sd")
        assert fn.__name__ == "sample_amed_euler" and model == "sd"
        if not forge:
            assert set(sd_samplers.all_samplers_map) == set(added) and sd_samplers.set_calls == [1]


def test_the_tab_takes_sampler_list_names_shows_progress_and_says_why_not(script, monkeypatch, tmp_path):
    sd = forge_model(0)
    cal = fitted_for(script, sd)
    seen, bar = {}, []

    def fake(env, method, *args, on_progress=None, **kw):
        seen["method"], seen["afs"] = method, kw.get("afs")
        on_progress.time_left.note = "about 9 model evaluations planned"  # as hosts.announce_plan says it
        for done in range(1, 5):
            on_progress(done, 4)
        return cal, str(tmp_path / "x.safetensors")
    monkeypatch.setattr(script, "calibrate_in_webui", fake)
    args = (8, "Karras", 5.0, 512, 512, "a cat\na dog", "", 32, 10, 0, "x", False)
    message, picture = script.run_from_tab(None, "IIA DPM++ 2M (calibrated)", *args,
                                           progress=lambda f, desc="": bar.append((f, desc)))
    assert seen["method"] == "iia_dpmpp_2m" and seen["afs"] is False and message.startswith("Wrote ")
    assert [f for f, _ in bar] == [0.25, 0.5, 0.75, 1.0] and "IIA DPM++ 2M (calibrated)" in bar[0][1]
    assert all(desc.endswith("; about 9 model evaluations planned") for _, desc in bar)
    assert picture.dtype.name == "uint8" and picture.ndim == 3
    script.run_from_tab(None, "IIA DPM++ 2M (calibrated)", *args, afs=True)
    assert seen["afs"] is True

    def refuse(*a, **k):
        raise InterruptedError("calibration was interrupted: nothing was written")
    monkeypatch.setattr(script, "calibrate_in_webui", refuse)
    message, picture = script.run_from_tab(None, "AMED Euler (calibrated)", *args)
    assert message == "Not calibrated: calibration was interrupted: nothing was written" and picture is None
