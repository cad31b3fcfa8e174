"""The time a calibration has left, from its progress so far, as one short text every UI shows the same way."""
import time


def _duration(seconds):
    if seconds < 60:
        return "under a minute"
    minutes = round(seconds / 60)
    return f"about {minutes} min" if minutes < 60 else f"about {minutes // 60} h {minutes % 60:02d} min"


class TimeLeft:
    """``text(done, total)``: how far the work is and, once a unit of it is done, about how long is left.

    The rate is measured from the first call on (the setup before it, the model's loading, is not the work's pace);
    the stages differ in cost per progress unit, so the estimate is rough and says so ("about").
    """

    def __init__(self, clock=time.monotonic):
        self.clock, self.start = clock, None
        self.note = None  # said after the estimate, e.g. the planned evaluations (planned_text)

    def text(self, done, total):
        return self.estimate(done, total) + (f"; {self.note}" if self.note else "")

    def estimate(self, done, total):
        """``text`` without the note: how far, and the time left."""
        now, share = self.clock(), f"{100 * done / max(total, 1):.0f}%"
        if self.start is None or done <= self.start[1]:
            if self.start is None:
                self.start = (now, done)
            return f"{share}, estimating the time left"
        t0, d0 = self.start
        left = (now - t0) / (done - d0) * max(total - done, 0)
        return f"{share}, {_duration(left)} left"


def planned_text(plan):
    """What a calibration will spend (engine.plan, ranges.plan_range), in words, for before it starts."""
    e2e = plan.get("stages", {}).get("end to end", 0.0) / max(plan["per_noise"], 1e-9)
    limit = plan.get("time_limit")
    stage = "" if e2e < 0.005 else f"; {e2e:.0%} of it the end-to-end stage" + (
        f", which stops after {_minutes(limit)} if sooner" if limit else "")
    return (f"about {int(round(plan['total'])):,} model evaluations planned ({plan['per_noise']:.0f} per noise for "
            f"{plan['noises']} noises, a backward pass counted as two{stage})")


def _minutes(seconds):
    minutes = seconds / 60
    return f"{minutes:g} min" if minutes < 60 else f"{minutes / 60:g} h"
