"""Every calibration entry refuses a request that cannot work before any work starts, with the same message:
the ComfyUI node, the web UI's calibrate function (route and tab), the CLI and calibrate()."""
import importlib.util
import os
import sys
import types

import pytest

from calibrated_samplers.calibration import calibrate
from calibrated_samplers.calibration.cli import main
from calibrated_samplers.calibration.requests import RequestError, check_request, min_batch
from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras
from calibrated_samplers.tests import comfy_standins as cs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = {  # input -> (keyword arguments of check_request, words the message must have)
    "zero steps": (dict(steps=0), "steps must be"),
    "negative steps": (dict(steps=-3), "steps must be"),
    "negative cfg": (dict(cfg=-1.0), "cfg must be 0 or more"),
    "width not a multiple of 8": (dict(width=500), "width must be a multiple of 8"),
    "height not a multiple of 8": (dict(height=513), "height must be a multiple of 8"),
    "batch below the split": (dict(batch_size=2, prompts=1), "use at least 3"),
    "batch below the split for 4 prompts": (dict(batch_size=10, prompts=4), "use at least 12"),
    "newline in the file name": (dict(filename="cal\nx"), "not usable"),
    "control character in the file name": (dict(filename="cal\x07"), "not usable"),
    "file name too long": (dict(filename="c" * 201), "at most 200"),
}


def test_min_batch_is_what_the_engine_can_split():
    assert min_batch(1) == 3 and min_batch(4) == 12 and min_batch(2, holdout=0.5) == 4
    mix = GaussianMixture()
    for prompts in (1, 3):
        need = min_batch(prompts)
        conds = [{"cond": c} for c in range(prompts)]
        calibrate(mix.edm(), karras(3, 0.1, 10.0), "iia_ddim", mix.noise(need) * 10, conds, family="edm",
                  end_to_end=False, fine_steps=2)
        with pytest.raises(RequestError, match=f"use at least {need}"):
            calibrate(mix.edm(), karras(3, 0.1, 10.0), "iia_ddim", mix.noise(need - 1) * 10, conds, family="edm")


@pytest.mark.parametrize("what", sorted(BAD))
def test_each_rule_names_the_input_and_the_fix(what):
    kwargs, words = BAD[what]
    with pytest.raises(RequestError, match=words):
        check_request(**kwargs)


def test_good_requests_pass():
    check_request(steps=8, cfg=0.0, width=512, height=768, batch_size=32, prompts=4, filename="sd15 v2.safetensors")


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    return cs.install(monkeypatch, str(tmp_path))


@pytest.mark.parametrize("bad", [dict(steps=0), dict(cfg=-2.0), dict(width=500), dict(batch_size=4),
                                 dict(filename="two\nlines")])
def test_the_comfyui_node_refuses_before_any_work(comfy, monkeypatch, bad):
    from calibrated_samplers.nodes import pack
    pack.register_folder()
    started = []
    monkeypatch.setattr(pack, "make_guider", lambda *a: started.append(1))
    args = dict(model=cs.Patcher(), positive=[["p0", {}], ["p1", {}]], negative=[["n", {}]], cfg=2.0,
                method="iia_dpmpp_2m", scheduler="karras", steps=5, fine_steps=3, batch_size=8, seed=0,
                filename="mine", width=64, height=64)
    args.update(bad)
    with pytest.raises(RequestError):
        pack.calibrate_node(**args)
    assert not started and not comfy.bars


def test_the_cli_refuses_before_any_work(tmp_path):
    for argv, words in ((["--steps", "0"], "steps must be"), (["--cfg", "-1"], "cfg must be"),
                        (["--cfg", "3", "--batch", "10"], "use at least 12")):
        with pytest.raises(SystemExit, match=words):
            main(["calibrate", "--model", "analytic-edm", "--quiet", "--out", str(tmp_path / "x.safetensors")] + argv)
    assert not (tmp_path / "x.safetensors").exists()


def test_the_web_ui_refuses_before_taking_the_queue(monkeypatch, tmp_path):
    """The route and the tab both call calibrate_in_webui; a bad request never reaches the web UI's queue lock."""
    spec = importlib.util.spec_from_file_location("cs_webui_requests", os.path.join(ROOT, "scripts",
                                                                                    "calibrated_samplers.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    taken = []

    class Lock:
        def __enter__(self):
            taken.append(1)

        def __exit__(self, *exc):
            return False

    modules = types.ModuleType("modules")
    for name in ("call_queue", "processing", "shared"):
        setattr(modules, name, types.SimpleNamespace(queue_lock=Lock()))
        monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(modules, name))
    monkeypatch.setitem(sys.modules, "modules", modules)
    env = types.SimpleNamespace(folder=lambda: str(tmp_path), schedulers=lambda: ["Automatic", "Karras", "karras"])
    for bad, words in ((dict(steps=0), "steps must be"), (dict(width=500), "multiple of 8"),
                       (dict(batch_size=4, prompts=["a", "b"]), "use at least 6"),
                       (dict(filename="a\nb"), "not usable"),
                       (dict(scheduler="Karas"), "unknown scheduler 'Karas': use one of Automatic, Karras")):
        args = dict(method="iia_dpmpp_2m", steps=8, scheduler="Karras", cfg=5.0, width=512, height=512,
                    prompts=["a photo"], batch_size=32, filename="ok")
        args.update(bad)
        with pytest.raises(ValueError, match=words):
            script.calibrate_in_webui(env, **args)
    assert not taken and os.listdir(tmp_path) == []


def test_the_web_ui_checks_the_name_again_under_the_queue_lock(monkeypatch, tmp_path):
    """Two calibrations to one name: the second waited for the lock while the first wrote the file. It must
    stop before any work, and keep the first file."""
    spec = importlib.util.spec_from_file_location("cs_webui_race", os.path.join(ROOT, "scripts",
                                                                                "calibrated_samplers.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    target = tmp_path / "same.safetensors"
    worked = []

    class Lock:  # the other calibration finishes while this one waits
        def __enter__(self):
            target.write_bytes(b"the first calibration")

        def __exit__(self, *exc):
            return False

    modules = types.ModuleType("modules")
    modules.call_queue = types.SimpleNamespace(queue_lock=Lock())
    modules.processing = types.SimpleNamespace(process_images=worked.append,
                                               StableDiffusionProcessingTxt2Img=lambda **kw: worked.append(kw))
    modules.shared = types.SimpleNamespace(sd_model=object())
    for name in ("call_queue", "processing", "shared"):
        monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(modules, name))
    monkeypatch.setitem(sys.modules, "modules", modules)
    env = types.SimpleNamespace(folder=lambda: str(tmp_path), schedulers=lambda: ["Karras"])
    with pytest.raises(FileExistsError, match="already exists"):
        script.calibrate_in_webui(env, method="iia_dpmpp_2m", steps=8, scheduler="Karras", cfg=5.0, width=512,
                                  height=512, prompts=["a photo"], batch_size=32, filename="same")
    assert not worked and target.read_bytes() == b"the first calibration"
