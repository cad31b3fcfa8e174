"""A folder of calibration files, and the rules for picking one for a run (shared by the UI adapters).

A file matches a run when its method, schedule (sigmas, within the samplers' tolerance), model family, model
fingerprint and cfg all agree; a range file (CalibrationSet) matches when it holds an entry for the schedule and
a cfg range that contains the run's (entries.select). Among several matches a file fitted at exactly the run's cfg
wins over an interpolated one, then one fitted at the run's image size (``size_distance``), then the newest.
``find`` also returns why each near miss was passed over, so a UI can tell the user what to calibrate instead of
silently running the base.
"""
import math
import os

import torch

from ..samplers import CalibrationMismatch, Family
from ..samplers.core import check_calibration
from .entries import CFG_TOLERANCE
from .file import CalibrationFileError, CalibrationSet, load
from .identity import describe_difference, same_model, tensor_digest

# a file fitted within this ratio of the run's pixel count counts as fitted at its size. Measured
# (benchmarks/RESOLUTION*.md): a file fitted at the trained size used at 2-4x its pixels made 1.34-1.40x the error of
# the run's own size's file at cfg 1, and at cfg 5 a file used at 2.25x or 1/2.25 its pixels 1.17-1.22x
SIZE_TOLERANCE = 1.5


class ModelMismatch(ValueError):
    """A calibration made for another model (checkpoint, prediction type, shift or LoRAs) than the one sampling."""
    __module__ = "calibrated_samplers"  # what UIs print as its type: short and the same wherever the pack lives


def other_model(cal, fingerprint):
    """None if ``cal`` was made for the model with this fingerprint dict, else how the two models differ."""
    made_id = cal.info.get("fingerprint")
    if same_model(made_id, fingerprint):
        return None
    return describe_difference(cal.info.get("fingerprint_detail", made_id), fingerprint)


def check_model(cal, fingerprint, allow_other=False, name="calibration"):
    """Raise ModelMismatch unless ``cal`` fits the model; with ``allow_other`` return the message instead."""
    diff = other_model(cal, fingerprint)
    message = diff and (f"{name} was made for another model ({diff}): calibrate this model with the Calibrate "
                        "node, or allow other models if you know they sample alike")
    if message and not allow_other:
        raise ModelMismatch(message)
    return message


def cfg_mismatch(cal, cfg):
    made = cal.info.get("cfg")
    if cfg is None:
        return None
    if made is None:
        return "records no cfg"
    if abs(float(made) - float(cfg)) > CFG_TOLERANCE:
        return f"was made for cfg {float(made):g}, this run uses cfg {float(cfg):g}"
    return None


SHOWN_NOTES = 8


def _size_text(shape):
    """"128x96" for a (channels, *spatial) latent shape."""
    return "x".join(str(int(d)) for d in shape[1:])


def first_use_path(folder, method, sigmas, cfg, fingerprint_id, afs=False, shape=None):
    """Where a first-use calibration of this run's setting is saved (the same name in both UIs; with the analytic
    first step, or for another latent ``shape`` (channels, *spatial), a name of its own, so no file overwrites
    another kind)."""
    digest = tensor_digest(torch.as_tensor([float(s) for s in sigmas], dtype=torch.float64))[:8]
    size = "" if not shape or len(shape) < 2 else "_" + _size_text(shape)
    return os.path.join(folder, f"auto_{method}_{len(sigmas) - 1}steps_cfg{cfg if cfg is not None else 0:g}_"
                                f"{fingerprint_id[-8:]}_{digest}{size}{'_afs' if afs else ''}.safetensors")


def no_match_message(label, uncalibrated, sigmas, cfg, notes, how):
    """The console warning of a UI that found no file for a run: what ran instead (``uncalibrated``, the sampler's
    words for it), what to calibrate, and why each saved file of this method was passed over (``find``'s notes,
    files made for this model first; past ``SHOWN_NOTES`` a count of the rest). ``how`` names the UI's way."""
    sig = [float(s) for s in sigmas]
    cfg_text = "any cfg" if cfg is None else f"cfg {float(cfg):g}"
    lines = [f"[Calibrated Samplers] {label}: no calibration file matches this model, {len(sig) - 1} steps "
             f"(sigmas {sig[0]:.4g} ... {sig[-1]:.4g}) and {cfg_text}; running UNCALIBRATED: {uncalibrated}. "
             f"To calibrate: {how}, with the same scheduler, and steps, denoise and cfg ranges that include this "
             "run's."]
    lines += [f"    passed over {n}" for n in notes[:SHOWN_NOTES]]
    if len(notes) > SHOWN_NOTES:
        lines.append(f"    ... and {len(notes) - SHOWN_NOTES} more files passed over")
    return "\n".join(lines)


def short_no_match(label, sigmas, cfg, notes, fix):
    """The same warning in a few sentences, for a toast or a UI line (the console has the whole list); ``fix``
    says where to calibrate in this UI."""
    cfg_text = "" if cfg is None else f", cfg {float(cfg):g}"
    text = (f"{label} ran UNCALIBRATED: no calibration file fits this model, {len(sigmas) - 1} steps{cfg_text}. "
            f"{fix} for this setting, or for step and cfg ranges that include it.")
    if notes:
        text += f" Closest file: {notes[0]}" + (f" (and {len(notes) - 1} more in the console)" if len(notes) > 1 else "")
    return text


