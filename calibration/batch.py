"""The batch a calibration works on: its noises split into chunks that never straddle a condition or the
fit/held-out split, per-sample records taken and joined chunk by chunk, and the error a cancelled run raises."""
import torch


class CalibrationCancelled(RuntimeError):
    """The ``cancel`` callback asked the calibration to stop; nothing was written."""
    __module__ = "calibrated_samplers"  # what UIs print as its type: short and the same wherever the pack lives


def check_cancel(cancel):
    """Raise CalibrationCancelled when the ``cancel`` callback (or None) asks to stop."""
    if cancel is not None and cancel():
        raise CalibrationCancelled("calibration cancelled; nothing was saved")


def take_records(records, sl, device):
    """Each record's tensors sliced to ``sl`` and moved to ``device``."""
    return [{k: (v[sl].to(device) if torch.is_tensor(v) else v) for k, v in r.items()} for r in records]


def join_records(parts, device):
    """Concatenate per-chunk lists of records (same structure in every chunk) along the batch."""
    out = []
    for recs in zip(*parts):
        out.append({k: (torch.cat([r[k].to(device) for r in recs]) if torch.is_tensor(v) else v)
                    for k, v in recs[0].items()})
    return out


class Chunk:
    """Noises the model sees in one call: ``sl`` a slice of the batch, or an index tensor (the end-to-end stage's
    minibatches and pieces), all of one condition ``group``, fit or held out."""

    def __init__(self, sl, group, held_out=False):
        self.sl, self.group, self.held_out = sl, group, held_out
        self.n = sl.stop - sl.start if isinstance(sl, slice) else len(sl)


def split_chunks(n_total, n_groups, holdout, chunk_size):
    """Chunks that never straddle a condition or the fit/held-out split; the held-out share is per condition."""
    chunks, start = [], 0
    for g, size in enumerate(split_sizes(n_total, n_groups)):
        n_hold = int(round(holdout * size))
        if size - n_hold < 1 or (holdout > 0 and n_hold < 1):
            raise ValueError(
                f"a batch of {n_total} noises over {n_groups} conditions gives {size} for one condition, which "
                f"cannot be split {1 - holdout:.0%} fit / {holdout:.0%} held out: give a larger batch")
        for lo, hi, held in ((start, start + size - n_hold, False), (start + size - n_hold, start + size, True)):
            for a in range(lo, hi, chunk_size):
                chunks.append(Chunk(slice(a, min(a + chunk_size, hi)), g, held))
        start += size
    return chunks


def split_sizes(n, k):
    """``n`` noises over ``k`` conditions: as equal as can be, the first ones one larger."""
    return [n // k + (1 if j < n % k else 0) for j in range(k)]
