"""What calibrating a real-size checkpoint costs: peak memory of each stage against chunk and latent size, on the
real network classes at real width with random weights, a cost model fitted to it and checked on held-back sizes,
and its predictions for the default calibration of SD1.5, SDXL and a Flux-class DiT (issue 30).

    python benchmarks/scale.py                 # every network (~1 h on one core); writes SCALE.md and scale.json
    python benchmarks/scale.py --nets sd15     # one network
    python benchmarks/scale.py --quick         # small sizes, to check the script runs (prints only)

Networks are diffusers' classes (``UNet2DConditionModel`` at SD1.5's and SDXL's configs, ``FluxTransformer2DModel``
at Flux's width with 1 double and 2 single blocks, and with 2 and 4 to measure the cost per depth), never look-alikes;
use them for memory and cost, never for quality. Each runs in a fresh process with glibc's dynamic mmap threshold
off, so a freed tensor leaves the resident set at once; a measurement resets the kernel's peak-RSS counter
(/proc/self/clear_refs), does its work and reads VmHWM (Linux). Measured in float32 (this CPU has no bfloat16
arithmetic); the predictions for float16/bfloat16 halve the activations and count the weights at their dtype.

Modes, each one model call of ``chunk`` samples (a CFG pair counts two) as the calibration makes it:
- ``inference``: the call without gradients (the per-step fit, the teacher, the held-out checks);
- ``stage``: the end-to-end stage's backward through one checkpointed sampler step (samplers.core.integrate with
  ``checkpoint=True``): the step is recomputed with gradients and every activation of the call is kept;
- ``stage_blocks``: the same within ``calibration.blocks.checkpointed_blocks`` (each block of the network
  recomputes its own activations).
Cost model per network and mode: peak above the weights = g + chunk * (a + b * P), P the latent's pixels (the
attention runs in PyTorch's fused kernels, whose memory is linear in the tokens), least squares on the fit points;
the held-back points (a larger latent, a larger chunk) check it. The predictions add each mode's worst held-back
under-prediction.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import proc_status, reset_peak  # noqa: E402

MiB = 2 ** 20
MODES = ("inference", "stage", "stage_blocks")
# (latent side, chunk): fitted on, then held back to check the fit
FIT = [(24, 1), (32, 1), (48, 1), (32, 2)]
HELD = [(64, 1), (48, 2)]
QUICK_FIT, QUICK_HELD = [(16, 1), (24, 1), (16, 2)], [(32, 1)]
SD15 = dict(block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8, layers_per_block=2)
SDXL = dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            layers_per_block=2)
FLUX = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TEXT_TOKENS = 512
FLUX_DOUBLE, FLUX_SINGLE = 19, 38  # Flux.1's depth: 19 units of one double and two single blocks
# the default calibration as the ComfyUI node makes it (nodes/pack.py) and the latent of each network's native size
NODE = dict(batch_size=32, steps=8, fine_steps=10, chunk_size=8, sampler="iia_dpmpp_2m")
TARGETS = {"sd15": (64, "fp16", 2), "sdxl": (128, "fp16", 2), "flux": (128, "fp8", 1)}  # side, weights, bytes/weight


# ----------------------------------------------------------------------------------------------------- networks
class Eps(torch.nn.Module):
    """k-diffusion-style denoiser of an eps UNet on SD's discrete schedule; ``extra`` are the UNet's keywords."""

    def __init__(self, net, extra):
        super().__init__()
        self.net, self.extra, self.on_device = net, extra, {}

    def schedule(self, device):
        """SD's schedule with its tables on ``device`` (no host round trip per call)."""
        from calibrated_samplers.calibration.testbed.analytic import DiscreteSchedule
        if device not in self.on_device:
            s = self.on_device[device] = DiscreteSchedule()
            s.sigmas, s.log_sigmas = s.sigmas.to(device), s.log_sigmas.to(device)
        return self.on_device[device]

    def forward(self, x, sigma):
        sigma = sigma.to(x.dtype)
        t = self.schedule(x.device).sigma_to_t(sigma.float())
        c_in = (1 / (sigma ** 2 + 1).sqrt())[:, None, None, None]
        eps = self.net(x * c_in, t, **self.extra(x.shape[0]), return_dict=False)[0]
        return x - sigma[:, None, None, None] * eps


