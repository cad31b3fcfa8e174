"""AMED (Zhou et al., CVPR 2024): per step, an intermediate time (``r``), a scale of its update (``c``) and of the
evaluation time (``a``); ``r`` and ``a`` by search, ``c`` in closed form."""
import torch

from ...samplers import SAMPLERS
from ...samplers import amed as A
from ...samplers.core import remember
from ..batch import join_records, take_records
from .base import Kind, flat

R_COARSE = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
REFINE = ((-0.05, 0.9), (-0.05, 1.0), (-0.05, 1.1), (0.0, 0.9), (0.0, 1.1), (0.05, 0.9), (0.05, 1.0), (0.05, 1.1))
R_BOUNDS = (0.02, 1.0)  # where the search and the end-to-end stage keep r


class AMED(Kind):
    """``r``, ``c``, ``a`` per step, ``samplers.amed.DEFAULTS`` the base solver; the end-to-end stage moves ``r`` and
    ``c`` additively, ``a`` multiplicatively."""

    name = "amed"

    def variants(self, sampler, options):
        # learned intermediate times make the refined grid non-uniform, where iPNDM's fixed weights (which
        # assume equal steps) can corrupt the next steps' extrapolation; exact variable-step weights fix that
        # but measured worse end to end in some cells (analytic testbed: better at 8 evaluations, worse at 10).
        # The per-step fit cannot see either, so both are fitted and the better kept on the held-out noises.
        if SAMPLERS[sampler].base == "ipndm" and "variable_step" not in options:
            return [{"variable_step": True}, {"variable_step": False}]
        return []

    def fit_units(self, n_steps, n_chunks, ends_in_zero):
        return (3 * n_steps - 2 * ends_in_zero) * n_chunks  # search, refine, advance; the step into 0 only advances

    def fit_evaluations(self, st):
        # per step: its own evaluation (none for AFS's first), one per candidate (the coarse grid, then at most the
        # refinements), one to advance; the step into 0 only evaluates at its own sigma
        afs = bool(st.options.get("afs", False))
        inner = sum(1 for s in st.run.sig[1:] if s > 0)
        return (len(st.run.sig) - 1) + inner * (len(R_COARSE) + len(REFINE) + 1) - (1 if afs else 0)

    def fit(self, st):
        return _fit(st.run, st.sampler, st.teacher, st.target, st.afs, st.solver_options, st.fit_info)

    def neutral(self, st, like=None):
        return {k: torch.full((st.run.n_steps,), A.DEFAULTS[k], dtype=torch.float64) for k in ("r", "c", "a")}

    def scaled(self, params, strength):
        return {k: A.DEFAULTS[k] + strength * (v - A.DEFAULTS[k]) for k, v in params.items()}

    def unchanged_steps(self, params):
        return ((params["r"] == A.DEFAULTS["r"]) & (params["c"] == A.DEFAULTS["c"])
                & (params["a"] == A.DEFAULTS["a"])).to(torch.float64)

    def leaves(self, start, scales, device):
        return {k: torch.zeros_like(start[k]) for k in ("r", "c", "a")}

    def materialize(self, start, leaves, scale):
        if "r" not in leaves:
            return start
        return {"r": (start["r"] + leaves["r"]).clamp(*R_BOUNDS), "c": start["c"] + leaves["c"],
                "a": start["a"] * leaves["a"].exp()}

    def check(self, cal, fail):
        for k in ("r", "c", "a"):
            if cal.params[k].ndim != 1:
                fail(f"AMED parameter {k!r} must be one number per step")
        if not A.valid_steps(cal.params["r"], cal.params["a"]):
            fail(f"AMED needs {A.STEP_RULE} at every step")


class _Line:
    """Statistics of x_next = A + c B against a target y: sum |B|^2, <B, y - A>, |y - A|^2, count."""

    def __init__(self):
        self.bb = self.by = self.yy = 0.0
        self.n, self.dim = 0, 1

    def add(self, A, Bv, y):
        rho = flat(y - A)
        b = flat(Bv)
        self.bb += float(b.pow(2).sum())
        self.by += float((b * rho).sum())
        self.yy += float(rho.pow(2).sum())
        self.n += rho.shape[0]
        self.dim = rho.shape[1]

    def best_c(self):
        return self.by / self.bb if self.bb > 0 else 1.0

    def mse(self, c):
        if self.n == 0:
            return float("nan")
        return max(self.yy - 2 * c * self.by + c * c * self.bb, 0.0) / (self.n * self.dim)


