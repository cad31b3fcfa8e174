"""Tiny learned models (16x16): the project's real networks with real errors, on digits and on other data.

``load("digits-eps")`` is a class-conditional UNet trained for eps-prediction on SD1.x's discrete schedule
(1000 steps, scaled-linear betas 0.00085-0.012), wrapped like k-diffusion's ``DiscreteEpsDDPMDenoiser``:
``model(x, sigma, cond=labels, cfg=scale)`` returns the denoised x0 for x = x0 + sigma * n, with classifier-free
guidance through the null class 10 (cond and uncond in one batched call, as ComfyUI does). ``load("digits-flow")``
is the same network trained as a rectified flow (x = (1 - t) x0 + t n, velocity prediction, like SD3/Flux).
``load("digits-eps-narrow")`` is digits-eps retrained at another width and seed: a model no setting was tuned on.
``load("shapes-eps")`` (eps, SD1.x's schedule) and ``load("textures-flow")`` (rectified flow) are the same network
on 3x16x16 RGB images of other data (procedural.py): the held-out testbed (``HELD_OUT``), which no default or
setting of the calibration may be chosen on; they are only ever measured.
``load_classifier()`` is a small digit CNN whose penultimate features give a Frechet distance.
Weights are committed next to this file; ``benchmarks/train_tiny.py`` made them (seeded). Pure torch.
"""
import hashlib
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from .analytic import DiscreteSchedule  # SD1.x's schedule; sigma_to_t interpolates in log sigma like k-diffusion

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
NULL_CLASS = 10
IMAGE_SHAPE = (1, 16, 16)  # the digits models'; image_shape(name) for any model
# sha256 of the committed weight files; tests check them so a silently changed file is caught.
SHA256 = {
    "digits-eps": "23e6c41b3d494ae7d7f0f94f9a69c49a60b5e48d3a0679827833bc64172c1dca",
    "digits-flow": "9119a5b9c5b51b86dab03d8a197199790ee0d3b21f6cc21cf78d6a31eb717d5a",
    "digits-classifier": "c7fff5fa874b5c1aab9d07aef1e8e344f2fbd914260af15f7017a4285ca56741",
    "digits-eps-narrow": "2ac504e79df9bbc2d82316cd24924869b99c3af68d4fa86ace609974740a229c",
    "shapes-eps": "cf0b23330e326d36fbe208d80f64ff302c54b75ab6a7d0e06f6ceb62fa72209e",
    "textures-flow": "7d2e105222eed9eef02501118fdbfa7321c8b5e6a0a925d2aa320fa16ebda2e3",
}


