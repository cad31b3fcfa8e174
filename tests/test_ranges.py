"""Range files: one CalibrationSet serving several step counts, denoise values and a cfg range. The file round
trip, the lookup (exact entry, interpolation between fitted cfgs, refusal outside them), the shared teacher, the
fit itself on the exact mixture, and the request parsing every UI uses."""
import pytest
import torch

from calibrated_samplers.calibration import Calibration, load
from calibrated_samplers.calibration import file as F
from calibrated_samplers.calibration.engine import _Run
from calibrated_samplers.calibration.file import CalibrationFileError, CalibrationSet
from calibrated_samplers.calibration.library import Library
from calibrated_samplers.calibration.entries import denoise_schedule
from calibrated_samplers.calibration.ranges import calibrate_range
from calibrated_samplers.calibration.teacher import SharedTeacher, Teacher
from calibrated_samplers.calibration.requests import (RequestError, check_entries, parse_cfgs, parse_denoises,
                                                      parse_steps)
from calibrated_samplers.calibration.testbed import testbed as bundled
from calibrated_samplers.calibration.testbed.analytic import karras, rmse
from calibrated_samplers.samplers import SAMPLERS

BED = bundled("analytic-eps")


def schedule(n):
    return karras(n, 0.03, 14.6)


def entry(steps, cfg, denoise=1.0, value=0.0, learned=False):
    sig = denoise_schedule(schedule, steps, denoise)
    sample = None
    if learned:  # a learned schedule: interior points pulled towards the start
        sample = sig.clone()
        sample[1:-2] = sample[1:-2] * (1.0 + value)
    return Calibration("iia_dpmpp_2m", sig, {"coeffs": torch.full((steps, 4), value, dtype=torch.float64)},
                       info={"cfg": cfg, "steps": steps, "denoise": denoise, "fingerprint": "m"}, sample_sigmas=sample)


def test_denoise_schedule_is_the_tail_of_the_longer_schedule_as_comfyui_cuts_it():
    # ComfyUI's KSampler: steps 4 at denoise 0.5 samples the last 5 sigmas of the 8-step schedule
    assert torch.equal(denoise_schedule(schedule, 4, 0.5), schedule(8)[-5:])
    assert torch.equal(denoise_schedule(schedule, 6, 1.0), schedule(6))
    assert len(denoise_schedule(schedule, 3, 0.3)) == 4 and float(denoise_schedule(schedule, 3, 0.3)[-1]) == 0


def test_a_set_round_trips_through_its_file_and_older_readers_refuse_it(tmp_path, monkeypatch):
    cset = CalibrationSet([entry(4, 3.0, value=0.1, learned=True), entry(4, 8.0, value=0.3), entry(6, 3.0, 0.5)],
                          info={"fingerprint": "m"})
    path = cset.save(str(tmp_path / "range.safetensors"))
    back = load(path)
    assert isinstance(back, CalibrationSet) and len(back) == 3 and back.info == cset.info
    for a, b in zip(cset.entries, back.entries):
        assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.params["coeffs"], b.params["coeffs"])
        assert a.info == b.info and a.options == b.options
        assert (a.sample_sigmas is None) == (b.sample_sigmas is None)
    monkeypatch.setattr(F, "READABLE_VERSIONS", ("1", "2"))  # a pack from before range files
    with pytest.raises(CalibrationFileError, match="format version '3' is not one this pack reads"):
        load(path)


def test_a_damaged_set_is_refused_with_the_entry_named(tmp_path):
    from safetensors.torch import save_file
    cset = CalibrationSet([entry(4, 3.0), entry(6, 3.0)])
    tensors, meta = cset.tensors(), cset.metadata()
    tensors["1/param.coeffs"] = torch.zeros(5, 4, dtype=torch.float64)  # 5 steps on a 6-step entry
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CalibrationFileError, match="entry 1: .*6 steps"):
        load(str(tmp_path / "bad.safetensors"))
    tensors = cset.tensors()
    tensors["7/sigmas"] = tensors["0/sigmas"].clone()
    save_file(tensors, str(tmp_path / "extra.safetensors"), metadata=meta)
    with pytest.raises(CalibrationFileError, match="unexpected tensor '7/sigmas'"):
        load(str(tmp_path / "extra.safetensors"))
    shared = schedule(4)  # two entries holding one schedule tensor still write
    CalibrationSet([Calibration("iia_ddim", shared, {"coeffs": torch.zeros(4, 2)}, info={"cfg": c}) for c in (1, 2)]
                   ).save(str(tmp_path / "shared.safetensors"))
    with pytest.raises(CalibrationFileError, match="same method"):
        CalibrationSet([entry(4, 3.0), Calibration("iia_ddim", schedule(4), {"coeffs": torch.zeros(4, 2)})])


