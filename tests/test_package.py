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


def imported_modules(folder):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                tree = ast.parse(open(os.path.join(dirpath, f)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        yield f, [a.name for a in node.names], 0
                    elif isinstance(node, ast.ImportFrom):
                        yield f, [node.module or ""], node.level


def test_every_required_sampler_is_registered_and_exported():
    assert set(REQUIRED) <= set(samplers.SAMPLERS)
    for name in REQUIRED:
        assert getattr(samplers, f"sample_{name}") is samplers.SAMPLERS[name]


def test_libraries_import_only_torch_numpy_and_themselves():
    # matplotlib: only the CLI's plot command, imported inside it, with a clear error when absent
    allowed = {"torch", "numpy", "safetensors", "math", "functools", "collections", "tqdm", "matplotlib"}
    for folder in ("samplers", "calibration"):
        for f, names, level in imported_modules(folder):
            for name in names:
                if level == 0:  # absolute imports: only the runtime dependencies and the standard library
                    top = name.split(".")[0]
                    assert top in allowed or top in sys.stdlib_module_names, f"{folder}/{f} imports {name}"
                    assert top not in ("comfy", "nodes", "folder_paths", "modules"), f"{folder}/{f} imports {name}"


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
