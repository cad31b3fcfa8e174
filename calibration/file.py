"""The calibration file: safetensors tensors plus string metadata, never pickle.

Tensors: ``sigmas`` (float64, the exact schedule the calibration was asked for: what a run is matched by), the
method's per-step parameters (IIA ``coeffs``, AMED ``r``/``c``/``a``), and optionally ``sample_sigmas`` (the
schedule it samples on when its time steps were learned: same count, same first and last sigma; format version
2, which older packs refuse instead of sampling on the wrong schedule), ``residual_before`` / ``residual_after``
(per-step held-out residuals) and ``fallback`` (1 where a step reverted to the base update). Metadata: ``format``, ``format_version``,
``method``, ``base``, ``family``, ``shift``, ``options`` (JSON of the solver options fitted with),
``pack_version`` and ``info`` (JSON: cfg, fine_steps, batch size, seed, model fingerprint and how it was
computed, the fit's settings). Loading validates every field and refuses what it does not understand.

A range file (format version 3, ``CalibrationSet``) holds several such calibrations of one method and model, one
per fitted step count, denoise and cfg: entry k's tensors are the ones above prefixed ``k/``, and the metadata
``entries`` is a JSON list of each entry's ``options`` and ``info``. Packs that read only versions 1 and 2 refuse it
rather than sampling on the wrong schedule.
"""
import json
import math
import os
import tempfile

import torch

from .. import __version__ as PACK_VERSION
from ..samplers import SAMPLERS, Family
from .entries import describe_entries, select
from .kinds import KINDS

FORMAT = "calibrated-samplers"
FORMAT_VERSION = 2  # 2 adds sample_sigmas; a file without them is still written as 1, which every version reads
SET_VERSION = "3"  # a CalibrationSet: several calibrations in one file
READABLE_VERSIONS = ("1", "2", SET_VERSION)
MAX_ENTRIES = 1000
OPTIONAL_TENSORS = ("sample_sigmas", "residual_before", "residual_after", "fallback")
REQUIRED_METADATA = ("format", "format_version", "method", "base", "family", "shift", "options", "pack_version", "info")


class CalibrationFileError(ValueError):
    """A calibration file that is damaged, from an unknown version, or inconsistent with itself."""
    __module__ = "calibrated_samplers"  # what UIs print as its type: short and the same wherever the pack lives


class Calibration:
    """Per-step parameters fitted for one sampler, schedule and model (what the samplers' ``calibration=`` takes)."""

    def __init__(self, method, sigmas, params, family="ve", shift=1.0, options=None, info=None,
                 sample_sigmas=None, residual_before=None, residual_after=None, fallback=None):
        self.method = method
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        self.params = {k: torch.as_tensor(v, dtype=torch.float64).detach().cpu() for k, v in params.items()}
        fam = Family.of(family, shift)
        self.family, self.shift = fam.name, fam.shift
        self.options = dict(options or {})
        self.info = dict(info or {})
        self.sample_sigmas, self.residual_before, self.residual_after, self.fallback = (
            None if t is None else torch.as_tensor(t, dtype=torch.float64).detach().cpu()
            for t in (sample_sigmas, residual_before, residual_after, fallback))
        validate(self)

    @property
    def steps(self):
        return len(self.sigmas) - 1

    @property
    def sampling_sigmas(self):
        """The schedule this calibration samples on: the learned one if it has one, else the requested one."""
        return self.sigmas if self.sample_sigmas is None else self.sample_sigmas

    def __repr__(self):
        return (f"Calibration({self.method!r}, steps={self.steps}, family={self.family!r}, "
                f"sigmas={[round(float(s), 4) for s in self.sigmas]})")

    def tensors(self):
        out = {"sigmas": self.sigmas}
        out.update({f"param.{k}": v for k, v in self.params.items()})
        for name in OPTIONAL_TENSORS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {k: v.contiguous() for k, v in out.items()}

    def metadata(self):
        version = FORMAT_VERSION if self.sample_sigmas is not None else 1
        return {"format": FORMAT, "format_version": str(version), "method": self.method,
                "base": SAMPLERS[self.method].base, "family": self.family, "shift": repr(self.shift),
                "options": json.dumps(self.options, sort_keys=True), "pack_version": PACK_VERSION,
                "info": json.dumps(self.info, sort_keys=True)}

    def save(self, path, replace=True):
        """Write atomically: a temporary file in the same folder, renamed over ``path`` once complete. With
        ``replace=False`` an existing ``path`` (even one written a moment ago by another calibration) is kept
        and FileExistsError raised."""
        return _write(path, self.tensors(), self.metadata(), replace)