def test_select_picks_the_schedule_and_cfg_interpolates_between_fitted_cfgs_and_refuses_outside():
    low, high = entry(4, 3.0, value=0.1, learned=True), entry(4, 8.0, value=0.6, learned=True)
    cset = CalibrationSet([low, high, entry(6, 3.0, value=0.9), entry(4, 3.0, denoise=0.5, value=0.7)])
    assert cset.select(schedule(4), "ve", 3.0)[0] is low
    assert cset.select(schedule(4), "ve", 8.0)[0] is high
    assert cset.select(denoise_schedule(schedule, 4, 0.5), "ve", 3.0)[0] is cset.entries[3]
    mid, why = cset.select(schedule(4), "ve", 4.0)
    assert why is None and mid.info["interpolated"] == {"cfg": [3.0, 8.0], "weight": 0.2}
    torch.testing.assert_close(mid.params["coeffs"], 0.8 * low.params["coeffs"] + 0.2 * high.params["coeffs"])
    torch.testing.assert_close(mid.sample_sigmas, 0.8 * low.sample_sigmas + 0.2 * high.sample_sigmas)
    assert (mid.sample_sigmas[:-1] > mid.sample_sigmas[1:]).all()  # still a valid schedule
    none, why = cset.select(schedule(4), "ve", 9.0)
    assert none is None and "fitted for cfg 3-8" in why and "cfg 9" in why
    none, why = cset.select(schedule(6), "ve", 5.0)  # 6 steps were fitted at cfg 3 only
    assert none is None and "cfg 3" in why
    none, why = cset.select(schedule(5), "ve", 3.0)
    assert none is None and "none was fitted for this run's schedule (5 steps" in why and "steps 4, 6" in why
    none, why = cset.select(schedule(4), "flow", 3.0)
    assert none is None and "flow" in why


def test_the_library_serves_a_range_file_and_prefers_a_file_fitted_at_the_exact_cfg(tmp_path):
    fp = {"id": "m"}
    CalibrationSet([entry(4, 3.0, value=0.1), entry(4, 8.0, value=0.6)], info={"fingerprint": "m"}).save(
        str(tmp_path / "range.safetensors"))
    lib = Library(lambda: sorted(str(p) for p in tmp_path.glob("*.safetensors")))
    cal, path, notes = lib.find("iia_dpmpp_2m", schedule(4), "ve", fp, cfg=5.5)
    assert path.endswith("range.safetensors") and cal.info["interpolated"]["weight"] == 0.5
    cal, path, notes = lib.find("iia_dpmpp_2m", schedule(4), "ve", fp, cfg=12.0)
    assert cal is None and any("range.safetensors: was fitted for cfg 3-8" in n for n in notes)
    cal, path, notes = lib.find("iia_dpmpp_2m", schedule(4), "ve", {"id": "other"}, cfg=5.5)
    assert cal is None and any("another model" in n for n in notes)
    entry(4, 5.5, value=0.2).save(str(tmp_path / "exact.safetensors"))  # older than nothing: the exact fit wins
    cal, path, _ = lib.find("iia_dpmpp_2m", schedule(4), "ve", fp, cfg=5.5)
    assert path.endswith("exact.safetensors") and "interpolated" not in cal.info


