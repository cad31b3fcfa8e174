"""Against a real Forge (FORGE_DIR, FORGE_PYTHON, FORGE_CKPT; see tests/servers.py and README "Tests"): the
extension linked in, its samplers listed and run by name, the calibrate route, infotext, interruption, and
files moving between ComfyUI and the web UI (that last part also needs COMFYUI_DIR)."""
import os
import shutil
import threading
import time

import pytest

from calibrated_samplers.calibration import load
from calibrated_samplers.tests import servers
from calibrated_samplers.tests.servers import comfy_error

pytestmark = pytest.mark.skipif(not (servers.FORGE and servers.FORGE_CKPT),
                                reason="set FORGE_DIR, FORGE_PYTHON and FORGE_CKPT to test against a real Forge")
LABELS = {"iia_ddim": "IIA DDIM (calibrated)", "iia_dpmpp_2m": "IIA DPM++ 2M (calibrated)",
          "amed_euler": "AMED Euler (calibrated)"}
CALIBRATE = {"steps": 4, "scheduler": "Karras", "cfg": 5.0, "width": 64, "height": 64, "prompts": ["a tiny test", "a cat"],
             "batch_size": 8, "fine_steps": 3, "seed": 1, "chunk_size": 4}


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    srv = servers.Forge.start(str(tmp_path_factory.mktemp("forge_data")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def calibrated(forge):
    status, body = forge.post("/calibrated-samplers/calibrate", dict(CALIBRATE, method="iia_dpmpp_2m", filename="forge_iia"))
    assert status == 200, body
    # the end-to-end stage (with the UNet's blocks checkpointed) runs in the first; the rest skip it to keep the suite
    # short (each stage is 13-30 min on two shared cores)
    status, amed = forge.post("/calibrated-samplers/calibrate", dict(CALIBRATE, method="amed_euler", filename="forge_amed",
                                                                      end_to_end=False))
    assert status == 200, amed
    return body


def test_every_sampler_is_listed_once_and_runs_under_its_own_name(forge):
    import json
    listed = [s["name"] for s in json.loads(forge.http("GET", "/sdapi/v1/samplers")[1])]
    import importlib.util
    spec = importlib.util.spec_from_file_location("cs_script", os.path.join(servers.ROOT, "scripts", "calibrated_samplers.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for label in script.LABELS.values():
        assert listed.count(label) == 1, label
        info, _ = forge.txt2img(label, steps=4)
        assert info["sampler_name"] == label  # the web UI silently swaps unknown names


def test_calibrate_route_writes_a_file_the_sampler_uses(forge, calibrated):
    path = os.path.join(forge.folder, "forge_iia.safetensors")
    cal = load(path)
    assert cal.method == "iia_dpmpp_2m" and cal.info["cfg"] == 5.0 and cal.info["prompts"] == 2
    assert cal.info["made_by"] == "web UI calibrate" and calibrated["file"] == "forge_iia.safetensors"
    assert cal.info["sigma_min"] == pytest.approx(0.0292, rel=0.01)  # SD1.5's smallest sigma, as ComfyUI passes it
    assert [round(s, 4) for s in calibrated["sigmas"]] == [round(float(s), 4) for s in cal.sigmas]
    assert calibrated["warnings"] == []  # what an API client hears of a skipped stage: nothing skipped on a CPU
    info, image = forge.txt2img(LABELS["iia_dpmpp_2m"])
    assert f"Calibration: forge_iia.safetensors ({calibrated['hash']})" in info["infotexts"][0]
    _, base = forge.txt2img("DPM++ 2M")
    assert (image != base).any()
    info, amed = forge.txt2img(LABELS["amed_euler"])
    assert "Calibration: forge_amed.safetensors" in info["infotexts"][0]
    # another cfg: no file matches, the base runs, and the infotext and console say so
    start = os.path.getsize(forge.log)
    info, fallback = forge.txt2img(LABELS["iia_dpmpp_2m"], cfg=3.0)
    assert 'Calibration: "none: uncalibrated, the dpmpp_2m solver"' in info["infotexts"][0]
    assert "running UNCALIBRATED: the dpmpp_2m solver" in forge.log_since(start)
    _, stock = forge.txt2img("DPM++ 2M", cfg=3.0)
    assert abs(fallback - stock).max() <= 1


def test_bad_requests_are_refused_with_a_reason(forge, calibrated):
    status, body = forge.post("/calibrated-samplers/calibrate", dict(CALIBRATE, method="gddim", filename="x"))
    assert status == 400 and "method must be one of" in body["detail"]
    status, body = forge.post("/calibrated-samplers/calibrate", dict(CALIBRATE, method="iia_ddim", filename="forge_iia"))
    assert status == 400 and "already exists" in body["detail"]


def test_unknown_scheduler_is_refused_with_the_valid_names(forge):
    status, body = forge.post("/calibrated-samplers/calibrate", dict(CALIBRATE, method="iia_ddim", scheduler="Karas",
                                                                   filename="typo"))
    assert status == 400 and "unknown scheduler 'Karas'" in body["detail"] and "Karras" in body["detail"]
    assert "typo.safetensors" not in os.listdir(forge.folder)


def test_two_calibrations_to_one_name_never_replace_each_other(forge):
    """Both pass the first check; the second waits for the queue lock, checks again and stops."""
    results = []

    def call(seed):
        results.append(forge.post("/calibrated-samplers/calibrate",
                                  dict(CALIBRATE, method="iia_ddim", seed=seed, filename="same_name", end_to_end=False)))
    threads = [threading.Thread(target=call, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 400], results
    winner = next(body for status, body in results if status == 200)
    loser = next(body for status, body in results if status == 400)
    assert "already exists" in loser["detail"]
    import hashlib
    with open(os.path.join(forge.folder, "same_name.safetensors"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest().startswith(winner["hash"])  # the first one's, whole


def test_hires_fix_states_both_passes(forge, calibrated):
    """The first pass matches the file; the second runs other sigmas (denoise 0.5) uncalibrated and says so
    on its own line instead of overwriting the first's."""
    info, _ = forge.txt2img(LABELS["iia_dpmpp_2m"], enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                            denoising_strength=0.5, hr_second_pass_steps=4,
                            hr_additional_modules=["Use same choices"])  # Forge's API fails without it
    text = info["infotexts"][0]
    assert "Calibration: forge_iia.safetensors" in text
    assert 'Hires calibration: "none: uncalibrated, the dpmpp_2m solver"' in text


def test_a_range_file_serves_a_cfg_between_its_fitted_ones_and_the_hires_pass(forge, calibrated):
    """cfg_list and denoise_list through the route: one file; txt2img at a cfg between the fitted ones and the hires
    pass at the fitted denoise both find it (forge_iia.safetensors, made for cfg 5, cannot match cfg 4.5)."""
    status, body = forge.post("/calibrated-samplers/calibrate", dict(
        CALIBRATE, method="iia_dpmpp_2m", filename="forge_range", cfg_list="4, 6", denoise_list="1, 0.5",
        end_to_end=False))
    assert status == 200, body
    assert body["entries"] == 6 and "cfg 4-6" in body["serves"]  # per cfg: txt2img, img2img's and hires fix's cut
    info, _ = forge.txt2img(LABELS["iia_dpmpp_2m"], cfg=4.5, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                            denoising_strength=0.5, hr_second_pass_steps=4, hr_cfg=4.5,
                            hr_additional_modules=["Use same choices"])
    text = info["infotexts"][0]
    assert "Calibration: forge_range.safetensors" in text and "Hires calibration: forge_range.safetensors" in text
    info, _ = forge.txt2img(LABELS["iia_dpmpp_2m"], cfg=7.0)
    assert 'Calibration: "none: uncalibrated' in info["infotexts"][0]


def test_an_afs_calibration_through_the_route(forge, calibrated):
    """``afs`` in the API: the file keeps the option and txt2img uses it; with a denoise below 1 it is refused (400)
    before any work, with the reason."""
    status, body = forge.post("/calibrated-samplers/calibrate", dict(
        CALIBRATE, method="iia_dpmpp_2m", filename="forge_afs", afs=True, end_to_end=False))
    assert status == 200, body
    assert load(os.path.join(forge.folder, "forge_afs.safetensors")).options == {"afs": True}
    os.rename(os.path.join(forge.folder, "forge_iia.safetensors"), os.path.join(forge.folder, "forge_iia.moved"))
    try:  # the two files fit the same setting: the AFS one alone must be found
        info, _ = forge.txt2img(LABELS["iia_dpmpp_2m"])
    finally:
        os.rename(os.path.join(forge.folder, "forge_iia.moved"), os.path.join(forge.folder, "forge_iia.safetensors"))
        os.remove(os.path.join(forge.folder, "forge_afs.safetensors"))
    assert f"Calibration: forge_afs.safetensors ({body['hash']})" in info["infotexts"][0]
    status, body = forge.post("/calibrated-samplers/calibrate", dict(
        CALIBRATE, method="iia_dpmpp_2m", filename="forge_afs_hires", afs=True, denoise_list="1, 0.5"))
    assert status == 400 and "pure noise" in body["detail"]


def test_calibrate_on_first_use_option(forge, calibrated):
    """The web UI option: a txt2img run no file fits is calibrated first, saved, named in the infotext; the next
    run at that setting uses the file without calibrating again."""
    status, body = forge.post("/sdapi/v1/options", {"calibrated_samplers_first_use": True,
                                                    "calibrated_samplers_first_use_batch": 4})
    assert status == 200, body
    try:
        before = set(os.listdir(forge.folder))
        info, _ = forge.txt2img(LABELS["iia_ddim"], steps=3, cfg=5.5)
        (made,) = set(os.listdir(forge.folder)) - before
        assert made.startswith("auto_iia_ddim_3steps_cfg5.5_") and load(os.path.join(forge.folder, made)).steps == 3
        assert f"Calibration: {made} (" in info["infotexts"][0]
        info, _ = forge.txt2img(LABELS["iia_ddim"], steps=3, cfg=5.5, seed=7)
        assert f"Calibration: {made} (" in info["infotexts"][0] and set(os.listdir(forge.folder)) - before == {made}
        # with the afs option a new setting gets a file of its own, written with the option
        status, body = forge.post("/sdapi/v1/options", {"calibrated_samplers_first_use_afs": True})
        assert status == 200, body
        info, _ = forge.txt2img(LABELS["iia_ddim"], steps=4, cfg=5.5)
        (afs_made,) = set(os.listdir(forge.folder)) - before - {made}
        assert afs_made.endswith("_afs.safetensors") and load(os.path.join(forge.folder, afs_made)).options == {"afs": True}
        assert f"Calibration: {afs_made} (" in info["infotexts"][0]
    finally:
        forge.post("/sdapi/v1/options", {"calibrated_samplers_first_use": False,
                                         "calibrated_samplers_first_use_afs": False})


def test_interrupt_writes_nothing(forge, calibrated):
    result = {}

    def call():
        result["r"] = forge.post("/calibrated-samplers/calibrate",
                                 dict(CALIBRATE, method="iia_ddim", batch_size=256, fine_steps=10, filename="interrupted"))
    t = threading.Thread(target=call)
    t.start()
    time.sleep(8)
    forge.http("POST", "/sdapi/v1/interrupt")
    t.join(600)
    status, body = result["r"]
    assert status == 409 and "nothing was written" in body["detail"]
    assert "interrupted.safetensors" not in os.listdir(forge.folder)
    assert not [f for f in os.listdir(forge.folder) if f.startswith(".tmp")]


@pytest.mark.skipif(not servers.COMFY, reason="also needs COMFYUI_DIR to move files between the two UIs")
def test_one_file_both_uis(forge, calibrated, tmp_path_factory):
    """A file the ComfyUI Calibrate node wrote for the same checkpoint file is used by the web UI, and the reverse."""
    from calibrated_samplers.tests.test_comfyui_integration import example
    comfy = servers.Comfy.start(str(tmp_path_factory.mktemp("comfy_cross")), extra_checkpoints=[servers.FORGE_CKPT])
    try:
        ckpt = os.path.basename(servers.FORGE_CKPT)
        wf = example("calibrate_then_sample", ckpt=ckpt, filename="from_comfy", steps=4)
        entry = comfy.run(wf)
        assert entry["status"]["status_str"] == "success", comfy_error(entry)
        made_in_comfy = os.path.join(comfy.folder, "from_comfy.safetensors")
        assert load(made_in_comfy).info["fingerprint"] == load(os.path.join(forge.folder, "forge_iia.safetensors")).info["fingerprint"]
        os.remove(os.path.join(forge.folder, "forge_iia.safetensors"))
        shutil.copy(made_in_comfy, forge.folder)
        info, _ = forge.txt2img(LABELS["iia_dpmpp_2m"])
        assert "Calibration: from_comfy.safetensors" in info["infotexts"][0]
        shutil.copy(os.path.join(forge.folder, "forge_amed.safetensors"), comfy.folder)
        ks = example("ksampler_with_saved_calibration", ckpt=ckpt)
        ks["3"]["inputs"].update(steps=4, sampler_name="amed_euler")
        entry = comfy.run(ks)
        assert entry["status"]["status_str"] == "success", comfy_error(entry)
        assert "amed_euler: using forge_amed.safetensors" in entry["log"]
    finally:
        comfy.stop()


TAB_CHECK = """
import importlib.util, sys, types
schedulers = types.SimpleNamespace(schedulers=[types.SimpleNamespace(label="Automatic"), types.SimpleNamespace(label="Karras")])
shared = types.SimpleNamespace(state=types.SimpleNamespace(interrupt=lambda: None))
modules = types.ModuleType("modules")
modules.sd_schedulers, modules.shared = schedulers, shared
sys.modules.update({"modules": modules, "modules.sd_schedulers": schedulers, "modules.shared": shared})
spec = importlib.util.spec_from_file_location("cs_script", sys.argv[1])
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
script.load_pack()
(tab, title, elem), = script.ui_tab(object())
print(type(tab).__name__, title, len(tab.blocks))
"""


def test_the_ui_tab_builds_with_the_web_uis_gradio():
    """The tab is not reachable headless (--nowebui), so build it with Forge's own gradio."""
    import subprocess
    out = subprocess.run([servers.FORGE_PYTHON, "-c", TAB_CHECK, os.path.join(servers.ROOT, "scripts", "calibrated_samplers.py")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:3] == ["Blocks", "Calibrated", "Samplers"]
