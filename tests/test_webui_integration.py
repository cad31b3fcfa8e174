"""Against a real web UI, Forge and AUTOMATIC1111 alike (FORGE_DIR, FORGE_PYTHON, FORGE_CKPT; A1111_DIR,
A1111_PYTHON, A1111_CKPT, A1111_HF_HOME; see tests/servers.py and README "Tests"): the extension linked in, its
samplers listed and run by name, the calibrate route, infotext and the warnings an API client reads, interruption,
and files moving between ComfyUI and the web UI (that last part also needs COMFYUI_DIR). Each test runs once per
web UI that is set; a web UI that is not set is skipped."""
import os
import shutil
import threading
import time

import pytest

from calibrated_samplers.calibration import load
from calibrated_samplers.tests import servers
from calibrated_samplers.tests.servers import comfy_error

LABELS = {"iia_ddim": "IIA DDIM (calibrated)", "iia_dpmpp_2m": "IIA DPM++ 2M (calibrated)",
          "amed_euler": "AMED Euler (calibrated)"}
CALIBRATE = {"steps": 4, "scheduler": "Karras", "cfg": 5.0, "width": 64, "height": 64, "prompts": ["a tiny test", "a cat"],
             "batch_size": 8, "fine_steps": 3, "seed": 1, "chunk_size": 4}
UIS = [pytest.param(kind, marks=pytest.mark.skipif(not servers.WebUI.available(kind), reason=f"set {variables}"))
       for kind, variables in (("forge", "FORGE_DIR, FORGE_PYTHON and FORGE_CKPT to test against a real Forge"),
                               ("a1111", "A1111_DIR, A1111_PYTHON and A1111_CKPT to test against a real A1111"))]


@pytest.fixture(scope="module", params=UIS)
def webui(request, tmp_path_factory):
    srv = servers.WebUI.start(request.param, str(tmp_path_factory.mktemp(f"{request.param}_data")))
    yield srv
    srv.stop()


def hires(webui, cfg=None):
    """txt2img's hires-fix fields; Forge's API fails without its module choice and has a cfg of its own for the
    second pass (A1111 guides it at the first pass's)."""
    fields = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.5,
              "hr_second_pass_steps": 4}
    if webui.kind == "forge":
        fields["hr_additional_modules"] = ["Use same choices"]
        if cfg is not None:
            fields["hr_cfg"] = cfg
    return fields


@pytest.fixture(scope="module")
def calibrated(webui):
    status, body = webui.post("/calibrated-samplers/calibrate",
                              dict(CALIBRATE, method="iia_dpmpp_2m", filename="ui_iia"))
    assert status == 200, body
    # the end-to-end stage (with the UNet's blocks checkpointed) runs in the first; the rest skip it to keep the suite
    # short (each stage is 13-30 min on two shared cores)
    status, amed = webui.post("/calibrated-samplers/calibrate", dict(CALIBRATE, method="amed_euler", filename="ui_amed",
                                                                      end_to_end=False))
    assert status == 200, amed
    return body


