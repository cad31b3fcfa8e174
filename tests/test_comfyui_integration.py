"""Against a real ComfyUI: the pack installed, the example workflows run through the HTTP API.

Skipped unless COMFYUI_DIR names a ComfyUI checkout; COMFYUI_PYTHON is the Python that runs it (default: the
one running pytest). The server starts with ``--cpu --base-directory <tmp>``: a temporary base whose
custom_nodes/ holds this checkout and whose models/ links to COMFYUI_DIR/models (so nothing is written into
your install), with a fresh, empty models/calibrated_samplers. Model files (tiny random-weight models are
enough; README "Tests" says how to make them) are named by COMFYUI_SD15 (a checkpoint, default
tiny_sd15.safetensors), COMFYUI_FLOW_UNET / COMFYUI_FLOW_CLIP / COMFYUI_FLOW_VAE (an SD3-style flow model,
default tiny_sd3_mmdit / tiny_clip_l / tiny_taesd_16ch .safetensors).
"""
import json
import os
import subprocess
import time

import pytest

from calibrated_samplers.calibration import load
from calibrated_samplers.samplers import SAMPLERS
from calibrated_samplers.tests import comfy_workflows, servers
from calibrated_samplers.tests.servers import comfy_error as error_of

pytestmark = pytest.mark.skipif(not servers.COMFY, reason="set COMFYUI_DIR (and COMFYUI_PYTHON) to test against a real ComfyUI")
PYTHON = servers.COMFY_PYTHON
REPO = servers.ROOT
SD15 = os.environ.get("COMFYUI_SD15", "tiny_sd15.safetensors")
FLOW = {"unet": os.environ.get("COMFYUI_FLOW_UNET", "tiny_sd3_mmdit.safetensors"),
        "clip": os.environ.get("COMFYUI_FLOW_CLIP", "tiny_clip_l.safetensors"),
        "vae": os.environ.get("COMFYUI_FLOW_VAE", "tiny_taesd_16ch.safetensors")}
SMALL = {"batch_size": 8, "fine_steps": 4}  # calibrations small enough for a 2-core CPU


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = servers.Comfy.start(str(tmp_path_factory.mktemp("comfy_base")))
    yield srv
    srv.stop()


def example(name, ckpt=SD15, **calibrate):
    """An example workflow (API source) pointed at the test models, with a small calibration."""
    wf = comfy_workflows.sources()[name]
    for node in wf.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        elif kind == "UNETLoader":
            inputs["unet_name"] = FLOW["unet"]
        elif kind in ("CLIPLoader", "TripleCLIPLoader"):  # one tiny text encoder stands in for SD3's three
            node["class_type"] = "CLIPLoader"
            node["inputs"] = dict(clip_name=FLOW["clip"], type="stable_diffusion")
        elif kind == "VAELoader":
            inputs["vae_name"] = FLOW["vae"]
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=64 if kind == "EmptyLatentImage" else 256, height=64 if kind == "EmptyLatentImage" else 256)
        elif kind == "CalibratedSamplersCalibrate":
            inputs.update(SMALL, width=64, height=64, **calibrate)
    return wf


@pytest.fixture(scope="module")
def eps_run(server):
    entry = server.run(example("calibrate_then_sample", filename="eps_a"))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    return entry


@pytest.fixture(scope="module")
def flow_run(server):
    entry = server.run(example("flow_model_calibrate_and_sample", filename="flow_c"))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    return entry


def test_samplers_are_in_the_stock_dropdowns_once(server):
    info = json.loads(server.http("GET", "/object_info")[1])
    for node in ("KSampler", "KSamplerAdvanced", "KSamplerSelect"):
        names = info[node]["input"]["required"]["sampler_name"][0]
        assert [n for n in names if n in SAMPLERS] == list(SAMPLERS), node
        assert names[0] == "euler"
    schedulers = info["KSampler"]["input"]["required"]["scheduler"][0]
    assert not set(schedulers) & set(SAMPLERS) and "karras" in schedulers
    for node in ("CalibratedSamplersCalibrate", "CalibratedSamplersSampler", "CalibratedSamplersSamplerFromFile",
                 "CalibratedSamplersGDDIM"):
        assert node in info


def test_the_frontend_extension_is_served(server):
    """The JavaScript that widens the file node: listed by the server and fetchable by the browser."""
    listed = json.loads(server.http("GET", "/extensions")[1])
    ours = [u for u in listed if u.endswith("/calibrated_samplers.js")]
    assert len(ours) == 1, listed
    status, body = server.http("GET", ours[0])
    assert status == 200 and b"CalibratedSamplersSamplerFromFile" in body and b"calibrated_samplers.warning" in body


def test_shipped_ui_workflows_are_the_api_sources(server):
    info = json.loads(server.http("GET", "/object_info")[1])
    for name, api in comfy_workflows.sources().items():
        with open(comfy_workflows.ui_path(name)) as f:
            assert comfy_workflows.ui_to_api(json.load(f), info) == api, name


