"""The held-out protocol (benchmarks/PROTOCOL.md) is enforced in code: a benchmark script refuses to run the
calibration with anything but its defaults on a held-out model, and allows it on the digits models."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks")


@pytest.fixture(scope="module")
def protocol():
    sys.path.insert(0, BENCH)
    try:
        import protocol
        yield protocol
    finally:
        sys.path.remove(BENCH)


@pytest.mark.parametrize("model", ["shapes-eps", "textures-flow"])
def test_tuning_on_a_held_out_model_is_refused(protocol, model):
    with pytest.raises(protocol.HeldOutError, match="held-out model") as e:
        protocol.check_may_tune(model, {"learning_rate": 0.05})
    assert "learning_rate" in str(e.value) and "digits-eps" in str(e.value)


@pytest.mark.parametrize("model", ["shapes-eps", "textures-flow"])
def test_measuring_a_held_out_model_with_the_defaults_is_allowed(protocol, model):
    protocol.check_may_tune(model, {})


@pytest.mark.parametrize("model", ["digits-eps", "digits-flow", "digits-eps-narrow"])
def test_tuning_on_digits_is_allowed(protocol, model):
    protocol.check_may_tune(model, {"learning_rate": 0.05, "budget": 10.0})


def test_the_stage_diagnostic_refuses_overrides_on_a_held_out_model():
    """The script exits with the protocol's message before any work (no calibration, no reference solve)."""
    out = subprocess.run([sys.executable, os.path.join(BENCH, "stage.py"), "shapes-eps:1", "--set",
                          "learning_rate=0.05"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "HeldOutError" in out.stderr and "only ever measured" in out.stderr
