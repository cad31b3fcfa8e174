"""The time left a calibration shows (calibration/progress.py): measured from the first report on, as plain text."""
from calibrated_samplers.calibration.progress import TimeLeft


def test_time_left_is_estimated_from_the_pace_since_the_first_report():
    now = [100.0]
    left = TimeLeft(clock=lambda: now[0])
    assert left.text(0, 10) == "0%, estimating the time left"  # the setup before the first report is not the pace
    now[0] += 120.0
    assert left.text(2, 10) == "20%, about 8 min left"  # 2 units in 2 min: 8 more
    now[0] += 6 * 3600 - 120
    assert left.text(5, 10) == "50%, about 6 h 00 min left"
    now[0] += 10
    assert left.text(10, 10) == "100%, under a minute left"


def test_no_estimate_before_a_unit_of_work_is_done():
    now = [0.0]
    left = TimeLeft(clock=lambda: now[0])
    left.text(3, 10)
    now[0] = 50.0
    assert left.text(3, 10) == "30%, estimating the time left"
    assert left.text(4, 10) == "40%, about 5 min left"  # 1 unit in 50 s, 6 left
