"""Calibration time and peak memory on a GPU: the default calibration (per-step fit, then the end-to-end stage) of a
real-size network with random weights, in bfloat16 as ComfyUI loads it, at two batch sizes and one chunk size, with
the end-to-end stage's per-block checkpointing (``calibrate(network=)``) and without it, side by side.

    python benchmarks/gpu.py                      # CUDA, SDXL at 1024 px: writes benchmarks/GPU.md and gpu.json
    python benchmarks/gpu.py --net sd15 --latent 64  # SD1.5 at 512 px (also: flux, flux-2units)
    python benchmarks/gpu.py --small --device cpu # a small network and latent, to check the script runs (prints only)

The pack must be importable as ``calibrated_samplers`` (``pip install -e .``, or a link of that name to this
repository on PYTHONPATH). ``--net`` builds diffusers' own classes at the real configs (``pip install diffusers``;
benchmarks/scale.py has them): SD1.5's and SDXL's ``UNet2DConditionModel``, Flux's ``FluxTransformer2DModel`` at its
width with 1 (or 2) of its 19 units of blocks. ``--small`` is a small conv UNet of this file, only to check the script.
What carries over are the ratios: a calibration's peak over one batched model evaluation of a chunk (cond and uncond
together), and the seconds against the plain sampling of the same noises.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from calibrated_samplers.calibration import calibrate  # noqa: E402
from calibrated_samplers.calibration.testbed.analytic import DiscreteSchedule, karras  # noqa: E402
from calibrated_samplers.calibration.testbed.tiny import timestep_embedding  # noqa: E402
from calibrated_samplers.samplers import SAMPLERS  # noqa: E402


class Block(nn.Module):
    def __init__(self, c_in, c_out, emb, attention):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(32, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.e = nn.Linear(emb, c_out)
        self.n2, self.c2 = nn.GroupNorm(32, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attention = attention
        if attention:
            self.na, self.qkv, self.proj = nn.GroupNorm(32, c_out), nn.Linear(c_out, 3 * c_out), nn.Linear(c_out, c_out)
            self.heads = max(1, c_out // 64)

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x))) + self.e(emb)[:, :, None, None]
        h = self.c2(F.silu(self.n2(h))) + self.skip(x)
        if self.attention:
            b, c, hh, ww = h.shape
            t = self.na(h).flatten(2).transpose(1, 2)
            q, k, v = self.qkv(t).view(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
            h = h + self.proj(a).transpose(1, 2).reshape(b, c, hh, ww)
        return h


class UNet(nn.Module):
    def __init__(self, channels=(320, 640, 1280), latent_channels=4, emb=1280, classes=2):
        super().__init__()
        c1, c2, c3 = channels
        self.emb_dim = emb
        self.t = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(classes + 1, emb)
        self.inp = nn.Conv2d(latent_channels, c1, 3, padding=1)
        self.d1, self.p1 = Block(c1, c1, emb, False), nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.d2, self.p2 = Block(c2, c2, emb, True), nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.m1, self.m2 = Block(c3, c3, emb, True), Block(c3, c3, emb, True)
        self.u2, self.u1 = Block(c3 + c2, c2, emb, True), Block(c2 + c1, c1, emb, False)
        self.out = nn.Sequential(nn.GroupNorm(32, c1), nn.SiLU(), nn.Conv2d(c1, latent_channels, 3, padding=1))

    def forward(self, x, t, labels):
        e = self.t(timestep_embedding(t, self.emb_dim).to(x.dtype)) + self.label(labels)
        h1 = self.d1(self.inp(x), e)
        h2 = self.d2(self.p1(h1), e)
        h = self.m2(self.m1(self.p2(h2), e), e)
        h = self.u2(torch.cat([F.interpolate(h, scale_factor=2.0), h2], 1), e)
        h = self.u1(torch.cat([F.interpolate(h, scale_factor=2.0), h1], 1), e)
        return self.out(h)


class EpsDenoiser(nn.Module):
    """k-diffusion-style denoiser ``model(x, sigma, cond=, cfg=)`` of an eps network on the SD schedule; cond and
    uncond go through the network in one batch, as ComfyUI runs them. The network runs in its own dtype; the
    sampler's arithmetic stays in float32."""

    def __init__(self, net):
        super().__init__()
        self.net, self.schedule = net, DiscreteSchedule()
        self.sigma_min, self.sigma_max = self.schedule.sigma_min, self.schedule.sigma_max
        self.on_device = {}  # device -> the schedule's tables there: sigma_to_t then needs no host round trip

    def schedule_on(self, device):
        if device not in self.on_device:
            s = DiscreteSchedule()
            s.sigmas, s.log_sigmas = s.sigmas.to(device), s.log_sigmas.to(device)
            self.on_device[device] = s
        return self.on_device[device]

    def forward(self, x, sigma, cond=0, cfg=1.0, **unused):
        dtype = next(self.net.parameters()).dtype
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        t = self.schedule_on(x.device).sigma_to_t(sigma).float()
        labels = torch.full((x.shape[0],), int(cond), device=x.device)
        c_in = (1 / (sigma ** 2 + 1).sqrt())[:, None, None, None]
        xin = (x.float() * c_in).to(dtype)
        if cfg == 1.0:
            eps = self.net(xin, t, labels).float()
        else:
            both = self.net(torch.cat([xin, xin]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, 2)]))
            c, u = both.float().chunk(2)
            eps = u + cfg * (c - u)
        return (x.float() - sigma[:, None, None, None] * eps).to(x.dtype)


