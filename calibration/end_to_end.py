"""End-to-end calibration: every step's parameters, and optionally the interior time steps, learned jointly by
gradient descent through the sampler and the frozen model, against the teacher's endpoint from the same noise.

The sequential fit (engine.py) sees one step at a time: it cannot see what a step's correction does to the later
steps' model evaluations. This stage starts from its result and minimises the endpoint error of whole
trajectories instead, as LD3, S4S and the Bespoke solvers do, with only the calibration's few numbers
requiring gradients (the model's weights never do).

- **Parametrisation** (all in units where a step of 0.01 is a small, comparable change): IIA coefficients move
  by multiples of the step's own displacement measured in their basis vector's norm (so a coefficient on the
  state, whose vector is large early on, and one on a small difference move the sample alike); AMED's ``r`` and
  ``c`` move additively, ``a`` multiplicatively; the log-sigmas are the cumulative sums of softmax gaps over the
  span, so they stay ordered; the first and the final sigma stay as requested. Into sigma = 0 the last positive
  sigma is free too (a smooth floor keeps it above the model's sigma_min), so the span itself is learned.
- **Memory**: each step is checkpointed (its activations are recomputed in the backward pass, so a trajectory
  keeps only its states), and the gradient is accumulated chunk by chunk, so the peak is one chunk's step
  whatever the batch. Given the ``network``, each of its blocks recomputes its own activations as well
  (blocks.py), so that step's peak is near an inference call's instead of several times it. The model may be
  float16/bfloat16; the parameters and the solver's arithmetic are float32 or better (samplers.core.work_dtype).
- **Schedule**: Adam on small minibatches, its learning rate decayed to zero over the budget (a cosine), so the
  run ends settled rather than where a noisy step left it; the whole budget is spent (an early stop would cut
  the decay short, and the settled end is where most of the gain is). The time steps learn ``sigma_lr`` times
  faster than the other numbers: at the common rate they barely leave the requested schedule, whose choice
  then decides too much (digits-eps, 5 evaluations, at the common rate: requested Karras rho 3, 5 and 7 ended
  at test RMSE 0.046, 0.042 and 0.038).
- **Learning rate, in the model's units**: how far a change of these numbers moves a sample depends on the model
  (its data's scale, how curved its trajectories are), so a fixed rate is too large on one model and too small on
  another. Unless one is given, the rate is measured on the first minibatch: the one at which Adam's first step
  (each number moved by the rate times its gradient's sign) moves the endpoints by ``STEP_FRACTION`` of their error
  against the teacher. The fixed rate 0.02 that was chosen on digits made the first steps overshoot elsewhere: on
  the held-out shapes-eps the held-out error went 0.0111 -> 0.0249 at the first check and the stage kept its
  start, on a Gaussian mixture the same (benchmarks/stage-traces/, issue 29).
- **Safety**: the held-out share is checked ``checks`` times over the budget (the start first). The result is the
  settled end of the decay, the last iterate, unless the held-out share vetoes it; then the latest checked iterate
  it accepts stands, or the start. An iterate is accepted when its held-out mean squared error is no higher than the
  start's (so the result is never worse than the start there) and its per-noise RMSE beats the start's by more than
  ``margin`` standard errors of the paired difference (a real gain, not luck). The held-out share does not *pick*
  the best of the checks: its mean squared error is carried by the few noises whose trajectories end near another
  mode, so the best of 20 noisy checks is mostly the luckiest. Measured on digits-eps cfg 5 at 6 evaluations
  (three minibatch orders, 200 test noises): picking the best check gave test RMSE 0.0336, 0.0400 and 0.0408 (two
  picks mid-run), the last iterate 0.0336, 0.0333 and 0.0322.
"""
import math
import time

import torch

from ..samplers import SAMPLERS
from ..samplers.core import Denoiser, integrate
from .batch import Chunk
from .blocks import checkpointed_blocks
from .kinds import KINDS