def weight_path(name):
    return os.path.join(WEIGHTS, f"{name}.safetensors")


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A small class-conditional UNet for 16x16 images of ``image_channels`` channels (16 -> 8 -> 4)."""

    def __init__(self, channels=(32, 64, 96), emb_dim=128, n_classes=10, image_channels=1):
        super().__init__()
        c1, c2, c3 = channels
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(n_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(image_channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, emb_dim)
        self.pool2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.mid1, self.mid2 = ResBlock(c3, c3, emb_dim), ResBlock(c3, c3, emb_dim)
        self.up2 = ResBlock(c3 + c2, c2, emb_dim)
        self.up1 = ResBlock(c2 + c1, c1, emb_dim)
        self.norm_out, self.conv_out = nn.GroupNorm(8, c1), nn.Conv2d(c1, image_channels, 3, padding=1)

    def forward(self, x, t, labels):
        """``t`` is the timestep in [0, 1000) (flow: 1000 * t); ``labels`` 0-9, or 10 for the null class."""
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim)) + self.class_emb(labels)
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid2(self.mid1(self.pool2(h2), emb), emb)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h2], 1), emb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def _labels(cond, n, device):
    if cond is None:
        return torch.full((n,), NULL_CLASS, dtype=torch.long, device=device)
    labels = torch.as_tensor(cond, dtype=torch.long, device=device).reshape(-1)
    return labels.expand(n) if labels.numel() == 1 else labels


class _Denoiser(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def raw(self, x, sigma, labels):
        raise NotImplementedError

    def forward(self, x, sigma, cond=None, cfg=1.0, **unused):
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        labels = _labels(cond, x.shape[0], x.device)
        xf = x.float()
        if cfg == 1.0 or cond is None:
            out = self.raw(xf, sigma, labels)
        else:
            both = self.raw(torch.cat([xf, xf]), torch.cat([sigma, sigma]),
                            torch.cat([labels, torch.full_like(labels, NULL_CLASS)]))
            cond_out, uncond_out = both.chunk(2)
            out = uncond_out + cfg * (cond_out - uncond_out)
        return out.to(x.dtype)


class DigitsEps(_Denoiser):
    """eps-prediction on the discrete SD1.x schedule, k-diffusion coordinates (family "eps")."""
    family = "eps"

    def __init__(self, net):
        super().__init__(net)
        self.schedule = DiscreteSchedule()
        self.sigma_min, self.sigma_max = self.schedule.sigma_min, self.schedule.sigma_max

    def raw(self, x, sigma, labels):
        s = sigma.double()
        t = self.schedule.sigma_to_t(s).float()
        s = s.float()[:, None, None, None]
        eps = self.net(x / (s ** 2 + 1) ** 0.5, t, labels)
        return x - s * eps


class DigitsFlow(_Denoiser):
    """Rectified flow (x = (1 - t) x0 + t n, velocity n - x0), sigma = t in (0, 1] (family "flow")."""
    family = "flow"
    sigma_min, sigma_max = 1e-3, 1.0

    def raw(self, x, sigma, labels):
        t = sigma.float()
        v = self.net(x, 1000 * t, labels)
        return x - t[:, None, None, None] * v


class Classifier(nn.Module):
    """A small CNN for 16x16 digits; ``features`` (64-d, penultimate) serve the Frechet distance."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 16, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x.float())

    def forward(self, x):
        return self.head(self.features(x))


# name -> (wrapper, UNet channels, training seed, data). digits-eps-narrow is digits-eps retrained at another width
# and seed; the models of other data (HELD_OUT) are the held-out testbed: no setting of the calibration engine
# was chosen on any of these, and none may be (benchmarks/PROTOCOL.md)
MODELS = {
    "digits-eps": (DigitsEps, (32, 64, 96), 0, "digits"),
    "digits-flow": (DigitsFlow, (32, 64, 96), 0, "digits"),
    "digits-eps-narrow": (DigitsEps, (24, 48, 64), 1, "digits"),
    "shapes-eps": (DigitsEps, (32, 64, 96), 2, "shapes"),
    "textures-flow": (DigitsFlow, (32, 64, 96), 3, "textures"),
}
HELD_OUT = ("shapes-eps", "textures-flow")


def image_shape(name):
    """The (C, H, W) of the images model ``name`` makes."""
    return IMAGE_SHAPE if MODELS[name][3] == "digits" else (3, 16, 16)


def _load_state(module, name):
    from safetensors.torch import load_file
    path = weight_path(name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; run `python benchmarks/train_tiny.py {name}` to make it")
    module.load_state_dict(load_file(path))
    return module.eval().requires_grad_(False)


def load(name):
    """A model of ``MODELS`` as a k-diffusion-style denoiser ``model(x, sigma, cond=, cfg=)``."""
    if name not in MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(MODELS)}")
    wrapper, channels, _, _ = MODELS[name]
    return wrapper(_load_state(UNet(channels, image_channels=image_shape(name)[0]), name))


def load_classifier():
    return _load_state(Classifier(), "digits-classifier")


def digits_data():
    """scikit-learn's bundled digits upscaled to 16x16 in [-1, 1], and their labels (needs scikit-learn)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def save_grid(rows, path, scale=3, pad=2):
    """Write rows of images (each a (N, C, H, W) tensor in [-1, 1], C 1 or 3) as one PNG, cells separated by gaps."""
    from PIL import Image
    n_cols = max(r.shape[0] for r in rows)
    c, ih, iw = rows[0].shape[1:]
    h, w = ih + pad, iw + pad
    canvas = torch.full((c, len(rows) * h + pad, n_cols * w + pad), 0.35)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            canvas[:, pad + i * h: pad + i * h + ih, pad + j * w: pad + j * w + iw] = (img.float().clamp(-1, 1) + 1) / 2
    arr = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
    image.resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)