def _pixels(shape):
    """Latent positions of a (channels, *spatial) shape, or None when unknown."""
    if not shape or len(shape) < 2:
        return None
    return math.prod(int(d) for d in shape[1:])


def size_distance(cal, shape):
    """How far the image size ``cal`` was fitted at (its ``latent_shape``) is from a run's latent ``shape``
    (channels, *spatial): |log| of the pixel-count ratio, 0 within SIZE_TOLERANCE; when either is unknown, the
    tolerance's edge (after any file known to fit the size, before any known not to)."""
    fitted, run = _pixels(cal.info.get("latent_shape")), _pixels(shape)
    if not fitted or not run:
        return math.log(SIZE_TOLERANCE)
    d = abs(math.log(fitted / run))
    return 0.0 if d <= math.log(SIZE_TOLERANCE) else d


def other_size(cal, shape):
    """True when ``cal`` is known to be fitted at another image size than a run's latent ``shape``."""
    return size_distance(cal, shape) > math.log(SIZE_TOLERANCE)


def size_note(cal, shape, name):
    """A line for the console when file ``name`` was fitted at another image size than the run's, else None."""
    if not other_size(cal, shape):
        return None
    return (f"[Calibrated Samplers] {name} was fitted on {_size_text(cal.info['latent_shape'])} latents and this "
            f"run's are {_size_text(shape)}: it still applies, "
            "but a file fitted at this size may do better (measured: up to 1.4x lower error); calibrate at this "
            "size to get one, and the library then prefers it")


class Library:
    """Calibration files listed by ``list_paths()``, loaded once per (path, size, mtime)."""

    def __init__(self, list_paths):
        self._list_paths = list_paths
        self._cache = {}
        self._reported = set()
        self._damaged = []  # (path, mtime, error) of the files the last find could not read

    def entries(self):
        """[(path, Calibration or CalibrationFileError)] for every listed file."""
        return [(path, cal) for path, _, cal in self._scan()]

    def _scan(self):
        """[(path, mtime_ns, Calibration or CalibrationFileError)], loading only new or changed files."""
        out = []
        for path in self._list_paths():
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (path, st.st_size, st.st_mtime_ns)
            if key not in self._cache:
                try:
                    self._cache[key] = load(path)
                except CalibrationFileError as e:
                    self._cache[key] = e
            out.append((path, st.st_mtime_ns, self._cache[key]))
        return out

    def find(self, method, sigmas, family, fingerprint, cfg=None, shape=None):
        """(Calibration, path, notes) for the best matching file (module docstring), or (None, None, notes) when
        none matches.

        ``family``: a Family or name; ``fingerprint``: the model's fingerprint dict; ``cfg``: the run's cfg, or
        None to accept any; ``shape``: the run's latent shape without the batch (channels, *spatial), or None.
        ``notes``: one line per file of this method that did not match, saying why.
        """
        fam = Family.of(family)
        sig = [float(s) for s in sigmas]
        # notes: (rank, text): files for this model and schedule (another cfg) first, then this model's other
        # schedules, then damaged files, then other models' files
        matches, notes = [], []
        self._damaged = []
        for path, mtime, cal in self._scan():
            name = os.path.basename(path)
            if isinstance(cal, Exception):
                notes.append((2, f"{name}: unreadable ({cal})"))
                self._damaged.append((path, mtime, cal))
                continue
            if cal.method != method:
                continue
            diff = other_model(cal, fingerprint)
            rank = 3 if diff else 0
            if isinstance(cal, CalibrationSet):
                chosen, why = cal.select(sig, fam, cfg)
                if chosen is not None and diff:
                    chosen, why = None, f"was made for another model ({diff})"
                if chosen is None:
                    notes.append((rank or (1 if why.startswith("holds") else 0), f"{name}: {why}"))
                    continue
                matches.append(("interpolated" not in chosen.info, -size_distance(chosen, shape), mtime, path, chosen))
                continue
            try:
                check_calibration(cal, method, sig, fam)
            except CalibrationMismatch as e:
                notes.append((rank or 1, f"{name}: {e}"))
                continue
            why = f"was made for another model ({diff})" if diff else cfg_mismatch(cal, cfg)
            if why:
                notes.append((rank, f"{name}: {why}"))
                continue
            matches.append((True, -size_distance(cal, shape), mtime, path, cal))
        notes = [text for _, text in sorted(notes, key=lambda n: n[0])]
        if not matches:
            return None, None, notes
        *_, path, cal = max(matches, key=lambda m: m[:4])
        return cal, path, notes

    def unreported_damage(self):
        """Warnings for the files the last ``find`` could not read and no earlier call named, once per file
        version, so a lookup that found another file still says once that one was skipped."""
        out = []
        for path, mtime, cal in self._damaged:
            if (path, mtime, str(cal)) not in self._reported:
                self._reported.add((path, mtime, str(cal)))
                out.append(f"[Calibrated Samplers] skipped the damaged file {os.path.basename(path)} ({cal}); "
                           "remove or replace it")
        return out
