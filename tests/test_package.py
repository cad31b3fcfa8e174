"""The pack's shape: importable without ComfyUI, pure-torch libraries, declared dependencies."""
import ast
import os
import subprocess
import sys
import tomllib

import calibrated_samplers
from calibrated_samplers import samplers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ["iia_ddim", "iia_ddim_cfg", "iia_dpmpp_2m", "biia_edm", "iia_edm", "iia_ipndm", "iia_spndm",
            "amed", "amed_euler", "amed_dpm_2", "amed_ipndm", "amed_dpmpp_2m", "gddim"]


def imported_modules(folder, module_level=False):
    """(file, [module names], relative level) per import statement; only those at module level if asked."""
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                tree = ast.parse(open(os.path.join(dirpath, f)).read())
                for node in (tree.body if module_level else ast.walk(tree)):
                    if isinstance(node, ast.Import):
                        yield f, [a.name for a in node.names], 0
                    elif isinstance(node, ast.ImportFrom):
                        yield f, [node.module or ""], node.level


def test_every_required_sampler_is_registered_and_exported():
    assert set(REQUIRED) <= set(samplers.SAMPLERS)
    for name in REQUIRED:
        assert getattr(samplers, f"sample_{name}") is samplers.SAMPLERS[name]


def test_libraries_import_only_torch_numpy_and_themselves():
    allowed = {"torch", "numpy", "safetensors", "math", "functools", "collections", "tqdm"}
    # extras, imported only inside the functions that need them (with a clear error when absent): matplotlib for
    # the CLI's plot command; scikit-learn's bundled digits and PIL's image grid for the testbed's benchmarks
    extras = {"matplotlib", "sklearn", "PIL"}
    for folder in ("samplers", "calibration", "hosts"):
        for f, names, level in imported_modules(folder):
            for name in names:
                if level == 0:  # absolute imports: only the runtime dependencies and the standard library
                    top = name.split(".")[0]
                    assert top in allowed | extras or top in sys.stdlib_module_names, f"{folder}/{f} imports {name}"
                    assert top not in ("comfy", "nodes", "folder_paths", "modules"), f"{folder}/{f} imports {name}"
        for f, names, level in imported_modules(folder, module_level=True):
            assert level > 0 or not {n.split(".")[0] for n in names} & extras, f"{folder}/{f} imports {names} at load"


def test_root_imports_without_comfyui_and_registers_nothing():
    code = ("import sys, importlib; m = importlib.import_module('calibrated_samplers'); "
            "assert m.NODE_CLASS_MAPPINGS == {}; assert not any(k.startswith('comfy') for k in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_runtime_dependencies_are_torch_numpy_safetensors():
    meta = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in meta["project"]["dependencies"]}
    assert deps == {"torch", "numpy", "safetensors"}
    assert meta["tool"]["setuptools"]["package-dir"] == {"calibrated_samplers": "."}
    assert calibrated_samplers.__version__ == meta["project"]["version"]