def _fit(run, method, teacher, target, afs, options, fit_info):
    kind = "amed" if method == "amed" else SAMPLERS[method].base
    defaults = (A.DEFAULTS["r"], A.DEFAULTS["c"], A.DEFAULTS["a"])
    table = {k: torch.zeros(run.n_steps, dtype=torch.float64) for k in ("r", "c", "a")}
    before = torch.zeros(run.n_steps, dtype=torch.float64)
    after = torch.zeros(run.n_steps, dtype=torch.float64)
    fallback = torch.zeros(run.n_steps, dtype=torch.float64)
    hist = []
    searched = []
    for i in range(run.n_steps):
        s, s_next = run.sig[i], run.sig[i + 1]
        targets = teacher.advance(i, range(len(run.chunks))) if target == "trajectory" else None
        first = []  # this step's own evaluation per chunk, shared by every candidate
        ys = []
        for j, ch in enumerate(run.chunks):
            x = run.x[ch.sl].to(run.device)
            ev = run.denoiser(ch, x)
            D = A.afs_denoised(x, s, run.family) if (afs and i == 0) else ev(x, s)
            y = targets[j] if targets is not None else teacher.local(
                i, x, take_records(hist, ch.sl, run.device), ev).to(run.storage)
            run.count(ev, ch)
            first.append(D.to(run.storage))
            ys.append(y)

        def evaluate(candidates):
            stats = {rc: (_Line(), _Line()) for rc in candidates}
            for j, ch in enumerate(run.chunks):
                x = run.x[ch.sl].to(run.device)
                h = take_records(hist, ch.sl, run.device)
                ev = run.denoiser(ch, x, cached=(s, x, first[j].to(run.device)))
                y = ys[j].to(run.device)
                for r, a in candidates:
                    A_, B_, _ = A.amed_parts(kind, ev, x, i, run.sig, h, run.family, r, a, afs, **options)
                    stats[(r, a)][1 if ch.held_out else 0].add(A_, B_, y)
                run.count(ev, ch)
                run.tick()
            return stats

        if s_next == 0:  # a plain base step: nothing to fit, its residual is measured below
            r, c, a = defaults
        else:
            stats = evaluate([(r, 1.0) for r in R_COARSE])
            r0 = min(R_COARSE, key=lambda r: stats[(r, 1.0)][0].mse(stats[(r, 1.0)][0].best_c()))
            refine = [(min(max(r0 + dr, R_BOUNDS[0]), R_BOUNDS[1]), a) for dr, a in REFINE]
            stats.update(evaluate([rc for rc in refine if rc not in stats]))
            (r, a), (fit, held) = min(stats.items(), key=lambda kv: kv[1][0].mse(kv[1][0].best_c()))
            c = fit.best_c()
            base_fit, base_held = stats[(defaults[0], defaults[2])]
            check_base, check = (base_held, held) if held.n else (base_fit, fit)
            before[i], after[i] = check_base.mse(defaults[1]), check.mse(c)
            searched.append(len(stats))
            if not after[i] < before[i]:
                r, c, a = defaults
                fallback[i], after[i] = 1.0, before[i]
        table["r"][i], table["c"][i], table["a"][i] = r, c, a
        new_x, recs, last = [], [], (_Line(), _Line())
        for j, ch in enumerate(run.chunks):
            x = run.x[ch.sl].to(run.device)
            ev = run.denoiser(ch, x, cached=(s, x, first[j].to(run.device)))
            A_, B_, records = A.amed_parts(kind, ev, x, i, run.sig, take_records(hist, ch.sl, run.device), run.family,
                                           r, a, afs, **options)
            run.count(ev, ch)
            if B_ is None:
                last[1 if ch.held_out else 0].add(A_, torch.zeros_like(A_), ys[j].to(run.device))
            new_x.append((A_ if B_ is None else A_ + c * B_).to(run.storage))
            recs.append(take_records(records, slice(None), run.storage))
            run.tick()
        if s_next == 0:
            before[i] = after[i] = (last[1] if last[1].n else last[0]).mse(0.0)
        joined = join_records(recs, run.storage)
        remember(hist, {"records": joined})
        run.x = torch.cat(new_x)
    fit_info["candidates_per_step"] = searched
    return table, before.sqrt(), after.sqrt(), fallback