def _write(path, tensors, metadata, replace):
    from safetensors.torch import save_file
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; calibrations are meant to be shared
        if replace:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


class CalibrationSet:
    """Calibrations of one method for one model at several step counts, denoise values and cfg values (a range
    file). ``select`` picks, or interpolates over cfg, the calibration for a run; see calibration.entries."""

    def __init__(self, entries, info=None):
        self.entries = list(entries)
        self.info = dict(info or {})
        if not self.entries:
            raise CalibrationFileError("calibration set: it holds no calibrations")
        if len(self.entries) > MAX_ENTRIES:
            raise CalibrationFileError(f"calibration set: {len(self.entries)} entries, at most {MAX_ENTRIES}")
        first = self.entries[0]
        for cal in self.entries:
            if not isinstance(cal, Calibration):
                raise CalibrationFileError("calibration set: every entry must be a Calibration")
            if (cal.method, cal.family, cal.shift) != (first.method, first.family, first.shift):
                raise CalibrationFileError(
                    "calibration set: every entry must have the same method and model family, got "
                    f"{first.method}/{first.family} and {cal.method}/{cal.family}")
        self.method, self.family, self.shift = first.method, first.family, first.shift

    def __repr__(self):
        return f"CalibrationSet({self.method!r}, {len(self.entries)} entries: {self.summary()})"

    def __len__(self):
        return len(self.entries)

    def summary(self):
        """What the set serves, in words: step counts, denoise values and cfg values or range."""
        return describe_entries(self.entries)

    def primary(self):
        """The entry the set was made around (info "primary": steps and cfg at full denoise), else the first: what
        a UI shows for the set (its schedule, its residuals)."""
        want = self.info.get("primary") or {}
        for cal in self.entries:
            if (cal.steps == want.get("steps") and cal.info.get("cfg") == want.get("cfg")
                    and float(cal.info.get("denoise", 1.0)) == 1.0):
                return cal
        return self.entries[0]

    def select(self, sigmas, family=None, cfg=None):
        """(Calibration or None, why): see entries.select."""
        return select(self, sigmas, family, cfg)

    def tensors(self):
        out = {}
        for k, cal in enumerate(self.entries):
            # copies: entries may share a tensor (one schedule at several cfgs), which safetensors refuses to write
            out.update({f"{k}/{name}": t.clone() for name, t in cal.tensors().items()})
        return out

    def metadata(self):
        meta = self.entries[0].metadata()
        meta.update(format_version=SET_VERSION, info=json.dumps(self.info, sort_keys=True), entries=json.dumps(
            [{"options": cal.options, "info": cal.info} for cal in self.entries], sort_keys=True))
        return meta

    def save(self, path, replace=True):
        """Write atomically, as Calibration.save does."""
        return _write(path, self.tensors(), self.metadata(), replace)


def _place_new(tmp, path):
    """Move ``tmp`` to ``path`` only if nothing is there, atomically where the file system has hard links."""
    taken = f"{path} already exists: choose another file name, or turn on overwrite"
    try:
        os.link(tmp, path)  # fails if path exists, in one step: no window for another writer
    except FileExistsError:
        raise FileExistsError(taken) from None
    except OSError:  # no hard links here (some network or FAT file systems): check, then rename
        if os.path.exists(path):
            raise FileExistsError(taken) from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def _fail(path, message):
    raise CalibrationFileError(f"{path}: {message}")


def validate(cal, where="calibration"):
    """Check a Calibration is consistent with itself and with its sampler; raise CalibrationFileError."""
    if cal.method not in SAMPLERS:
        _fail(where, f"unknown sampler {cal.method!r} (this pack has {sorted(SAMPLERS)})")
    fn = SAMPLERS[cal.method]
    if fn.kind == "plain":
        _fail(where, f"{cal.method!r} takes no calibration")
    sig = cal.sigmas
    if sig.ndim != 1 or len(sig) < 2 or not torch.isfinite(sig).all() or (sig[:-1] <= sig[1:]).any() or sig[-1] < 0:
        _fail(where, "sigmas must be a finite, strictly decreasing 1-D schedule ending at or above 0")
    n = len(sig) - 1
    if not set(fn.params) <= set(cal.params) <= set(fn.params) | set(fn.optional_params):
        _fail(where, f"{cal.method} needs parameters {sorted(fn.params)} (optionally {sorted(fn.optional_params)}), "
                     f"the file has {sorted(cal.params)}")
    for k, v in cal.params.items():
        if v.ndim < 1 or v.shape[0] != n or not torch.isfinite(v).all():
            _fail(where, f"parameter {k!r} must hold finite values for each of the {n} steps, got shape {tuple(v.shape)}")
    KINDS[fn.kind].check(cal, lambda message: _fail(where, message))
    for name in OPTIONAL_TENSORS[1:]:
        t = getattr(cal, name)
        if t is not None and (t.shape != (n,) or not torch.isfinite(t).all()):
            _fail(where, f"{name} must hold one finite value per step")
    learned = cal.sample_sigmas
    if learned is not None and (
            learned.shape != sig.shape or not torch.isfinite(learned).all() or (learned[:-1] <= learned[1:]).any()
            or learned[0] != sig[0] or learned[-1] != sig[-1]):
        _fail(where, "sample_sigmas must be a strictly decreasing schedule of the same length as sigmas, with the "
                     "same first and last sigma")
    if not math.isfinite(cal.shift) or cal.shift <= 0:
        _fail(where, f"shift must be a positive number, got {cal.shift}")


