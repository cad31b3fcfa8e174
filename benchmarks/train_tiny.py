"""Train the tiny models (seeded; CPU; writes calibration/testbed/weights/<name>.safetensors).

    python benchmarks/train_tiny.py digits-classifier   # about 1 minute
    python benchmarks/train_tiny.py digits-eps          # about 18 minutes on 2 cores (10000 iterations)
    python benchmarks/train_tiny.py digits-flow         # about 18 minutes on 2 cores (10000 iterations)
    python benchmarks/train_tiny.py digits-eps-narrow   # digits-eps at another width, seed 1
    python benchmarks/train_tiny.py shapes-eps          # the held-out testbed: RGB shapes (procedural.py), eps
    python benchmarks/train_tiny.py textures-flow       # the held-out testbed: RGB textures, rectified flow

The digits models need scikit-learn (the data ships inside it: no download); shapes and textures are drawn afresh
for every batch from the training seed (calibration/testbed/procedural.py). The same seed and iteration count give the same
weights on the same torch build and thread count; the committed files were made with the defaults below
and --threads 1 (torch 2.13.0 CPU), while other work shared the machine (about 40 minutes each; shapes-eps
and textures-flow 45 minutes each, trained side by side).
"""
import argparse
import copy
import os
import time

import torch
from torch.nn import functional as F

from calibrated_samplers.calibration.testbed import procedural, tiny  # the installed checkout (pip install -e ., as run.sh does)


def save(module, name):
    from safetensors.torch import save_file
    path = tiny.weight_path(name)
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, tmp)
    os.replace(tmp, path)
    print(f"wrote {path}  sha256 {tiny.file_sha256(path)}")


def augment(x, gen):
    """Small random shifts (up to 1 pixel) so 1797 images go further."""
    shifts = torch.randint(-1, 2, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=shifts, dims=(2, 3))


def train_classifier(args):
    x, y = tiny.digits_data()
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    perm = torch.randperm(len(x), generator=gen)
    test, train = perm[:300], perm[300:]
    net = tiny.Classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for it in range(args.iters or 3000):
        idx = train[torch.randint(len(train), (128,), generator=gen)]
        xb = augment(x[idx], gen)
        xb = xb + 0.1 * torch.randn(xb.shape, generator=gen)  # tolerate a sampler's residual noise
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    print(f"classifier held-out accuracy {acc:.3f} on 300 digits")
    save(net, "digits-classifier")


def batches(data, gen, batch):
    """The training batches of ``data``: augmented digits, or procedural images drawn afresh each time."""
    if data == "digits":
        x, y = tiny.digits_data()
        while True:
            idx = torch.randint(len(x), (batch,), generator=gen)
            yield augment(x[idx], gen), y[idx].clone()
    draw = procedural.DATA[data]
    while True:
        yield draw(batch, gen)


def train_diffusion(args):
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    kind, channels, _, data = tiny.MODELS[args.model]
    net = tiny.UNet(channels, image_channels=tiny.image_shape(args.model)[0])
    stream = batches(data, gen, args.batch)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    iters = args.iters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 500))
    alphas_cumprod = tiny.DiscreteSchedule().alphas_cumprod.float()
    start = time.time()
    for it in range(iters):
        x0, labels = next(stream)
        labels[torch.rand(args.batch, generator=gen) < 0.15] = tiny.NULL_CLASS
        n = torch.randn(x0.shape, generator=gen)
        if kind is tiny.DigitsEps:
            t = torch.randint(0, 1000, (args.batch,), generator=gen)
            ab = alphas_cumprod[t][:, None, None, None]
            loss = F.mse_loss(net(ab.sqrt() * x0 + (1 - ab).sqrt() * n, t.float(), labels), n)
        else:  # rectified flow with SD3's logit-normal time density
            t = torch.sigmoid(torch.randn(args.batch, generator=gen))
            tt = t[:, None, None, None]
            loss = F.mse_loss(net((1 - tt) * x0 + tt * n, 1000 * t, labels), n - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + it) / (10 + it))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if it % 500 == 0 or it == iters - 1:
            print(f"{args.model} it {it}/{iters} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)
    save(ema, args.model)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(tiny.MODELS) + ["digits-classifier"])
    p.add_argument("--iters", type=int, default=None, help="training iterations (default 10000; classifier 3000)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=None, help="default: the model's seed in tiny.MODELS (classifier 0)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.seed is None:
        args.seed = tiny.MODELS[args.model][2] if args.model in tiny.MODELS else 0
    if args.model == "digits-classifier":
        train_classifier(args)
    else:
        args.iters = args.iters or 10000
        train_diffusion(args)


if __name__ == "__main__":
    main()