def test_every_package_folder_is_installed():
    """A subpackage missing from pyproject's list imports from a checkout but not from an installed wheel."""
    listed = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]["packages"])
    found = set()
    for folder in ("samplers", "calibration", "hosts", "nodes", "tests"):
        for dirpath, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                found.add("calibrated_samplers." + os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert "calibrated_samplers.calibration.kinds" in found and found <= listed, sorted(found - listed)

def test_nothing_outside_tests_imports_tests():
    """The product and the benchmarks use calibration.testbed (models, mixture, k-diffusion loader), not tests/."""
    for folder in ("samplers", "calibration", "hosts", "nodes", "scripts", "benchmarks"):
        for f, names, level in imported_modules(folder):
            for name in names:
                parts = name.split(".")
                assert not (level == 0 and ("tests" in parts[:2])), f"{folder}/{f} imports {name}"
                assert not (level > 0 and parts[0] == "tests"), f"{folder}/{f} imports .{name}"


def test_cli_runs_with_the_tests_package_unimportable(tmp_path):
    """Blocks calibrated_samplers.tests in a fresh interpreter, then loads every bundled model and calibrates one."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'calibrated_samplers.tests' or name.startswith('calibrated_samplers.tests.'):\n"
        "            raise ImportError('tests/ is not part of the product: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from calibrated_samplers.calibration.testbed import NAMES, testbed\n"
        "for n in NAMES: testbed(n)\n"
        "from calibrated_samplers.calibration.cli import main\n"
        "main(['calibrate', '--model', 'analytic-edm', '--sampler', 'iia_ddim', '--steps', '3', '--batch', '16',\n"
        "      '--quiet', '--out', sys.argv[1]])\n")
    out = tmp_path / "cal.safetensors"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd="/")
    assert out.stat().st_size > 0


def test_the_packs_exceptions_have_a_short_stable_type_name():
    """ComfyUI shows ``module + '.' + qualname`` (execution.full_type_name); a custom node's module is its folder's
    file-system path, so every exception a user can meet names the pack instead."""
    from calibrated_samplers.calibration import CalibrationCancelled
    from calibrated_samplers.calibration.file import CalibrationFileError
    from calibrated_samplers.calibration.library import ModelMismatch
    from calibrated_samplers.calibration.requests import RequestError
    from calibrated_samplers.samplers import CalibrationMismatch
    for cls in (CalibrationCancelled, CalibrationFileError, ModelMismatch, RequestError, CalibrationMismatch):
        assert f"{cls.__module__}.{cls.__qualname__}" == f"calibrated_samplers.{cls.__name__}"


def test_example_workflows_are_light_safe_and_laid_out():
    """What the template browser offers: a title (the file name) and a picture for each, a calibration a mid GPU
    runs in a minute or two that never replaces a file, and nodes that do not sit on one another."""
    import json
    from calibrated_samplers.tests import comfy_workflows as cw
    sources = cw.sources()
    assert set(sources) == set(cw.TITLES) == set(cw.LAYOUT)
    for name, api in sources.items():
        assert os.path.isfile(cw.ui_path(name)) and os.path.isfile(cw.ui_path(name)[:-5] + ".jpg"), name
        for node in api.values():
            if node["class_type"] == "CalibratedSamplersCalibrate":
                i = node["inputs"]
                assert i["overwrite"] is False and i["batch_size"] <= 16 and i["fine_steps"] <= 6, name
                assert i["width"] * i["height"] <= 768 * 768 and 0 < i.get("max_minutes", 0) <= 2, name
        if any(n["class_type"] == "UNETLoader" for n in api.values()):  # SD3: its own three text encoders
            clip = next(n for n in api.values() if "clip_name1" in n["inputs"])
            assert clip["class_type"] == "TripleCLIPLoader"
            assert [clip["inputs"][f"clip_name{k}"] for k in (1, 2, 3)] == [
                "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"]
        with open(cw.ui_path(name)) as f:
            nodes = json.load(f)["nodes"]
        boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
                 for n in nodes]  # the title bar sits above pos
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                A, B = boxes[a], boxes[b]
                assert A[2] <= B[0] or B[2] <= A[0] or A[3] <= B[1] or B[3] <= A[1], (name, nodes[a]["id"],
                                                                                      nodes[b]["id"])


def test_the_frontend_extension_widens_nodes_that_exist():
    import re
    from calibrated_samplers.nodes.pack import NODES
    folder = os.path.join(os.path.dirname(calibrated_samplers.__file__), calibrated_samplers.WEB_DIRECTORY)
    (script,) = [f for f in os.listdir(folder) if f.endswith(".js")]
    with open(os.path.join(folder, script)) as f:
        text = f.read()
    widened = re.findall(r"(CalibratedSamplers\w+): \d+", text)
    assert widened and set(widened) <= {n.node_id for n in NODES}
