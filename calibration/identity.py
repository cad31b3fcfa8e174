"""Model fingerprints: which denoiser a calibration was fitted to, computed the same way in every UI.

The rule ("cs1"), so that ComfyUI and the web UIs agree on the same checkpoint file:
- weights: SHA-256 over the first 32 one-dimensional tensors (biases, norm scales) of the denoiser, in sorted
  order of their names relative to the denoiser (``input_blocks.0.0.bias``; no ``model.diffusion_model.``
  prefix), each name followed by its first 4096 values as float16 bytes. One-dimensional tensors identify a
  fine-tune as well as any, are cheap to read, and LoRAs leave them alone, so a UI that patches weights in
  place still sees the file's values. The float16 cast makes an fp32 file loaded in fp16 hash the same.
- identity: the weights hash, the prediction type ("eps", "v", "edm", "x0", "flow"), the family's shift and
  a digest of applied patches (LoRAs), each UI describing its patches its own way: a calibration made with a
  LoRA therefore only matches in the UI that made it; without patches, it matches across UIs.
"""
import hashlib
import json

import torch

RULE = "cs1"
ONE_D_TENSORS = 32
VALUES_PER_TENSOR = 4096


def one_dimensional(denoiser, original=None):
    """(name, tensor) for the denoiser's one-dimensional tensors; ``original(name)`` may return the unpatched
    tensor where a UI patched one in place (its backup), else None."""
    out = []
    for name, t in denoiser.state_dict().items():
        if t.ndim == 1:
            saved = original(name) if original is not None else None
            out.append((name, saved if saved is not None else t))
    return out


def weights_digest(named_tensors):
    """Hash of the denoiser's one-dimensional tensors; ``named_tensors``: (name relative to the denoiser, tensor)."""
    ones = sorted(((k, t) for k, t in named_tensors if t is not None and t.ndim == 1), key=lambda kv: kv[0])
    h = hashlib.sha256()
    for name, t in ones[:ONE_D_TENSORS]:
        h.update(name.encode())
        h.update(t.detach()[:VALUES_PER_TENSOR].to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16], min(len(ones), ONE_D_TENSORS)


def tensor_digest(t, n=256):
    """A short hash of a tensor's first values (for describing patches)."""
    return hashlib.sha256(t.detach().flatten()[:n].to("cpu", torch.float32).numpy().tobytes()).hexdigest()[:12]


def fingerprint(named_tensors, prediction, family, shift=1.0, patches=(), **detail):
    """The fingerprint dict stored in a calibration's info: ``id`` plus what it was computed from.

    ``patches``: strings describing applied patches (empty without LoRAs). ``detail``: extra facts recorded
    but not part of the identity (model class, sigma range...).
    """
    weights, used = weights_digest(named_tensors)
    ident = {"rule": RULE, "weights": weights, "prediction": str(prediction), "family": str(family),
             "shift": round(float(shift), 6),
             "patches": hashlib.sha256("\n".join(sorted(patches)).encode()).hexdigest()[:12] if patches else "none"}
    fid = f"{RULE}-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": fid, **ident, "tensors_hashed": used, "patch_count": len(patches), **detail}


def describe_difference(made_for, this):
    """Which identity fields differ between two fingerprint dicts, for error messages."""
    if not isinstance(made_for, dict):
        return f"the file records model {made_for!r}"
    labels = {"weights": "different weights (another checkpoint)", "prediction": "prediction type",
              "family": "model family", "shift": "shift", "patches": "different LoRAs/patches", "rule": "fingerprint rule"}
    diffs = []
    for key, label in labels.items():
        if made_for.get(key) != this.get(key):
            diffs.append(label if key in ("weights", "patches")
                         else f"{label} {made_for.get(key)!r} vs {this.get(key)!r}")
    return ", ".join(diffs) or "a different fingerprint"