class Flow(torch.nn.Module):
    """Denoiser of a rectified-flow DiT (Flux's packing: 2x2 latent patches as tokens)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma):
        sigma = sigma.to(x.dtype)
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = x.new_zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        v = self.net(tokens, encoder_hidden_states=x.new_zeros(b, FLUX_TEXT_TOKENS, FLUX["joint_attention_dim"]),
                     pooled_projections=x.new_zeros(b, FLUX["pooled_projection_dim"]), timestep=sigma,
                     img_ids=img_ids.reshape(-1, 3), txt_ids=x.new_zeros(FLUX_TEXT_TOKENS, 3),
                     guidance=x.new_full((b,), 3.5), return_dict=False)[0]
        v = v.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return x - sigma[:, None, None, None] * v


def build(name):
    """(denoiser, the network, latent channels, sigma of the measured step) for ``name``; weights random."""
    torch.manual_seed(0)
    if name in ("sd15", "sdxl"):
        from diffusers import UNet2DConditionModel
        net = UNet2DConditionModel(in_channels=4, out_channels=4, **(SD15 if name == "sd15" else SDXL))
        width = 768 if name == "sd15" else 2048

        def extra(b):
            like = next(net.parameters())
            kw = {"encoder_hidden_states": like.new_zeros(b, 77, width)}
            if name == "sdxl":
                kw["added_cond_kwargs"] = {"text_embeds": like.new_zeros(b, 1280), "time_ids": like.new_zeros(b, 6)}
            return kw
        return Eps(net, extra), net, 4, 1.0
    from diffusers import FluxTransformer2DModel
    units = 2 if name == "flux-2units" else 1
    net = FluxTransformer2DModel(num_layers=units, num_single_layers=2 * units, **FLUX)
    return Flow(net), net, 16, 0.5


# ----------------------------------------------------------------------------------------------------- one process
def one_call(den, net, mode, x, sigma):
    """The model call of ``mode`` on the batch ``x`` (see the module docstring)."""
    from calibrated_samplers.calibration.blocks import checkpointed_blocks
    from calibrated_samplers.samplers import SAMPLERS
    from calibrated_samplers.samplers.core import Denoiser, Family, integrate
    sig = torch.tensor([sigma, sigma / 2], dtype=torch.float64)
    if mode == "inference":
        with torch.no_grad():
            Denoiser(den, x, sig)(x, sigma)
        return
    scale = torch.ones((), requires_grad=True)  # stands for the calibration's learned numbers
    step = SAMPLERS[NODE["sampler"]].stepper(None, {})
    with checkpointed_blocks(net if mode == "stage_blocks" else None):
        x0 = x * scale
        end = integrate(step, Denoiser(den, x0, sig), x0, [float(s) for s in sig], Family.of(None), checkpoint=True)
        end.square().mean().backward()


def child(name, points):
    torch.set_num_threads(1)
    den, net, channels, sigma = build(name)
    net.eval().requires_grad_(False)
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    print(json.dumps({"net": name, "weights": weights, "parameters": sum(p.numel() for p in net.parameters())}),
          flush=True)
    for mode in MODES:  # lazy first-call allocations (kernels' workspaces, caches) are not any point's cost
        one_call(den, net, mode, torch.randn(1, channels, 16, 16), sigma)
    for mode, side, chunk in points:
        x = torch.randn(chunk, channels, side, side, generator=torch.Generator().manual_seed(side))
        before = reset_peak()
        started = time.perf_counter()
        one_call(den, net, mode, x, sigma)
        seconds = time.perf_counter() - started
        print(json.dumps({"net": name, "mode": mode, "side": side, "chunk": chunk, "seconds": round(seconds, 2),
                          "peak": proc_status("VmHWM") - before}), flush=True)


def measure(name, points):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--child", json.dumps([name, points])]
    rows = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        for line in proc.stdout:
            rows.append(json.loads(line))
            print(f"  {line.strip()}", flush=True)
    if proc.returncode:
        raise SystemExit(f"{name}: the measuring process failed ({proc.returncode})")
    return rows


# ----------------------------------------------------------------------------------------------------- the model
def features(side, chunk):
    return [1.0, chunk, chunk * side * side / 4096]  # latent pixels in units of SD1.5's at 512 px


def fit(rows):
    """Least-squares (g, a, b) of peak = g + chunk * (a + b P), P in 64x64 latents."""
    a = torch.tensor([features(r["side"], r["chunk"]) for r in rows], dtype=torch.float64)
    y = torch.tensor([float(r["peak"]) for r in rows], dtype=torch.float64)
    return torch.linalg.lstsq(a, y[:, None]).solution[:, 0].tolist()


def predict(coef, side, chunk):
    return sum(c * f for c, f in zip(coef, features(side, chunk)))


def default_evaluations():
    """Model evaluations per noise of the node's default calibration, per stage (counts do not depend on the
    network: measured on the bundled analytic model with the node's defaults)."""
    from calibrated_samplers.calibration import calibrate
    from calibrated_samplers.calibration.testbed import testbed
    bed = testbed("analytic-eps")
    sig = bed.sigmas(NODE["steps"])
    cal = calibrate(bed.model, sig, NODE["sampler"], bed.noise(NODE["batch_size"], 0, sig), bed.conditions(1.0),
                    family=bed.family, shift=bed.shift, fine_steps=NODE["fine_steps"], chunk_size=NODE["chunk_size"])
    e2e, n = cal.info["end_to_end"], NODE["batch_size"]
    total = cal.info["model_evaluations_per_sample"]  # forward model calls per noise, the stage's included
    return {"per_step_fit_and_checks": round(total - e2e["forward_evaluations"] / n, 1),
            "stage_forward": round(e2e["forward_evaluations"] / n, 1),
            "stage_backward": round(e2e["backward_evaluations"] / n, 1),
            "stage_equivalents": e2e["evaluations_per_sample"], "total_forward": round(total, 1)}


