"""The calibration file: round trip, atomic write, and refusal of anything damaged or foreign."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from calibrated_samplers.calibration import Calibration, CalibrationFileError, load
from calibrated_samplers.samplers import SAMPLERS, CalibrationMismatch
from calibrated_samplers.calibration.testbed.analytic import GaussianMixture, karras

MIXTURE = GaussianMixture()
SIG = karras(6, 0.03, 14.6)


def iia_calibration(**kw):
    g = torch.Generator().manual_seed(0)
    coeffs = 0.02 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    coeffs[0] = 0
    coeffs[-1, 1::2] = 0  # no second evaluation into sigma = 0
    args = dict(method="iia_edm", sigmas=SIG, params={"coeffs": coeffs}, family="eps",
                info={"cfg": 1.0, "fine_steps": 10, "fingerprint": "abc"},
                residual_before=torch.rand(6, generator=g), residual_after=torch.rand(6, generator=g) / 2,
                fallback=torch.zeros(6))
    args.update(kw)
    return Calibration(**args)


def amed_calibration():
    return Calibration("amed_ipndm", SIG, {"r": torch.full((6,), 0.45), "c": torch.ones(6) * 1.01,
                                           "a": torch.ones(6)}, options={"afs": True})


@pytest.mark.parametrize("make", [iia_calibration, amed_calibration])
def test_save_load_sample_is_bit_identical(tmp_path, make):
    cal = make()
    path = cal.save(str(tmp_path / "cal.safetensors"))
    back = load(path)
    assert back.method == cal.method and back.family == cal.family and back.options == cal.options
    assert back.info == cal.info and torch.equal(back.sigmas, cal.sigmas)
    x = MIXTURE.noise(4, 2) * 14.6
    fn = SAMPLERS[cal.method]
    a = fn(MIXTURE.edm(), x, SIG, disable=True, calibration=cal)
    b = fn(MIXTURE.edm(), x, SIG, disable=True, calibration=back)
    assert torch.equal(a, b)
    assert not torch.equal(a, fn(MIXTURE.edm(), x, SIG, disable=True))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_file_options_are_applied_and_conflicts_refused(tmp_path):
    cal = load(amed_calibration().save(str(tmp_path / "a.safetensors")))
    x = MIXTURE.noise(2, 2) * 14.6
    with pytest.raises(CalibrationMismatch, match="afs"):
        SAMPLERS["amed_ipndm"](MIXTURE.edm(), x, SIG, disable=True, calibration=cal, afs=False)
    counted = []
    SAMPLERS["amed_ipndm"](lambda x, s, **k: counted.append(1) or MIXTURE.edm()(x, s), x, SIG, disable=True,
                           calibration=cal)
    assert len(counted) == SAMPLERS["amed_ipndm"].evaluations(SIG, afs=True)


def rewrite(path, tensors=None, metadata=None):
    t = load_file(path)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        m = dict(f.metadata())
    t = tensors(t) if tensors else t
    m = metadata(m) if metadata else m
    save_file(t, path, metadata=m)


CORRUPTIONS = {
    "unknown version": (None, lambda m: {**m, "format_version": "99"}, "format version"),
    "other format": (None, lambda m: {**m, "format": "something-else"}, "format is"),
    "missing metadata": (None, lambda m: {k: v for k, v in m.items() if k != "method"}, "lacks"),
    "bad json": (None, lambda m: {**m, "options": "{not json"}, "not valid"),
    "unknown method": (None, lambda m: {**m, "method": "nope"}, "unknown sampler"),
    "unknown family": (None, lambda m: {**m, "family": "martian"}, "unknown model family"),
    "wrong base": (None, lambda m: {**m, "base": "euler"}, "base solver"),
    "wrong dtype": (lambda t: {**t, "param.coeffs": t["param.coeffs"].to(torch.float16)}, None, "dtype"),
    "wrong shape": (lambda t: {**t, "param.coeffs": t["param.coeffs"][:-1]}, None, "each of the 6 steps"),
    "bad width": (lambda t: {**t, "param.coeffs": t["param.coeffs"][:, :3].contiguous()}, None, "for its step plus"),
    "nan": (lambda t: {**t, "param.coeffs": t["param.coeffs"] * float("nan")}, None, "finite"),
    "unknown tensor": (lambda t: {**t, "pickle_me": torch.zeros(1)}, None, "unexpected tensors"),
    "no sigmas": (lambda t: {k: v for k, v in t.items() if k != "sigmas"}, None, "no sigmas"),
    "unsorted sigmas": (lambda t: {**t, "sigmas": t["sigmas"].flip(0)}, None, "decreasing"),
    "missing param": (lambda t: {k: v for k, v in t.items() if k != "param.coeffs"}, None, "needs parameters"),
}


def learned_calibration():
    learned = SIG.clone()
    learned[1:-2] *= torch.tensor([0.93, 1.04, 0.97, 1.02], dtype=torch.float64)
    cal = iia_calibration(method="iia_dpmpp_2m", sample_sigmas=learned)
    cal.params["a"] = torch.linspace(0.97, 1.03, 6, dtype=torch.float64)
    return cal


def test_learned_time_steps_and_time_scales_round_trip(tmp_path):
    cal = learned_calibration()
    back = load(cal.save(str(tmp_path / "learned.safetensors")))
    assert torch.equal(back.sample_sigmas, cal.sample_sigmas) and torch.equal(back.params["a"], cal.params["a"])
    assert cal.metadata()["format_version"] == "2" and iia_calibration().metadata()["format_version"] == "1"
    x = MIXTURE.noise(4, 2) * 14.6
    fn = SAMPLERS["iia_dpmpp_2m"]
    a, b = (fn(MIXTURE.edm(), x, SIG, disable=True, calibration=c) for c in (cal, back))
    assert torch.equal(a, b)
    without_learning = fn(MIXTURE.edm(), x, SIG, disable=True, calibration=dict(coeffs=cal.params["coeffs"]))
    assert not torch.equal(a, without_learning)


LEARNED_CORRUPTIONS = {
    "first sigma moved": (lambda t: {**t, "sample_sigmas": t["sample_sigmas"] * 1.01}, None, "same first and last"),
    "not decreasing": (lambda t: {**t, "sample_sigmas": t["sample_sigmas"][[0, 2, 1, 3, 4, 5, 6]]}, None,
                       "strictly decreasing"),
    "wrong length": (lambda t: {**t, "sample_sigmas": t["sample_sigmas"][1:].contiguous()}, None, "same length"),
    "claims version 1": (None, lambda m: {**m, "format_version": "1"}, "version 1 file cannot"),
    "negative time scale": (lambda t: {**t, "param.a": -t["param.a"]}, None, "positive number per step"),
}


DAMAGED = ([pytest.param(iia_calibration, CORRUPTIONS[w], id=w) for w in sorted(CORRUPTIONS)]
           + [pytest.param(learned_calibration, LEARNED_CORRUPTIONS[w], id=f"learned: {w}")
              for w in sorted(LEARNED_CORRUPTIONS)])


@pytest.mark.parametrize("make, corruption", DAMAGED)
def test_damaged_or_foreign_files_are_refused(tmp_path, make, corruption):
    """Plain files and files with learned time steps, each damaged one way: refused with what is wrong."""
    path = make().save(str(tmp_path / "cal.safetensors"))
    tensors, metadata, message = corruption
    rewrite(path, tensors, metadata)
    with pytest.raises(CalibrationFileError, match=message):
        load(path)


def test_truncated_and_non_safetensors_files_are_refused(tmp_path):
    path = iia_calibration().save(str(tmp_path / "cal.safetensors"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CalibrationFileError, match="truncated"):
        load(path)
    pickle_path = tmp_path / "evil.safetensors"
    torch.save({"sigmas": SIG}, pickle_path)  # a pickle wearing the extension is never unpickled
    with pytest.raises(CalibrationFileError):
        load(str(pickle_path))
    with pytest.raises(CalibrationFileError, match="no such file"):
        load(str(tmp_path / "missing.safetensors"))


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        open(a[1], "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        iia_calibration().save(str(tmp_path / "cal.safetensors"))
    assert os.listdir(tmp_path) == []


def test_metadata_is_readable_strings(tmp_path):
    path = iia_calibration().save(str(tmp_path / "cal.safetensors"))
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "iia_edm" and meta["base"] == "heun" and meta["family"] == "ve"
    assert json.loads(meta["info"])["fingerprint"] == "abc"


def test_inconsistent_calibration_cannot_be_built():
    with pytest.raises(CalibrationFileError, match="r <= 1"):
        Calibration("amed", SIG, {"r": torch.full((6,), 1.5), "c": torch.ones(6), "a": torch.ones(6)})
    with pytest.raises(CalibrationFileError, match="takes no calibration"):
        Calibration("gddim", SIG, {})


def test_save_without_replace_keeps_an_existing_file(tmp_path):
    """replace=False: a file that appeared at the path (another calibration to the same name) is kept whole."""
    path = tmp_path / "taken.safetensors"
    path.write_bytes(b"someone else's calibration")
    cal = Calibration("iia_ddim", karras(4, 0.03, 14.6), {"coeffs": torch.zeros(4, 2, dtype=torch.float64)})
    with pytest.raises(FileExistsError, match="already exists"):
        cal.save(path, replace=False)
    assert path.read_bytes() == b"someone else's calibration" and os.listdir(tmp_path) == ["taken.safetensors"]
    cal.save(tmp_path / "free.safetensors", replace=False)
    assert torch.equal(load(tmp_path / "free.safetensors").params["coeffs"], cal.params["coeffs"])
    cal.save(path)  # replace=True (the default) writes over it
    assert load(path).method == "iia_ddim"