def test_the_shared_teacher_is_as_close_to_the_exact_flow_as_each_schedule_own_teacher():
    mix = BED.model
    conditions = BED.conditions(2.0)
    noise = torch.randn(24, *BED.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    schedules = [schedule(n) for n in (3, 4, 5)]
    start = noise * float(schedules[0][0])
    shared = SharedTeacher(mix, start, conditions, schedules, "dpmpp_2m", 6, "ve", chunk_size=8)
    assert shared.evaluations < sum(6 * (len(s) - 1) for s in schedules)  # what three own teachers cost
    for sig in schedules:
        run = _Run(mix, sig, start, conditions, shared_family(), 8, 0.25, None, None, None)
        own = Teacher(run, "dpmpp_2m", 6, {})
        for i in range(len(sig) - 1):
            own.advance(i, range(len(run.chunks)))
        exact = SAMPLERS["iia_edm"]  # Heun on 400 steps of the same span stands in for the exact flow
        fine = torch.cat([exact(mix, start[ch.sl], karras(400, 0.03, 14.6), extra_args=conditions[ch.group],
                                disable=True) for ch in run.chunks])
        assert rmse(shared.at(0.0), fine) <= 1.2 * rmse(own.endpoint(), fine) + 1e-6
        for s in sig[1:-1]:
            assert torch.isfinite(shared.at(s)).all()


def shared_family():
    from calibrated_samplers.samplers import Family
    return Family("ve")


def test_calibrate_range_fits_every_entry_and_each_beats_the_plain_solver_on_new_noise():
    conditions = lambda cfg: BED.conditions(cfg)  # noqa: E731
    noise = torch.randn(48, *BED.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    cset = calibrate_range(BED.model, schedule, "iia_dpmpp_2m", noise, steps=(3, 4), cfgs=(1.5, 3.0),
                           denoises=(1.0, 0.7), with_cfg=lambda c: (BED.model, conditions(c)), fine_steps=6,
                           progress=lambda done, total: seen.append((done, total)),
                           budget=40)  # the end-to-end stage runs in every entry, on a small budget: this is no test of it
    assert isinstance(cset, CalibrationSet) and len(cset) == 8
    assert {(c.steps, c.info["cfg"], c.info["denoise"]) for c in cset.entries} == {
        (n, c, d) for n in (3, 4) for c in (1.5, 3.0) for d in (1.0, 0.7)}
    assert cset.info["teacher_evaluations_saved_per_sample"] > 0
    assert all(b >= a for (a, _), (b, _) in zip(seen, seen[1:])) and seen[-1][0] == seen[-1][1]
    test = torch.randn(40, *BED.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    per = test.shape[0] // len(conditions(2.0))
    for cfg in (1.5, 2.25, 3.0):
        samples = mixture_samples(test, cfg)
        for n in (3, 4):
            for d in (1.0, 0.7):
                sig = denoise_schedule(schedule, n, d)
                cal, why = cset.select(sig, "ve", cfg)
                assert why is None, why
                if d == 1.0:
                    start = test * float(sig[0])
                else:  # img2img from the mixture's own samples
                    start = samples + float(sig[0]) * test.roll(3, 0)
                ref = run_all(SAMPLERS["iia_edm"], start, karras(100, 0.03, float(sig[0])), conditions(cfg), per)
                plain = rmse(run_all(SAMPLERS["iia_dpmpp_2m"], start, sig, conditions(cfg), per), ref)
                fitted = rmse(run_all(SAMPLERS["iia_dpmpp_2m"], start, sig, conditions(cfg), per, calibration=cal), ref)
                assert fitted < plain, (cfg, n, d, fitted, plain)


def run_all(fn, start, sig, conditions, per, **kw):
    return torch.cat([fn(BED.model, start[j * per:(j + 1) * per], sig, extra_args=c, disable=True, **kw)
                      for j, c in enumerate(conditions)])


def mixture_samples(noise, cfg):
    per = noise.shape[0] // len(BED.conditions(cfg))
    sig = schedule(60)
    return run_all(SAMPLERS["iia_edm"], noise * float(sig[0]), sig, BED.conditions(cfg), per)


def test_one_setting_gives_a_plain_calibration_file_as_before():
    noise = torch.randn(12, *BED.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cal = calibrate_range(BED.model, schedule, "iia_ddim", noise, BED.conditions(2.0), steps=(3,), cfgs=(2.0,),
                          fine_steps=2, end_to_end=False)
    assert isinstance(cal, Calibration) and cal.info["cfg"] == 2.0 and cal.steps == 3


def test_requests_parse_lists_and_ranges_and_name_what_is_wrong():
    assert parse_steps("4-6, 10", 8) == [4, 5, 6, 8, 10]
    assert parse_steps("", 8) == [8]
    assert parse_cfgs("3-8", 7.0) == [3.0, 5.5, 8.0]
    assert parse_cfgs("", 7.0) == [7.0]
    assert parse_cfgs("4, 6.5", 7.0) == [4.0, 6.5]
    assert parse_denoises("") == [1.0] and parse_denoises("0.3, 1, 0.5") == [1.0, 0.5, 0.3]
    with pytest.raises(RequestError, match="not understood"):
        parse_steps("four", 8)
    with pytest.raises(RequestError, match="low to high"):
        parse_cfgs("8-3", 7.0)
    with pytest.raises(RequestError, match="list them"):
        parse_denoises("0.3-0.8")
    with pytest.raises(RequestError, match="at most 1"):
        parse_denoises("1.5")
    with pytest.raises(RequestError, match="narrow the lists"):
        check_entries(list(range(1, 101)), [1.0, 2.0, 3.0], [1.0])
    assert check_entries([4, 6], [5.0], [1.0], afs=True) == 2
    with pytest.raises(RequestError, match="pure noise"):
        check_entries([4, 6], [5.0], [1.0, 0.5], afs=True)
    def untouched(*args, **kwargs):
        raise AssertionError("the model was called before the request was refused")
    with pytest.raises(RequestError, match="pure noise"):  # the library entry refuses it too, before any work
        calibrate_range(untouched, untouched, "iia_dpmpp_2m", torch.zeros(8, 2), steps=[4], denoises=[1.0, 0.5],
                        afs=True)