def report(rows, quick):
    """The measured table per network with the cost model's fit and its errors on the held-back points; also the
    model's worst under-prediction there per network and mode (the margin the predictions add)."""
    fit_points = set(QUICK_FIT if quick else FIT)
    lines, models, margins = [], {}, {}
    for n in [r for r in rows if "weights" in r]:
        lines += [f"### {n['net']}: {n['parameters'] / 1e6:.0f}M parameters ({n['weights'] / MiB:.0f} MiB in float32)",
                  "", "| mode | latent | chunk | peak MiB | cost model MiB | error | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for mode in MODES:
            own = [r for r in rows if r.get("net") == n["net"] and r.get("mode") == mode]
            coef = models[(n["net"], mode)] = fit([r for r in own if (r["side"], r["chunk"]) in fit_points])
            margins[(n["net"], mode)] = 0.0
            for r in own:
                pred = predict(coef, r["side"], r["chunk"])
                held = (r["side"], r["chunk"]) not in fit_points
                if held:
                    margins[(n["net"], mode)] = max(margins[(n["net"], mode)], r["peak"] / pred - 1)
                lines.append(f"| {mode} | {r['side']}x{r['side']} | {r['chunk']} | {r['peak'] / MiB:.0f} | "
                             f"{pred / MiB:.0f} | {100 * (pred / r['peak'] - 1):+.0f}%{' held back' if held else ''} | "
                             f"{r['seconds']:.1f} |")
        lines.append("")
    return lines, models, margins


def full_flux(models, margins, nets):
    """Flux.1's 19 units (one double and two single blocks each) from the 1- and 2-unit networks: linear in depth."""
    one, two = nets.get("flux"), nets.get("flux-2units")
    if one is None or two is None:
        return None
    units = FLUX_DOUBLE
    for mode in MODES:
        a, b = models[("flux", mode)], models[("flux-2units", mode)]
        models[("flux-full", mode)] = [x + (units - 1) * (y - x) for x, y in zip(a, b)]
        margins[("flux-full", mode)] = margins[("flux", mode)]
    return one["parameters"] + (units - 1) * (two["parameters"] - one["parameters"])


def predictions(models, margins, nets, evaluations):
    """Peak memory of the node's default calibration at each network's native size, and the largest chunk per card.
    Each prediction adds its mode's worst held-back under-prediction (``margins``): the sizes here are larger than
    any measured, so the model is used where it erred most on the side that runs out of memory."""
    params = {"sd15": nets.get("sd15", {}).get("parameters"), "sdxl": nets.get("sdxl", {}).get("parameters"),
              "flux": full_flux(models, margins, nets)}
    lines = ["| network at its size | weights | samples per call | inference call | stage | stage, blocks "
             "checkpointed | largest call for 8 / 12 / 16 / 24 GB (stage, blocks) |", "|---|---|---|---|---|---|---|"]
    for net, (side, wdtype, wbytes) in TARGETS.items():
        key = "flux-full" if net == "flux" else net
        if params[net] is None or (key, "inference") not in models:
            continue
        weights = params[net] * wbytes
        samples = NODE["chunk_size"] * (1 if net == "flux" else 2)  # a CFG pair is two samples; Flux runs cfg 1
        # measured in float32; half-precision compute halves the activations
        peak = {m: weights + 0.5 * (1 + margins[(key, m)]) * predict(models[(key, m)], side, samples) for m in MODES}
        fits, grow = [], 1 + margins[(key, "stage_blocks")]
        for gb in (8, 12, 16, 24):
            g, a, b = models[(key, "stage_blocks")]
            per = 0.5 * grow * (a + b * side * side / 4096)
            fits.append(str(max(0, int((gb * 1e9 - weights - 0.5 * grow * g) // per))))
        lines.append(f"| {net} {side * 8} px | {weights / 1e9:.1f} GB {wdtype} | {samples} | "
                     f"{peak['inference'] / 1e9:.1f} GB | {peak['stage'] / 1e9:.1f} GB | "
                     f"{peak['stage_blocks'] / 1e9:.1f} GB | {' / '.join(fits)} samples |")
    e = evaluations
    lines += ["", f"Model evaluations per noise of the node's default calibration ({NODE['sampler']}, "
              f"{NODE['batch_size']} noises, {NODE['steps']} steps, fine_steps {NODE['fine_steps']}), counted on the "
              f"bundled analytic model (the counts do not depend on the network): per-step fit, teacher and checks "
              f"{e['per_step_fit_and_checks']}; end-to-end stage {e['stage_forward']} forward and "
              f"{e['stage_backward']} backward passes (each recomputes its step's forward: "
              f"{e['stage_equivalents']} inference-call equivalents, a backward counted as two); each a CFG pair "
              f"where cfg > 1. With blocks checkpointed each backward recomputes the forward once more."]
    return lines


def ratios(rows):
    """The blocks' effect in words: each network's stage peaks over its inference call, one sample, 64 x 64."""
    out = []
    for net in dict.fromkeys(r["net"] for r in rows):
        at = {r["mode"]: r["peak"] for r in rows if r.get("net") == net and (r.get("side"), r.get("chunk")) == (64, 1)}
        if len(at) == len(MODES):
            out.append(f"{net} {at['stage'] / at['inference']:.1f}x and {at['stage_blocks'] / at['inference']:.1f}x")
    return ("Measured at a 64 x 64 latent, one sample: the stage's backward peaks at (without, with the blocks "
            "checkpointed) " + "; ".join(out) + " an inference call's peak above the weights.") if out else ""


def write(rows, quick, evaluations=None):
    nets = {r["net"]: r for r in rows if "weights" in r}
    table, models, margins = report(rows, quick)
    head = ["# Calibration cost at real scale", "",
            "Peak resident memory above the weights of one model call as each stage of a calibration makes it, on "
            "diffusers' real classes at real width with random weights, float32 on this machine's CPU (one thread); "
            "measured and reproduced by `python benchmarks/scale.py` (modes and cost model: its docstring).", ""]
    pred = predictions(models, margins, nets, evaluations or default_evaluations()) if not quick else []
    text = head + ["## Predicted for the default calibration (fp16/bf16 compute: half the float32 activations; each "
                   "figure with its mode's worst held-back under-prediction added)",
                   ""] + pred + ["", ratios(rows), "", "## Measured, and the cost model's fit", ""] + table
    print("\n".join(text))
    if not quick:
        with open(os.path.join(HERE, "SCALE.md"), "w") as f:
            f.write("\n".join(text) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child")
    p.add_argument("--nets", nargs="+", default=["sd15", "sdxl", "flux", "flux-2units"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="measure only these (the rest of "
                   "scale.json stays)")
    p.add_argument("--report", action="store_true", help="only write SCALE.md from scale.json")
    args = p.parse_args()
    if args.child:
        return child(*json.loads(args.child))
    path = os.path.join(HERE, "scale.json")
    rows, evaluations = [], None
    if not args.quick and os.path.exists(path):  # the other networks' rows stay
        with open(path) as f:
            saved = json.load(f)
        rows = [r for r in saved["rows"]
                if args.report or r["net"] not in args.nets or r.get("mode", "-") not in args.modes]
        evaluations = saved.get("evaluations") if args.report else None  # counted again after new measurements
    fit_points, held = (QUICK_FIT, QUICK_HELD) if args.quick else (FIT, HELD)
    for name in [] if args.report else args.nets:
        sizes = fit_points + held if name != "flux-2units" else fit_points
        measured = measure(name, [(mode, side, chunk) for mode in args.modes for side, chunk in sizes])
        rows = [r for r in rows if not ("weights" in r and r["net"] == name)] + measured
        if not args.quick:
            with open(path, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
    evaluations = evaluations or (None if args.quick else default_evaluations())
    write(rows, args.quick, evaluations)
    if not args.quick:
        with open(path, "w") as f:
            json.dump({"rows": rows, "evaluations": evaluations}, f, indent=1)


if __name__ == "__main__":
    main()
