"""Model fingerprints: which denoiser a calibration was fitted to, computed the same way in every UI.

The rule ("cs2"), so that ComfyUI and the web UIs agree on the same checkpoint file:
- one-dimensional weights (``weights``): SHA-256 over the first 32 one-dimensional tensors (biases, norm scales) of
  the denoiser, in sorted order of their names relative to the denoiser (``input_blocks.0.0.bias``; no
  ``model.diffusion_model.`` prefix), each name followed by its first 4096 values as float16 bytes;
- the other weights (``sample``): SHA-256 over up to 16 of the multi-dimensional tensors (conv and linear
  weights), evenly spaced in sorted name order, each name followed by 1024 of its values taken at a fixed stride,
  as float16 bytes. Two checkpoints that share their biases and norms (a fine-tune that froze them, a merge)
  still differ here. The sample is small and read with a stride, so it costs a few reads of the weights.
- The float16 cast makes an fp32 file loaded in fp16 hash the same (a bfloat16 load rounds differently and
  hashes differently). A UI that patches weights in place (LoRAs) passes the unpatched originals.
- identity: both digests, the prediction type ("eps", "v", "edm", "x0", "flow"), the family's shift and a digest of
  applied patches (LoRAs), each UI describing its patches its own way: a calibration made with a LoRA therefore
  only matches in the UI that made it; without patches, it matches across UIs.

Files made with the first rule ("cs1": the one-dimensional digest alone) still match a model whose cs1 id equals
theirs; every fingerprint also records that id (``cs1_id``).
"""
import hashlib
import json

import torch

RULE = "cs2"
ONE_D_TENSORS = 32
VALUES_PER_TENSOR = 4096
SAMPLED_TENSORS = 16
SAMPLED_VALUES = 1024


def named_weights(denoiser, original=None):
    """(name, tensor) for every tensor of the denoiser's state; ``original(name)`` may return the unpatched tensor
    where a UI patched one in place (its backup), else None."""
    out = []
    for name, t in denoiser.state_dict().items():
        saved = original(name) if original is not None else None
        out.append((name, saved if saved is not None else t))
    return out


def _f16_bytes(t):
    return t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()


def weights_digest(named_tensors):
    """Hash of the denoiser's one-dimensional tensors; ``named_tensors``: (name relative to the denoiser, tensor)."""
    ones = sorted(((k, t) for k, t in named_tensors if t is not None and t.ndim == 1), key=lambda kv: kv[0])
    h = hashlib.sha256()
    for name, t in ones[:ONE_D_TENSORS]:
        h.update(name.encode())
        h.update(_f16_bytes(t[:VALUES_PER_TENSOR]))
    return h.hexdigest()[:16], min(len(ones), ONE_D_TENSORS)


def sample_digest(named_tensors):
    """Hash of a fixed strided sample of the denoiser's multi-dimensional tensors (see the module docstring)."""
    multi = sorted(((k, t) for k, t in named_tensors if t is not None and t.ndim >= 2), key=lambda kv: kv[0])
    if not multi:
        return "none", 0
    picks = sorted({round(j * (len(multi) - 1) / max(SAMPLED_TENSORS - 1, 1)) for j in range(SAMPLED_TENSORS)})
    h = hashlib.sha256()
    for j in picks:
        name, t = multi[j]
        flat = t.detach().reshape(-1)
        h.update(name.encode())
        h.update(_f16_bytes(flat[::max(1, flat.numel() // SAMPLED_VALUES)][:SAMPLED_VALUES]))
    return h.hexdigest()[:16], len(picks)


def tensor_digest(t, n=256):
    """A short hash of a tensor's first values (for describing patches)."""
    return hashlib.sha256(t.detach().flatten()[:n].to("cpu", torch.float32).numpy().tobytes()).hexdigest()[:12]


def _id(rule, ident):
    return f"{rule}-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(named_tensors, prediction, family, shift=1.0, patches=(), **detail):
    """The fingerprint dict stored in a calibration's info: ``id`` plus what it was computed from.

    ``named_tensors``: (name, tensor) of the denoiser's weights (``named_weights``); ``patches``: strings
    describing applied patches (empty without LoRAs). ``detail``: extra facts recorded but not part of the
    identity (model class, sigma range...).
    """
    named_tensors = list(named_tensors)
    weights, used = weights_digest(named_tensors)
    sample, sampled = sample_digest(named_tensors)
    common = {"weights": weights, "prediction": str(prediction), "family": str(family),
              "shift": round(float(shift), 6),
              "patches": hashlib.sha256("\n".join(sorted(patches)).encode()).hexdigest()[:12] if patches else "none"}
    ident = {"rule": RULE, **common, "sample": sample}
    return {"id": _id(RULE, ident), **ident, "cs1_id": _id("cs1", {"rule": "cs1", **common}),
            "tensors_hashed": used, "tensors_sampled": sampled, "patch_count": len(patches), **detail}


def same_model(made_for_id, fingerprint):
    """Whether a file's recorded fingerprint id names this model (by the current rule, or the first one)."""
    return made_for_id is not None and made_for_id in (fingerprint["id"], fingerprint.get("cs1_id"))


def describe_difference(made_for, this):
    """Which identity fields differ between two fingerprint dicts, for error messages."""
    if not isinstance(made_for, dict):
        return f"the file records model {made_for!r}"
    labels = {"weights": "different weights (another checkpoint)", "sample": "different weights (another checkpoint)",
              "prediction": "prediction type", "family": "model family", "shift": "shift",
              "patches": "different LoRAs/patches", "rule": "fingerprint rule"}
    diffs = []
    for key, label in labels.items():
        if key not in made_for and key == "sample":
            continue  # a cs1 file has no sample digest: its other fields say what differs
        if made_for.get(key) != this.get(key):
            text = label if key in ("weights", "sample", "patches") else f"{label} {made_for.get(key)!r} vs {this.get(key)!r}"
            if text not in diffs:
                diffs.append(text)
    return ", ".join(diffs) or "a different fingerprint"