def test_calibrate_then_sample_writes_a_file_that_reloads(server, eps_run):
    path = os.path.join(server.folder, "eps_a.safetensors")
    cal = load(path)
    assert cal.method == "iia_dpmpp_2m" and cal.family == "ve" and cal.info["cfg"] == 5.0
    assert cal.info["fingerprint"].startswith("cs2-") and cal.info["batch"] == 8
    assert cal.steps == 8 and cal.info["made_by"] == "ComfyUI Calibrate node"
    assert "[Calibrated Samplers] wrote" in eps_run["log"]
    assert "[Calibrated Samplers] iia_dpmpp_2m: about " in eps_run["log"]  # the planned evaluations, before the work
    assert "model evaluations planned (" in eps_run["log"].split("[Calibrated Samplers] wrote")[0]
    assert eps_run["outputs"]["22"]["images"]  # the residual picture
    assert [f for f in os.listdir(server.folder) if f.startswith(".tmp")] == []


def test_ksampler_dropdown_finds_the_file_and_differs_from_the_base(server, eps_run):
    calibrated = server.run(example("ksampler_with_saved_calibration"))
    assert calibrated["status"]["status_str"] == "success"
    assert "iia_dpmpp_2m: using eps_a.safetensors" in calibrated["log"]
    base = example("ksampler_with_saved_calibration")
    base["3"]["inputs"]["sampler_name"] = "dpmpp_2m"
    base = server.run(base)
    a, b = server.image(calibrated, "9"), server.image(base, "9")
    assert (a != b).any()
    # another cfg has no calibration: the base solver runs, said in the console, and matches ComfyUI's own dpmpp_2m
    # the browser that queued it gets a warning (the frontend extension shows it as a toast)
    other_cfg = example("ksampler_with_saved_calibration")
    other_cfg["3"]["inputs"]["cfg"] = 3.0
    fallback, warnings = server.run_watched(other_cfg, "calibrated_samplers.warning")
    assert "no calibration file matches this model" in fallback["log"]
    assert "eps_a.safetensors: was made for cfg 5, this run uses cfg 3" in fallback["log"]
    assert len(warnings) == 1 and "UNCALIBRATED" in warnings[0]["message"], warnings
    assert "eps_a.safetensors: was made for cfg 5" in warnings[0]["message"] and warnings[0]["node"] == "3"
    stock = example("ksampler_with_saved_calibration")
    stock["3"]["inputs"].update(cfg=3.0, sampler_name="dpmpp_2m")
    stock = server.run(stock)
    assert abs(server.image(fallback, "9") - server.image(stock, "9")).max() <= 1


def test_a_range_file_serves_other_steps_and_cfgs_between_its_fitted_ones(server, eps_run):
    """One Calibrate run over more_steps and cfg_list: KSampler finds the file at a step count other than the node's
    and at a cfg between the fitted ones (interpolated), and outside the range warns and runs the base."""
    fit = server.run(example("calibrate_then_sample", filename="eps_range", more_steps="6", cfg_list="4, 6",
                             end_to_end=False))
    assert fit["status"]["status_str"] == "success", error_of(fit)
    cal = load(os.path.join(server.folder, "eps_range.safetensors"))
    assert sorted((c.steps, c.info["cfg"]) for c in cal.entries) == [(6, 4.0), (6, 6.0), (8, 4.0), (8, 6.0)]
    run = example("ksampler_with_saved_calibration")  # 6 steps: the 8-step eps_a.safetensors cannot match
    run["3"]["inputs"].update(steps=6, cfg=5.0)
    served = server.run(run)
    assert "iia_dpmpp_2m: using eps_range.safetensors" in served["log"], served["log"]
    run["3"]["inputs"].update(cfg=7.0)
    outside, warnings = server.run_watched(run, "calibrated_samplers.warning")
    assert "eps_range.safetensors: was fitted for cfg 4-6 at this schedule, this run uses cfg 7" in outside["log"]
    assert len(warnings) == 1 and "fitted for cfg 4-6" in warnings[0]["message"]


def test_first_use_node_calibrates_a_new_setting_once(server, eps_run):
    """The first-use node in SamplerCustomAdvanced: a setting no file fits is calibrated on the run itself, saved
    and announced in the browser; the next run at that setting uses the file."""
    wf = example("calibrate_then_sample")
    for node in ("20", "21", "22"):
        del wf[node]
    wf["30"] = {"class_type": "CalibratedSamplersFirstUse", "inputs": {
        "sampler_name": "iia_dpmpp_2m", "calibrate_if_missing": True, "batch_size": 6, "fine_steps": 2,
        "end_to_end": False, "max_minutes": 0.0}}
    wf["31"] = {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 5,
                                                          "denoise": 1.0}}
    wf["3"]["inputs"].update(sampler=["30", 0], sigmas=["31", 0])
    before = set(os.listdir(server.folder))
    first, messages = server.run_watched(wf, "calibrated_samplers.warning")
    assert first["status"]["status_str"] == "success", error_of(first)
    (made,) = set(os.listdir(server.folder)) - before
    assert made.startswith("auto_iia_dpmpp_2m_5steps_cfg5_") and load(os.path.join(server.folder, made)).steps == 5
    assert len(messages) == 1 and "calibrated now and saved as " + made in messages[0]["message"]
    wf["13"]["inputs"]["noise_seed"] = 2  # a new seed, so ComfyUI does not serve the cached result
    second = server.run(wf)
    assert f"iia_dpmpp_2m: using {made}" in second["log"] and set(os.listdir(server.folder)) - before == {made}
    wf["30"]["inputs"]["afs"] = True  # a new setting with afs: a file of its own, written with the option
    wf["31"]["inputs"]["steps"] = 7  # no file of the module's fits 7 steps (eps_range holds 6 and 8)
    third = server.run(wf)
    assert third["status"]["status_str"] == "success", error_of(third)
    new = set(os.listdir(server.folder)) - before - {made}
    assert len(new) == 1, f"expected one new file, found {sorted(new)}; the run's log ends:\n{third['log'][-4000:]}"
    (made_afs,) = new
    assert made_afs.endswith("_afs.safetensors")
    assert load(os.path.join(server.folder, made_afs)).options == {"afs": True}