# Adam's first step moves the fit noises' endpoints by this share of their error (Stage.measured_lr). Chosen on
# digits-eps (cfg 1, 6 evaluations, 256 noises; benchmarks/stage-traces/): 0.02, 0.1, 0.3, 1 gave test RMSE 0.0249,
# 0.0239, 0.0240, 0.0217, the old fixed rate 0.02 (7x this fraction there) 0.0230
STEP_FRACTION = 1.0
FALLBACK_LR = 0.02  # where the model's sensitivity cannot be measured (no endpoint moves)
# Adam's minibatch, by default: 1/STEPS_PER_PASS of the fit noises (at least MIN_BATCH, at most MAX_BATCH). The
# budget is per noise, so a fixed minibatch gives a small calibration batch few steps (32 noises: 1/8 of 256's), too
# few for the stage to settle; a minibatch that shrinks with the batch keeps the number of steps. Chosen on
# digits-eps (5 evaluations, 32 noises, test RMSE): minibatch 16 / 4 / 2 gave 0.0356 / 0.0331 / 0.0285 at cfg 1 (16
# with 4x the budget: 0.0314), 16 / 2 gave 0.0553 / 0.0559 at cfg 5; from 192 fit noises up it stays 16 (issue 29)
STEPS_PER_PASS = 12
MIN_BATCH, MAX_BATCH = 2, 16