class Guided(torch.nn.Module):
    """Classifier-free guidance over a denoiser ``den(x, sigma)`` of scale.py: cond and uncond in one batch (the same
    conditioning here: what is measured is the cost), the network in ``dtype``, the sampler's arithmetic in float32."""

    def __init__(self, den, dtype):
        super().__init__()
        self.den, self.dtype = den, dtype

    def forward(self, x, sigma, cfg=1.0, **unused):
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        xin = x.to(self.dtype)
        if cfg == 1.0:
            return self.den(xin, sigma.to(self.dtype)).float()
        c, u = self.den(torch.cat([xin, xin]), torch.cat([sigma, sigma]).to(self.dtype)).float().chunk(2)
        return u + cfg * (c - u)


class Meter:
    """Seconds and peak memory above the level at entry (CUDA: allocated by torch; CPU: resident set)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            from memory import reset_peak
            self.base = reset_peak() or 0
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            from memory import proc_status
            peak = proc_status("VmHWM") or 0
        self.seconds = time.perf_counter() - self.t0
        self.peak_gib = max(0, peak - self.base) / 2 ** 30


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--small", action="store_true", help="a small network and latent (channels 32-128, 32 x 32)")
    ap.add_argument("--net", default="sdxl", choices=["sd15", "sdxl", "flux", "flux-2units"],
                    help="the real class and config (diffusers) unless --small")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 128: SDXL at 1024 px)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--fine-steps", type=int, default=10, help="the teacher's sub-steps (calibrate's fine_steps)")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--max-minutes", type=float, default=2.0, help="cap on each end-to-end stage (0: none)")
    ap.add_argument("--out", default=None, help="write <out>.md and <out, lower case>.json (default on CUDA: benchmarks/GPU)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    side = args.latent or (32 if args.small else 128)
    sched = DiscreteSchedule()
    if args.small:
        net = UNet((32, 64, 128), emb=128).to(device, dtype).eval().requires_grad_(False)
        # random weights give outputs of arbitrary scale: shrink the last conv so eps is of order one
        with torch.no_grad():
            net.out[-1].weight.mul_(0.1)
        model, channels, family, sigma_min = EpsDenoiser(net), 4, "eps", sched.sigma_min
        sigmas = karras(args.steps, sched.sigma_min, sched.sigma_max)
    else:
        import scale
        from calibrated_samplers.calibration.testbed.analytic import flow_sigmas
        den, net, channels, _ = scale.build(args.net)
        net = net.to(device, dtype).eval().requires_grad_(False)
        flow = args.net.startswith("flux")
        model, family = Guided(den, dtype), "flow" if flow else "eps"
        sigma_min = None if flow else sched.sigma_min
        sigmas = flow_sigmas(args.steps, shift=3.0) if flow else karras(args.steps, sched.sigma_min, sched.sigma_max)
    params = sum(p.numel() for p in net.parameters())
    conditions = [{"cond": 0, "cfg": args.cfg}, {"cond": 1, "cfg": args.cfg}]
    shape = (channels, side, side)

    with torch.no_grad():
        x = torch.randn(args.chunk, *shape, device=device) * float(sigmas[0])
        model(x, sigmas[0], **conditions[0])  # warm-up (kernels, allocator)
        with Meter(device) as one:
            model(x, sigmas[0], **conditions[0])
    rows = []
    # every batch with the blocks checkpointed; the first also without, for the ratio
    for batch, blocks in [(b, True) for b in args.batches[:1]] + [(args.batches[0], False)] + [
            (b, True) for b in args.batches[1:]]:
        noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device) * float(sigmas[0])
        with torch.no_grad(), Meter(device) as plain:
            per = batch // len(conditions)
            for j, c in enumerate(conditions):
                for a in range(j * per, (j + 1) * per, args.chunk):
                    SAMPLERS["iia_dpmpp_2m"](model, noise[a:min(a + args.chunk, (j + 1) * per)], sigmas, extra_args=c,
                                             family=family)
        with Meter(device) as cal_m:
            cal = calibrate(model, sigmas, "iia_dpmpp_2m", noise, conditions, family=family, chunk_size=args.chunk,
                            sigma_min=sigma_min, network=net if blocks else None, fine_steps=args.fine_steps,
                            time_limit=60 * args.max_minutes if args.max_minutes else None)
        e2e = cal.info.get("end_to_end", {})
        rows.append({"batch": batch, "chunk": args.chunk, "blocks_checkpointed": blocks,
                     "backward_chunk": e2e.get("backward_chunk"), "skipped": e2e.get("skipped"),
                     "plain_sampling_seconds": round(plain.seconds, 2),
                     "calibration_seconds": round(cal_m.seconds, 2),
                     "end_to_end_seconds": e2e.get("seconds"), "calibration_peak_gib": round(cal_m.peak_gib, 3),
                     "peak_over_one_evaluation": round(cal_m.peak_gib / max(one.peak_gib, 1e-9), 2),
                     "evaluations_per_sample": round(cal.info["model_evaluations_per_sample"], 1),
                     "end_to_end_evaluations_per_sample": e2e.get("evaluations_per_sample"),
                     "held_out_rmse": [e2e.get("start_held_out_rmse"), e2e.get("held_out_rmse")]})
        print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": name, "net": "small" if args.small else args.net, "dtype": args.dtype, "latent": list(shape), "network_parameters": params,
              "steps": args.steps, "cfg": args.cfg, "one_evaluation": {"chunk": args.chunk, "seconds": round(
                  one.seconds, 4), "peak_gib": round(one.peak_gib, 3)}, "rows": rows,
              "torch": torch.__version__, "command": "python benchmarks/gpu.py " + " ".join(argv or sys.argv[1:])}
    out = args.out or (os.path.join(HERE, "GPU") if device.type == "cuda" else None)
    if out is None:
        print(json.dumps(report, indent=1))
        return report
    # the table in capitals, its data in lower case, as the other reports here
    with open(os.path.join(os.path.dirname(out), os.path.basename(out).lower() + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# Calibration time and memory on {name}", "",
             f"`{report['command']}` (torch {torch.__version__}). Random-weight {report['net']} "
             f"({params / 1e6:.0f} M parameters, {args.dtype}), latent {'x'.join(map(str, shape))}, "
             f"iia_dpmpp_2m at {args.steps} steps, cfg {args.cfg:g} (cond and uncond batched), chunk {args.chunk}, "
             f"end-to-end stage capped at {args.max_minutes:g} min. One batched evaluation of a chunk: "
             f"{one.seconds * 1000:.0f} ms, {one.peak_gib:.2f} GiB above the weights.", "",
             "| batch | blocks checkpointed | backward chunk | plain sampling (s) | calibration (s) | of which end to "
             "end (s) | peak (GiB) | peak / one evaluation | evaluations per noise |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {'yes' if r['blocks_checkpointed'] else 'no'} | "
                     f"{r['backward_chunk'] or r['skipped'] or 'whole chunks'} | {r['plain_sampling_seconds']} | "
                     f"{r['calibration_seconds']} | "
                     f"{r['end_to_end_seconds']} | {r['calibration_peak_gib']} | {r['peak_over_one_evaluation']} | "
                     f"{r['evaluations_per_sample']} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", out + ".md")
    return report


if __name__ == "__main__":
    main()