def test_every_sampler_is_listed_once_and_runs_under_its_own_name(webui):
    import json
    listed = [s["name"] for s in json.loads(webui.http("GET", "/sdapi/v1/samplers")[1])]
    import importlib.util
    spec = importlib.util.spec_from_file_location("cs_script", os.path.join(servers.ROOT, "scripts", "calibrated_samplers.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for label in script.LABELS.values():
        assert listed.count(label) == 1, label
        info, _ = webui.txt2img(label, steps=4)
        assert info["sampler_name"] == label  # the web UI silently swaps unknown names


def test_calibrate_route_writes_a_file_the_sampler_uses(webui, calibrated):
    path = os.path.join(webui.folder, "ui_iia.safetensors")
    cal = load(path)
    assert cal.method == "iia_dpmpp_2m" and cal.info["cfg"] == 5.0 and cal.info["prompts"] == 2
    assert cal.info["made_by"] == "web UI calibrate" and calibrated["file"] == "ui_iia.safetensors"
    assert cal.info["sigma_min"] == pytest.approx(0.0292, rel=0.01)  # SD1.5's smallest sigma, as ComfyUI passes it
    assert [round(s, 4) for s in calibrated["sigmas"]] == [round(float(s), 4) for s in cal.sigmas]
    assert calibrated["warnings"] == []  # what an API client hears of a skipped stage: nothing skipped on a CPU
    info, image = webui.txt2img(LABELS["iia_dpmpp_2m"])
    assert f"Calibration: ui_iia.safetensors ({calibrated['hash']})" in info["infotexts"][0]
    _, base = webui.txt2img("DPM++ 2M")
    assert (image != base).any()
    info, amed = webui.txt2img(LABELS["amed_euler"])
    assert "Calibration: ui_amed.safetensors" in info["infotexts"][0]
    # another cfg: no file matches, the base runs, and the infotext and console say so
    start = os.path.getsize(webui.log)
    info, fallback = webui.txt2img(LABELS["iia_dpmpp_2m"], cfg=3.0)
    assert 'Calibration: "none: uncalibrated, the dpmpp_2m solver"' in info["infotexts"][0]
    assert "running UNCALIBRATED: the dpmpp_2m solver" in webui.log_since(start)
    # what an API client reads (A1111's response has no comments): the warning in the info JSON and the infotext
    warning = info["extra_generation_params"]["Calibration warning"]
    assert warning.startswith("IIA DPM++ 2M (calibrated) ran UNCALIBRATED") and "was made for cfg 5" in warning
    assert "Calibration warning: " in info["infotexts"][0]
    assert "Calibration warning" not in webui.txt2img(LABELS["iia_dpmpp_2m"])[0]["extra_generation_params"]
    _, stock = webui.txt2img("DPM++ 2M", cfg=3.0)
    assert abs(fallback - stock).max() <= 1


def test_bad_requests_are_refused_with_a_reason(webui, calibrated):
    status, body = webui.post("/calibrated-samplers/calibrate", dict(CALIBRATE, method="gddim", filename="x"))
    assert status == 400 and "method must be one of" in body["detail"]
    status, body = webui.post("/calibrated-samplers/calibrate", dict(CALIBRATE, method="iia_ddim", filename="ui_iia"))
    assert status == 400 and "already exists" in body["detail"]


def test_unknown_scheduler_is_refused_with_the_valid_names(webui):
    status, body = webui.post("/calibrated-samplers/calibrate", dict(CALIBRATE, method="iia_ddim", scheduler="Karas",
                                                                   filename="typo"))
    assert status == 400 and "unknown scheduler 'Karas'" in body["detail"] and "Karras" in body["detail"]
    assert "typo.safetensors" not in os.listdir(webui.folder)


def test_two_calibrations_to_one_name_never_replace_each_other(webui):
    """Both pass the first check; the second waits for the queue lock, checks again and stops."""
    results = []

    def call(seed):
        results.append(webui.post("/calibrated-samplers/calibrate",
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
    with open(os.path.join(webui.folder, "same_name.safetensors"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest().startswith(winner["hash"])  # the first one's, whole


def test_hires_fix_states_both_passes(webui, calibrated):
    """The first pass matches the file; the second runs other sigmas (denoise 0.5) uncalibrated and says so
    on its own line instead of overwriting the first's."""
    info, _ = webui.txt2img(LABELS["iia_dpmpp_2m"], **hires(webui))
    text = info["infotexts"][0]
    assert "Calibration: ui_iia.safetensors" in text
    assert 'Hires calibration: "none: uncalibrated, the dpmpp_2m solver"' in text
    assert "UNCALIBRATED" in info["extra_generation_params"]["Hires calibration warning"]
    assert "Calibration warning" not in info["extra_generation_params"]  # the first pass found its file


def test_a_range_file_serves_a_cfg_between_its_fitted_ones_and_the_hires_pass(webui, calibrated):
    """cfg_list and denoise_list through the route: one file; txt2img at a cfg between the fitted ones and the hires
    pass at the fitted denoise both find it (ui_iia.safetensors, made for cfg 5, cannot match cfg 4.5)."""
    status, body = webui.post("/calibrated-samplers/calibrate", dict(
        CALIBRATE, method="iia_dpmpp_2m", filename="ui_range", cfg_list="4, 6", denoise_list="1, 0.5",
        end_to_end=False))
    assert status == 200, body
    assert body["entries"] == 6 and "cfg 4-6" in body["serves"]  # per cfg: txt2img, img2img's and hires fix's cut
    info, _ = webui.txt2img(LABELS["iia_dpmpp_2m"], cfg=4.5, **hires(webui, cfg=4.5))
    text = info["infotexts"][0]
    assert "Calibration: ui_range.safetensors" in text and "Hires calibration: ui_range.safetensors" in text
    info, _ = webui.txt2img(LABELS["iia_dpmpp_2m"], cfg=7.0)
    assert 'Calibration: "none: uncalibrated' in info["infotexts"][0]


def test_an_afs_calibration_through_the_route(webui, calibrated):
    """``afs`` in the API: the file keeps the option and txt2img uses it; with a denoise below 1 it is refused (400)
    before any work, with the reason."""
    status, body = webui.post("/calibrated-samplers/calibrate", dict(
        CALIBRATE, method="iia_dpmpp_2m", filename="ui_afs", afs=True, end_to_end=False))
    assert status == 200, body
    assert load(os.path.join(webui.folder, "ui_afs.safetensors")).options == {"afs": True}
    os.rename(os.path.join(webui.folder, "ui_iia.safetensors"), os.path.join(webui.folder, "ui_iia.moved"))
    try:  # the two files fit the same setting: the AFS one alone must be found
        info, _ = webui.txt2img(LABELS["iia_dpmpp_2m"])
    finally:
        os.rename(os.path.join(webui.folder, "ui_iia.moved"), os.path.join(webui.folder, "ui_iia.safetensors"))
        os.remove(os.path.join(webui.folder, "ui_afs.safetensors"))
    assert f"Calibration: ui_afs.safetensors ({body['hash']})" in info["infotexts"][0]
    status, body = webui.post("/calibrated-samplers/calibrate", dict(
        CALIBRATE, method="iia_dpmpp_2m", filename="ui_afs_hires", afs=True, denoise_list="1, 0.5"))
    assert status == 400 and "pure noise" in body["detail"]


def test_calibrate_on_first_use_option(webui, calibrated):
    """The web UI option: a txt2img run no file fits is calibrated first, saved, named in the infotext; the next
    run at that setting uses the file without calibrating again."""
    status, body = webui.post("/sdapi/v1/options", {"calibrated_samplers_first_use": True,
                                                    "calibrated_samplers_first_use_batch": 4})
    assert status == 200, body
    try:
        before = set(os.listdir(webui.folder))
        info, _ = webui.txt2img(LABELS["iia_ddim"], steps=3, cfg=5.5)
        (made,) = set(os.listdir(webui.folder)) - before
        assert made.startswith("auto_iia_ddim_3steps_cfg5.5_") and load(os.path.join(webui.folder, made)).steps == 3
        assert f"Calibration: {made} (" in info["infotexts"][0]
        info, _ = webui.txt2img(LABELS["iia_ddim"], steps=3, cfg=5.5, seed=7)
        assert f"Calibration: {made} (" in info["infotexts"][0] and set(os.listdir(webui.folder)) - before == {made}
        # with the afs option a new setting gets a file of its own, written with the option
        status, body = webui.post("/sdapi/v1/options", {"calibrated_samplers_first_use_afs": True})
        assert status == 200, body
        info, _ = webui.txt2img(LABELS["iia_ddim"], steps=4, cfg=5.5)
        (afs_made,) = set(os.listdir(webui.folder)) - before - {made}
        assert afs_made.endswith("_afs.safetensors") and load(os.path.join(webui.folder, afs_made)).options == {"afs": True}
        assert f"Calibration: {afs_made} (" in info["infotexts"][0]
    finally:
        webui.post("/sdapi/v1/options", {"calibrated_samplers_first_use": False,
                                         "calibrated_samplers_first_use_afs": False})


def test_interrupt_writes_nothing(webui):
    """Interrupt once the calibration is under way (its progress text is up): the route answers 409 and writes
    nothing."""
    import json
    result = {}

    def call():
        result["r"] = webui.post("/calibrated-samplers/calibrate",
                                 dict(CALIBRATE, method="iia_ddim", batch_size=256, fine_steps=10, filename="interrupted"))
    t = threading.Thread(target=call)
    t.start()
    deadline, said = time.time() + 600, ""
    while time.time() < deadline:  # the calibration's own work has begun: its progress text says what it will spend
        said = json.loads(webui.http("GET", "/sdapi/v1/progress?skip_current_image=true")[1]).get("textinfo") or ""
        if "model evaluations planned" in said:
            break
        time.sleep(0.5)
    webui.http("POST", "/sdapi/v1/interrupt")
    t.join(600)
    status, body = result["r"]
    assert status == 409 and "nothing was written" in body["detail"]
    # API clients and the console heard the plan before the work: 256 noises, the end-to-end stage most of it
    assert said.startswith("Calibrated Samplers: calibrating iia_ddim, ") and "for 256 noises" in said, said
    assert "[Calibrated Samplers] iia_ddim: about " in webui.log_since(0)
    assert "interrupted.safetensors" not in os.listdir(webui.folder)
    assert not [f for f in os.listdir(webui.folder) if f.startswith(".tmp")]


@pytest.mark.skipif(not servers.COMFY, reason="also needs COMFYUI_DIR to move files between the two UIs")
def test_one_file_both_uis(webui, calibrated, tmp_path_factory):
    """A file the ComfyUI Calibrate node wrote for the same checkpoint file is used by the web UI, and the reverse."""
    from calibrated_samplers.tests.test_comfyui_integration import example
    comfy = servers.Comfy.start(str(tmp_path_factory.mktemp("comfy_cross")), extra_checkpoints=[webui.ckpt])
    try:
        ckpt = os.path.basename(webui.ckpt)
        wf = example("calibrate_then_sample", ckpt=ckpt, filename="from_comfy", steps=4)
        entry = comfy.run(wf)
        assert entry["status"]["status_str"] == "success", comfy_error(entry)
        made_in_comfy = os.path.join(comfy.folder, "from_comfy.safetensors")
        assert load(made_in_comfy).info["fingerprint"] == load(os.path.join(webui.folder, "ui_iia.safetensors")).info["fingerprint"]
        os.remove(os.path.join(webui.folder, "ui_iia.safetensors"))
        shutil.copy(made_in_comfy, webui.folder)
        info, _ = webui.txt2img(LABELS["iia_dpmpp_2m"])
        assert "Calibration: from_comfy.safetensors" in info["infotexts"][0]
        shutil.copy(os.path.join(webui.folder, "ui_amed.safetensors"), comfy.folder)
        ks = example("ksampler_with_saved_calibration", ckpt=ckpt)
        ks["3"]["inputs"].update(steps=4, sampler_name="amed_euler")
        entry = comfy.run(ks)
        assert entry["status"]["status_str"] == "success", comfy_error(entry)
        assert "amed_euler: using ui_amed.safetensors" in entry["log"]
    finally:
        comfy.stop()


MADE = {}  # web UI kind -> its calibrations folder, once its tests have run


def test_files_move_between_the_web_uis(webui, calibrated):
    """The other web UI's file for the same checkpoint (made earlier in this session) is used here: the same
    fingerprint, found and named in the infotext."""
    MADE[webui.kind] = webui.folder
    others = [kind for kind in MADE if kind != webui.kind]
    if not others:
        pytest.skip("needs both web UIs in one session (set FORGE_* and A1111_*)")
    theirs = os.path.join(MADE[others[0]], "ui_amed.safetensors")
    mine = os.path.join(webui.folder, "ui_amed.safetensors")
    assert load(theirs).info["fingerprint"] == load(mine).info["fingerprint"]
    shutil.copy(theirs, os.path.join(webui.folder, f"from_{others[0]}.safetensors"))
    os.rename(mine, mine + ".moved")
    try:  # both fit: only the other UI's may be found
        info, _ = webui.txt2img(LABELS["amed_euler"])
    finally:
        os.rename(mine + ".moved", mine)
    assert f"Calibration: from_{others[0]}.safetensors" in info["infotexts"][0]


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


@pytest.mark.parametrize("kind", UIS)
def test_the_ui_tab_builds_with_the_web_uis_gradio(kind):
    """The tab is not reachable headless (--nowebui), so build it with the web UI's own gradio."""
    import subprocess
    script = os.path.join(servers.ROOT, "scripts", "calibrated_samplers.py")
    out = subprocess.run([servers.WebUI.python(kind), "-c", TAB_CHECK, script],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:3] == ["Blocks", "Calibrated", "Samplers"]