def default_batch(n_fit):
    """Adam's minibatch (fit noises per step) for a calibration with ``n_fit`` fit noises (see STEPS_PER_PASS)."""
    return max(MIN_BATCH, min(MAX_BATCH, int(n_fit) // STEPS_PER_PASS))
END_SHARPNESS = 100.0  # how sharply the last positive sigma's floor bends: a requested one at the floor starts 0.7% up


class Learnable:
    """The free numbers of one calibration and how they map to the sampler's parameters and schedule."""

    def __init__(self, kind, params, sig, learn_params=True, learn_sigmas=True, scales=None, device="cpu",
                 floor=None, learn_end=True):
        # everything is made (or copied) outside inference mode: autograd may then save it
        with torch.inference_mode(False):
            self._build(kind, params, sig, learn_params, learn_sigmas, scales, device, floor, learn_end)

    def _build(self, kind, params, sig, learn_params, learn_sigmas, scales, device, floor, learn_end):
        self.kind, self.device = KINDS[kind], torch.device(device)
        self.start = {k: None if v is None else v.detach().to(self.device, torch.float64).clone()
                      for k, v in params.items()}
        self.sig = [float(s) for s in sig]
        self.leaves = {}
        # per step (IIA): the change of the parameters per unit of the free numbers
        self.scale = None if scales is None else scales.to(self.device, torch.float64).clone()
        if learn_params:
            self.leaves.update(self.kind.leaves(self.start, self.scale, self.device))
        # sigma_0 and the final sigma stay; the points between move. Into sigma = 0 the last positive sigma moves
        # too (the last step only denoises, and where it starts matters at few steps), kept above ``floor``
        self.last = len(self.sig) - (2 if self.sig[-1] == 0 else 1)
        self.learn_end = bool(learn_sigmas and learn_end and self.sig[-1] == 0 and self.last >= 1)
        self.learn_sigmas = bool(learn_sigmas and (self.last >= 2 or self.learn_end))
        if self.learn_sigmas:
            logs = torch.tensor([math.log(s) for s in self.sig[:self.last + 1]], dtype=torch.float64)
            self.span = float(logs[0] - logs[-1])
            self.leaves["gaps"] = (logs[:-1] - logs[1:]).log().to(self.device)
        if self.learn_end:
            # log of the last positive sigma = log floor + softplus(END_SHARPNESS * (requested + end - log floor))
            # / END_SHARPNESS: smooth, never below the floor, and at the start the requested one (or just above a
            # requested one that sits at the floor)
            self.log_floor = math.log(min(floor, self.sig[self.last]) if floor else self.sig[self.last])
            self.log_last = math.log(self.sig[self.last])
            self.leaves["end"] = torch.zeros((), dtype=torch.float64, device=self.device)
        for t in self.leaves.values():
            t.requires_grad_(True)

    def parameters(self):
        return list(self.leaves.values())

    def materialize(self):
        """(params, sig) for the sampler's stepper: tensors that carry gradients to the leaves."""
        L = self.leaves
        params = self.kind.materialize(self.start, L, self.scale)
        if not self.learn_sigmas:
            return params, self.sig
        fractions = torch.softmax(L["gaps"], 0).cumsum(0)
        if not self.learn_end:
            logs = math.log(self.sig[0]) - self.span * fractions
            return params, [self.sig[0]] + [logs[j - 1].exp() for j in range(1, self.last)] + self.sig[self.last:]
        lowest = self.log_floor + torch.nn.functional.softplus(
            END_SHARPNESS * (self.log_last + L["end"] - self.log_floor)) / END_SHARPNESS
        logs = math.log(self.sig[0]) - (math.log(self.sig[0]) - lowest) * fractions
        return params, [self.sig[0]] + [logs[j - 1].exp() for j in range(1, self.last + 1)] + self.sig[self.last + 1:]

    def values(self):
        """(params as float64 CPU tensors, the learned sigmas as a float64 tensor or None)."""
        with torch.no_grad():
            params, sig = self.materialize()
            params = {k: v.detach().to("cpu", torch.float64).clone() for k, v in params.items() if v is not None}
            learned = None
            if self.learn_sigmas:
                learned = torch.tensor([float(s) for s in sig], dtype=torch.float64)
                learned[0], learned[-1] = self.sig[0], self.sig[-1]
        return params, learned

    def state(self):
        return {k: v.detach().clone() for k, v in self.leaves.items()}

    def load_state(self, state):
        with torch.no_grad():
            for k, v in state.items():
                self.leaves[k].copy_(v)


SAFETY = 0.8  # of the free memory the backward passes may plan to use: allocators fragment, kernels need workspace


def _gib(n):
    return f"{n / 2 ** 30:.2f} GiB"


class DeviceMemory:
    """The free memory of a CUDA device and the peak of a piece of work there (torch's own allocator counts)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def free(self):
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def peak(self, work):
        """Run ``work()``; the bytes it needed above what was allocated before (None where it ran out)."""
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            work()
        except torch.cuda.OutOfMemoryError:
            return None
        return torch.cuda.max_memory_allocated(self.device) - before


def device_memory(device):
    """The memory the stage plans its backward passes by: a CUDA device's; None (no limit planned) elsewhere."""
    return DeviceMemory(device) if torch.device(device).type == "cuda" and torch.cuda.is_available() else None


class Stage:
    """One end-to-end run on a calibration ``_Run`` (engine.py): fit chunks learn, held-out chunks judge."""

    def __init__(self, run, method, options, learn, teacher_end, lr=None, eval_every=5, batch=None,
                 budget=None, time_limit=None, checkpoint=True, progress=None, margin=1.0, loss="rmse", checks=20,
                 sigma_lr=5.0, step_fraction=STEP_FRACTION, network=None, memory="device"):
        self.network = network  # whose blocks recompute their activations in the backward pass (blocks.py)
        # what the backward passes are planned by (Stage.plan_backward): "device" (a CUDA device's free memory),
        # None (no plan: whole chunks) or an object with DeviceMemory's free() and peak(work)
        self.memory = device_memory(run.device) if memory == "device" else memory
        self.backward_chunk = None  # noises per backward pass; None: whole chunks
        self.run, self.method, self.options, self.learn = run, method, dict(options), learn
        self.teacher_end = teacher_end
        # no rate and no fraction to measure one by: the fixed rate
        self.lr = FALLBACK_LR if lr is None and step_fraction is None else lr
        self.eval_every = eval_every
        self.budget, self.time_limit, self.checkpoint, self.progress = budget, time_limit, checkpoint, progress
        self.margin, self.loss, self.checks, self.sigma_lr = margin, loss, checks, sigma_lr
        self.step_fraction = step_fraction
        self.fit = [ch for ch in run.chunks if not ch.held_out]
        self.held = [ch for ch in run.chunks if ch.held_out]
        self.n_fit = sum(ch.n for ch in self.fit)
        # Adam's minibatch: by default a share of the fit noises (default_batch); "all": every fit noise
        self.batch = default_batch(self.n_fit) if batch is None else self.n_fit if batch == "all" else int(batch)
        self.group_of = {i: ch.group for ch in self.fit for i in range(ch.sl.start, ch.sl.stop)}  # fit noise -> condition
        self.forward = self.backward = 0  # model evaluations x samples, in the forward and the backward passes
        self.history = []
        self.steps = 0  # optimiser steps taken

    # ------------------------------------------------------------------ one chunk
    def _endpoint(self, chunk, grad):
        run = self.run
        params, sig = self.learn.materialize()
        step = SAMPLERS[self.method].stepper(params, self.options)
        x = run.x0[chunk.sl].to(run.device).clone()  # a normal tensor even if the batch was made in inference mode
        ev = Denoiser(run.model, x, run.sigmas, run.conditions[chunk.group])
        end = integrate(step, ev, x, sig, run.family, checkpoint=self.checkpoint and grad)
        return end, ev

    def _errors(self, chunk, end):
        """Per-noise mean squared endpoint error against the teacher (differentiable)."""
        target = self.teacher_end[chunk.sl].to(end.device, torch.float64)
        return (end.to(torch.float64) - target).flatten(1).pow(2).mean(1)

    def held_out_errors(self):
        """Mean squared endpoint error of each held-out noise against the teacher (float64, CPU)."""
        out = []
        with torch.no_grad():
            for ch in self.held:
                end, ev = self._endpoint(ch, grad=False)
                self._count(ev, ch)
                out.append(self._errors(ch, end).cpu())
                self.run.check_cancel()
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def gradient(self, chunks):
        """Accumulate the loss gradient over ``chunks`` chunk by chunk; returns their RMS endpoint error.

        The loss is the mean over noises of each noise's RMS endpoint error (``loss="rmse"``), not of its squared
        error: every noise pulls with the same weight, so the few whose trajectories end near another mode (whose
        errors are large and which no smooth change of the solver fixes) do not drag the parameters after them.
        ``loss="mse"`` is the plain mean squared error.
        """
        total = sum(ch.n for ch in chunks)
        squared, elements = 0.0, 0
        leaves = self.learn.parameters()
        with torch.enable_grad(), checkpointed_blocks(self.network):
            for ch in self._pieces(chunks):
                end, ev = self._endpoint(ch, grad=True)
                calls = ev.calls
                errors = self._errors(ch, end)
                loss = (errors.clamp_min(1e-30).sqrt() if self.loss == "rmse" else errors).sum() / total
                # only the calibration's leaves get gradients: a model whose weights require grad is not touched
                for leaf, g in zip(leaves, torch.autograd.grad(loss, leaves, allow_unused=True)):
                    if g is not None:
                        leaf.grad = g if leaf.grad is None else leaf.grad + g
                # with checkpointing the backward pass re-ran every step's evaluations (counted by ev.calls)
                self._count(ev, ch)
                self.backward += calls * ch.n
                squared += float(errors.detach().sum())
                elements += ch.n
                self.run.check_cancel()
        return math.sqrt(squared / max(elements, 1))

    def _pieces(self, chunks):
        """The chunks cut to at most ``backward_chunk`` noises each (the gradient is summed over them anyway)."""
        for ch in chunks:
            size = self.backward_chunk or ch.n
            if size >= ch.n:
                yield ch
                continue
            index = torch.arange(ch.sl.start, ch.sl.stop) if isinstance(ch.sl, slice) else ch.sl  # minibatches index
            for a in range(0, ch.n, size):
                yield Chunk(index[a:a + size], ch.group)

    def plan_backward(self):
        """Noises per backward pass: as many as fit ``SAFETY`` of the free memory at one noise's measured peak,
        up to a whole chunk. Returns None where they fit, else why the stage cannot run and what would fit."""
        if self.memory is None or not self.fit:
            return None
        largest = max(ch.n for ch in self.fit)
        first = self.fit[0]
        one = Chunk(slice(first.sl.start, first.sl.start + 1), first.group)
        leaves = self.learn.parameters()
        need = self.memory.peak(lambda: self.gradient([one]))
        for leaf in leaves:  # the probe only measures: its gradient is not a step
            leaf.grad = None
        free = self.memory.free()
        fits = 0 if need is None else int(SAFETY * free // max(need, 1))
        if fits < 1:
            needed = "more than the free memory" if need is None else _gib(need)
            return (f"the end-to-end stage was skipped: one noise's backward pass needs {needed} of "
                    f"{self.run.device} memory and {_gib(free)} is free. The per-step fit is kept. To run the stage, "
                    f"free memory (unload other models, lower the latent size or the prompts' length) or calibrate "
                    f"with end_to_end off to skip it without this check")
        self.backward_chunk = min(fits, largest)
        return None

    def _count(self, ev, chunk):
        """Every model call of this stage, in its own counts and in the run's totals."""
        self.forward += ev.calls * chunk.n
        self.run.model_calls += ev.calls
        self.run.sample_evaluations += ev.calls * chunk.n

    @property
    def spent(self):
        """Model-evaluation equivalents per calibration noise: a backward pass counts as two forward ones."""
        return (self.forward + 2 * self.backward) / self.run.x0.shape[0]

    def _minibatch(self, gen, queue):
        """The next ``batch`` fit noises of passes over them in random order, as chunks of at most the run's chunk
        size that never straddle a condition. The draw is over noises, not chunks, so the chunk size changes how
        the work is cut, never which noises a step sees."""
        order = list(self.group_of)
        while len(queue) < self.batch:
            queue += [order[j] for j in torch.randperm(len(order), generator=gen).tolist()]
        picked = sorted(queue[:self.batch])
        del queue[:self.batch]
        chunks = []
        for group in sorted({self.group_of[i] for i in picked}):
            mine = [i for i in picked if self.group_of[i] == group]
            for a in range(0, len(mine), self.run.chunk_size):
                idx = torch.tensor(mine[a:a + self.run.chunk_size])
                chunks.append(Chunk(idx, group))
        return chunks

    def measured_lr(self, chunks, groups):
        """The learning rate at which Adam's first step (``lr`` times the gradient's sign, each group at its own
        scale) moves the endpoints of ``chunks`` by ``step_fraction`` of their RMS error against the teacher: a rate
        in units of this model's own sensitivity, where a fixed rate is large on one model and small on another.
        Needs the leaves' gradients from ``chunks`` in place; costs two forward passes of them."""
        eps = 1e-3
        saved = self.learn.state()
        moved, errors, elements = 0.0, 0.0, 0
        with torch.no_grad():
            base = []
            for ch in chunks:
                end, ev = self._endpoint(ch, grad=False)
                self._count(ev, ch)
                base.append(end)
            for group in groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(eps * group["scale"] * p.grad.sign())
            for ch, end in zip(chunks, base):
                new, ev = self._endpoint(ch, grad=False)
                self._count(ev, ch)
                moved += float((new.double() - end.double()).pow(2).sum())
                target = self.teacher_end[ch.sl].to(end.device, torch.float64)
                errors += float((end.double() - target).pow(2).sum())
                elements += end.numel()
            self.learn.load_state(saved)
        per_unit = math.sqrt(moved / elements) / eps
        if not per_unit > 0 or not math.isfinite(per_unit):
            return FALLBACK_LR
        return self.step_fraction * math.sqrt(errors / elements) / per_unit

    # ------------------------------------------------------------------ the loop
    def _finite(self, grads=False):
        tensors = [p.grad for p in self.learn.parameters() if p.grad is not None] if grads else self.learn.parameters()
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def _out_of_budget(self, started):
        return ((self.budget is not None and self.spent >= self.budget)
                or (self.time_limit is not None and time.perf_counter() - started >= self.time_limit))

    def optimise(self, optimizer="adam", max_rounds=200):
        """Rounds of optimiser iterations (Adam: 1/``checks`` of the budget; L-BFGS: ``eval_every``), each followed
        by the held-out check; keeps the last iterate the held-out share accepts (module docstring: Safety).

        Runs with autograd on even where the caller is in ``torch.inference_mode`` (ComfyUI executes nodes so):
        tensors made there cannot be saved for backward, so the model's own weights must be normal tensors (the
        UI adapters see to that) and this stage copies its inputs.
        """
        with torch.inference_mode(False), torch.enable_grad():
            return self._optimise(optimizer, max_rounds)

    def _optimizer(self, optimizer, params):
        if optimizer == "lbfgs":
            return torch.optim.LBFGS(params, lr=1.0, max_iter=self.eval_every, history_size=20,
                                     line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)
        timing = ("gaps", "end")  # the time steps learn sigma_lr times faster (module docstring: Schedule)
        groups = [{"params": [v for k, v in self.learn.leaves.items() if k not in timing], "scale": 1.0},
                  {"params": [v for k, v in self.learn.leaves.items() if k in timing], "scale": self.sigma_lr}]
        return torch.optim.Adam([dict(g, lr=(self.lr or 0.0) * g["scale"]) for g in groups if g["params"]],
                                betas=(0.9, 0.99))

    def _adam_step(self, opt, gen, queue):
        """One Adam step on a minibatch (the rate measured at the first); False where the gradient is not finite."""
        chunks = self.fit if self.batch >= self.n_fit else self._minibatch(gen, queue)
        opt.zero_grad(set_to_none=True)
        self.last_loss = self.gradient(chunks) ** 2
        if not self._finite(grads=True):
            return False
        if self.lr is None:
            self.lr = self.measured_lr(chunks, opt.param_groups)
            for group in opt.param_groups:
                group["lr"] = group["scale"] * self.lr
        if self.budget is not None:  # cosine decay over the budget: large steps first, a settled end
            decay = 0.5 * (1 + math.cos(math.pi * min(1.0, self.spent / self.budget)))
            for group in opt.param_groups:
                group["lr"] = group["scale"] * self.lr * decay
        opt.step()
        self.steps += 1
        if self.progress is not None:
            self.progress(self.spent)
        return True

    def _optimise(self, optimizer, max_rounds):
        """See optimise.

        "lbfgs": full-batch L-BFGS with a strong-Wolfe line search (the loss is smooth and the parameters few:
        it converges in far fewer passes than a first-order method); "adam": Adam on ``batch`` fit chunks per
        iteration (all by default), learning rate ``lr``.
        """
        started = time.perf_counter()
        params = self.learn.parameters()
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
        self.last_loss = float("nan")
        measure = self.lr is None  # no rate given: Adam's is measured on its first minibatch (measured_lr)
        start = self.held_out_errors()
        checked = [(start, 0, self.learn.state())]
        self.history.append({"round": 0, "held_out_rmse": _rmse(start), "spent": self.spent})
        skipped = self.plan_backward() if params else None
        if skipped or not params:  # nothing to learn (a schedule too short to move, no parameters asked for)
            max_rounds = 0
        else:
            opt = self._optimizer(optimizer, params)
        gen, queue = torch.Generator().manual_seed(0), []

        def closure():
            opt.zero_grad(set_to_none=False)
            if self._out_of_budget(started):  # a zero gradient ends L-BFGS's iterations at once
                return torch.tensor(self.last_loss)
            self.last_loss = self.gradient(self.fit) ** 2
            if self.progress is not None:
                self.progress(self.spent)
            return torch.tensor(self.last_loss)

        rnd = 0
        # Adam with a budget: a held-out check each 1/checks of it, so the checks cost the same share whatever the
        # batch; otherwise (or L-BFGS) one every eval_every iterations
        every = self.budget / self.checks if optimizer == "adam" and self.budget and self.checks else None
        while rnd < max_rounds and not self._out_of_budget(started):
            rnd += 1
            if optimizer == "lbfgs":
                opt.step(closure)
            elif every is None:
                for _ in range(self.eval_every):
                    if self._out_of_budget(started) or not self._adam_step(opt, gen, queue):
                        break
            else:
                due = min(self.budget, self.history[-1]["spent"] + every)
                while self.spent < due and not self._out_of_budget(started):
                    if not self._adam_step(opt, gen, queue):
                        break
            if not self._finite():  # diverged (a step far too large): the latest accepted check so far stands
                break
            held = self.held_out_errors()
            self.history.append({"round": rnd, "held_out_rmse": _rmse(held), "fit_rmse": math.sqrt(self.last_loss),
                                 "spent": self.spent})
            if not math.isfinite(_rmse(held)):
                break
            checked.append((held, rnd, self.learn.state()))
        best = next(c for c in reversed(checked) if c[1] == 0 or held_out_accepts(c[0], start, self.margin))
        self.learn.load_state(best[2])
        return {"optimizer": optimizer, "learning_rate": self.lr, "learning_rate_measured": measure,
                "rounds": len(self.history) - 1, "best_round": best[1], "steps": self.steps, "batch": self.batch,
                "held_out_rmse": _rmse(best[0]), "start_held_out_rmse": self.history[0]["held_out_rmse"],
                "seconds": round(time.perf_counter() - started, 3), "evaluations_per_sample": round(self.spent, 2),
                "forward_evaluations": self.forward, "backward_evaluations": self.backward,
                "curve": [[round(h["spent"], 2), h["held_out_rmse"]] for h in self.history],
                **({"backward_chunk": self.backward_chunk} if self.backward_chunk else {}),
                **({"skipped": skipped} if skipped else {})}


def _rmse(errors):
    return math.sqrt(float(errors.mean())) if errors.numel() else float("nan")


def held_out_accepts(errors, start, margin):
    """Whether an iterate with per-noise mean squared held-out ``errors`` may replace the ``start``: no higher mean
    squared error, and per-noise RMSEs lower by more than ``margin`` standard errors of their paired difference."""
    return bool(errors.mean() <= start.mean()) and significantly_lower(errors.sqrt(), start.sqrt(), margin)


def significantly_lower(errors, start, margin):
    """Whether per-noise ``errors`` beat ``start`` (the same noises) by more than ``margin`` standard errors of their
    paired difference: endpoint errors are heavy-tailed, and a lower mean alone is often luck on a few noises."""
    diff = start - errors
    if diff.numel() < 2:
        return bool(diff.sum() > 0)
    return bool(diff.mean() > margin * diff.std() / math.sqrt(diff.numel()))


def normal_weights(module):
    """Replace the module's inference tensors by normal copies, in place, and return how many were replaced.

    UIs run sampling under ``torch.inference_mode`` (ComfyUI its nodes, the web UIs their pipeline), so a model
    loaded there holds inference tensors, which autograd refuses to save for a backward pass; the end-to-end stage
    differentiates through the model (with respect to the calibration's numbers only), so its weights must be
    normal tensors. One tensor is copied at a time; the weights keep their values, device and dtype, and never
    require grad.
    """
    replaced = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    replaced += 1
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    replaced += 1
    return replaced


def normal_tensors(obj, _depth=0):
    """``obj`` with every inference tensor inside it (lists, tuples, named tuples, dicts, plain objects, as the
    web UIs' conditioning is built) replaced by a normal copy; what holds none is returned as it is."""
    if torch.is_tensor(obj):
        if not obj.is_inference():
            return obj
        with torch.inference_mode(False):
            return obj.clone()
    if _depth > 8 or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return obj
    if isinstance(obj, dict):
        new = {k: normal_tensors(v, _depth + 1) for k, v in obj.items()}
        return obj if all(new[k] is obj[k] for k in obj) else type(obj)(new)
    if isinstance(obj, (list, tuple)):
        new = [normal_tensors(v, _depth + 1) for v in obj]
        if all(a is b for a, b in zip(new, obj)):
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
            return type(obj)(*new)
        return type(obj)(new)
    if hasattr(obj, "__dict__") and not callable(obj):
        changed = {k: normal_tensors(v, _depth + 1) for k, v in vars(obj).items()}
        if all(changed[k] is v for k, v in vars(obj).items()):
            return obj
        import copy
        out = copy.copy(obj)
        for k, v in changed.items():
            setattr(out, k, v)
        return out
    return obj