def load(path):
    """Read and validate a calibration file; raise CalibrationFileError naming what is wrong."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        _fail(path, "no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        _fail(path, f"not a readable safetensors file ({e}); it may be truncated or not a calibration")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        _fail(path, f"metadata lacks {missing}: not a calibration file of this pack, or damaged")
    if meta["format"] != FORMAT:
        _fail(path, f"format is {meta['format']!r}, expected {FORMAT!r}")
    if meta["format_version"] not in READABLE_VERSIONS:
        _fail(path, f"format version {meta['format_version']!r} is not one this pack reads "
                    f"({', '.join(READABLE_VERSIONS)}); update the pack or recalibrate")
    if meta["method"] in SAMPLERS and meta["base"] != SAMPLERS[meta["method"]].base:
        _fail(path, f"base solver {meta['base']!r} does not match {meta['method']!r}'s ({SAMPLERS[meta['method']].base!r})")
    try:
        options, info, shift = json.loads(meta["options"]), json.loads(meta["info"]), float(meta["shift"])
    except ValueError as e:
        _fail(path, f"metadata is not valid ({e})")
    if not isinstance(options, dict) or not isinstance(info, dict):
        _fail(path, "options and info must be JSON objects")
    for k, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float64):
            _fail(path, f"tensor {k!r} has dtype {t.dtype}, expected float32 or float64")
    if meta["format_version"] == SET_VERSION:
        return _load_set(path, meta, tensors, shift, info)
    if "sample_sigmas" in tensors and meta["format_version"] == "1":
        _fail(path, "a version 1 file cannot hold sample_sigmas: damaged or hand-edited")
    return _entry(path, meta, tensors, shift, options, info)


def _entry(path, meta, tensors, shift, options, info, where=""):
    known = {"sigmas"} | set(OPTIONAL_TENSORS) | {k for k in tensors if k.startswith("param.")}
    unknown = sorted(set(tensors) - known)
    if unknown or "sigmas" not in tensors:
        _fail(path, f"{where}unexpected tensors {unknown}" if unknown else f"{where}no sigmas tensor")
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    try:
        return Calibration(meta["method"], tensors["sigmas"], params, meta["family"], shift, options, info,
                           *(tensors.get(n) for n in OPTIONAL_TENSORS))
    except CalibrationFileError as e:
        _fail(path, where + str(e).split(": ", 1)[-1])
    except ValueError as e:  # an unknown family name
        _fail(path, where + str(e))


def _load_set(path, meta, tensors, shift, info):
    try:
        entries = json.loads(meta.get("entries", ""))
    except ValueError as e:
        _fail(path, f"the entries metadata is not valid JSON ({e})")
    if (not isinstance(entries, list) or not entries or len(entries) > MAX_ENTRIES
            or not all(isinstance(e, dict) and isinstance(e.get("options"), dict) and isinstance(e.get("info"), dict)
                       for e in entries)):
        _fail(path, f"the entries metadata must list 1 to {MAX_ENTRIES} objects with options and info")
    by_entry = {}
    for name, t in tensors.items():
        k, _, rest = name.partition("/")
        if not k.isdigit() or int(k) >= len(entries) or not rest:
            _fail(path, f"unexpected tensor {name!r} in a calibration set of {len(entries)} entries")
        by_entry.setdefault(int(k), {})[rest] = t
    cals = [_entry(path, meta, by_entry.get(k, {}), shift, e["options"], e["info"], where=f"entry {k}: ")
            for k, e in enumerate(entries)]
    try:
        return CalibrationSet(cals, info)
    except CalibrationFileError as e:
        _fail(path, str(e).split(": ", 1)[-1])
