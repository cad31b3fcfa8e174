"""The held-out protocol (PROTOCOL.md) in code: settings are chosen on digits; the held-out models are only measured.

Every benchmark script that runs the calibration with anything but its defaults (a sweep, a diagnostic with
overrides) asks ``check_may_tune`` first, so a setting can never be chosen on a held-out model by accident.
"""
from calibrated_samplers.calibration.testbed.tiny import HELD_OUT


class HeldOutError(ValueError):
    """A script tried to tune the calibration on a held-out model."""


def check_may_tune(model, settings):
    """Raise HeldOutError if ``settings`` (calibrate() keyword arguments other than the defaults) would be tried on
    ``model`` and it is a held-out model; measuring it with the defaults (no settings) is what it is for."""
    if model in HELD_OUT and settings:
        raise HeldOutError(
            f"{model} is a held-out model (benchmarks/PROTOCOL.md): the calibration's settings are chosen on the "
            f"digits models only, and {model} is only ever measured with the defaults. Drop "
            f"{', '.join(sorted(settings))}, or try them on digits-eps, digits-flow or digits-eps-narrow.")