def test_flow_model_calibrates_and_samples(server, flow_run):
    cal = load(os.path.join(server.folder, "flow_c.safetensors"))
    assert cal.family == "flow" and cal.method == "amed_euler" and cal.info["fingerprint_detail"]["prediction"] == "flow"
    assert cal.info["latent_shape"][0] == 16


def test_a_file_for_another_model_or_schedule_is_a_clear_node_error(server, eps_run, flow_run):
    wf = example("calibrate_then_sample")
    del wf["20"], wf["22"]
    wf["21"] = {"class_type": "CalibratedSamplersSamplerFromFile",
                "inputs": {"calibration_file": "flow_c.safetensors", "allow_other_model": False}}
    entry = server.run(wf)
    kind, data = error_of(entry)
    assert kind == "execution_error" and "made for another model" in data["exception_message"]
    assert data["exception_type"] == "calibrated_samplers.ModelMismatch"  # not the pack's file-system path
    wf["21"]["inputs"]["calibration_file"] = "eps_a.safetensors"
    wf["30"] = {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 6, "denoise": 1.0}}
    wf["21"]["inputs"]["sigmas"] = ["30", 0]
    kind, data = error_of(server.run(wf))
    assert kind == "execution_error" and data["node_type"] == "CalibratedSamplersSamplerFromFile"
    assert "made for 8 steps, this run has 6" in data["exception_message"]
    assert data["exception_type"] == "calibrated_samplers.CalibrationMismatch"


def test_cancel_leaves_no_file(server, eps_run):
    wf = example("calibrate_then_sample", filename="cancelled", batch_size=256, fine_steps=10)
    prompt_id = server.queue(wf)
    t0 = time.time()
    while "Requested to load" not in open(server.log).read()[-3000:] and time.time() - t0 < 120:
        time.sleep(0.2)
    time.sleep(3)
    server.http("POST", "/interrupt")
    entry = server.wait(prompt_id)
    assert error_of(entry)[0] == "execution_interrupted"
    assert "cancelled.safetensors" not in os.listdir(server.folder)
    assert not [f for f in os.listdir(server.folder) if f.startswith(".tmp")]


def test_requirements_change_no_installed_package():
    """What ComfyUI-Manager does on install (pip install -r requirements.txt) leaves the environment as it was."""
    freeze = [PYTHON, "-m", "pip", "freeze", "--all"]
    before = subprocess.run(freeze, capture_output=True, text=True, check=True).stdout
    subprocess.run([PYTHON, "-m", "pip", "install", "-q", "-r", os.path.join(REPO, "requirements.txt")],
                   check=True, capture_output=True)
    after = subprocess.run(freeze, capture_output=True, text=True, check=True).stdout
    assert before == after
    assert "torch" not in open(os.path.join(REPO, "requirements.txt")).read()


@pytest.mark.parametrize("patch, prediction, family", [
    ({"class_type": "ModelSamplingDiscrete", "inputs": {"sampling": "v_prediction", "zsnr": False}}, "v", "ve"),
    ({"class_type": "ModelSamplingContinuousEDM", "inputs": {"sampling": "edm", "sigma_max": 80.0, "sigma_min": 0.002}}, "edm", "ve"),
    ({"class_type": "ModelSamplingSD3", "inputs": {"shift": 3.0}}, "flow", "flow"),
])
def test_model_sampling_families(server, patch, prediction, family):
    """The same checkpoint switched to v-prediction, EDM or flow by ComfyUI's model-sampling nodes."""
    wf = example("calibrate_then_sample", filename=f"family_{prediction}", method="amed_dpmpp_2m", steps=5,
                 scheduler="simple" if family == "flow" else "karras")
    wf["14"] = {"class_type": patch["class_type"], "inputs": dict(patch["inputs"], model=["4", 0])}
    for node in ("20", "10"):
        wf[node]["inputs"]["model"] = ["14", 0]
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    cal = load(os.path.join(server.folder, f"family_{prediction}.safetensors"))
    assert cal.family == family and cal.info["fingerprint_detail"]["prediction"] == prediction
    if family == "flow":
        assert cal.shift == 3.0 and float(cal.sigmas[0]) <= 1.0
