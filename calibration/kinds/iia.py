"""IIA (Zhou et al., ICLR 2024): per step, coefficients on the step's basis vectors, fitted by least squares."""
import math

import torch

from ...samplers import SAMPLERS
from ...samplers import base as B
from ...samplers.core import HISTORY_KEPT, remember
from ...samplers.iia import VARIANT_BY_NAME, AnalyticFirst
from ..batch import join_records, take_records
from .base import Kind, flat

RIDGES = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class IIA(Kind):
    """Coefficients ``coeffs`` (steps, basis) on the variant's basis, 0 is the base solver; the end-to-end stage
    moves them in whitened units of each step's displacement and scales each evaluation time by ``a``."""

    name = "iia"

    def setup(self, st):
        st.variant = VARIANT_BY_NAME[st.sampler].with_basis(st.options.get("basis"))
        st.depth = st.variant.max_depth if st.history is None else int(st.history)
        if not 0 <= st.depth <= st.variant.max_depth:
            raise ValueError(f"{st.sampler} supports history depth 0 to {st.variant.max_depth}, got {st.depth}")

    def fit_units(self, n_steps, n_chunks, ends_in_zero):
        return n_steps * n_chunks

    def fit_evaluations(self, st):
        return SAMPLERS[st.sampler].evaluations(st.run.sigmas, **st.options)  # each step once, as sampling does

    def fit(self, st):
        return _fit(st.run, st.variant, st.teacher, st.target, st.depth, st.ridge, st.solver_options, st.fit_info,
                    st.scales, st.afs)

    def neutral(self, st, like=None):
        columns = st.variant.columns(0) if like is None else like["coeffs"].shape[1]
        return {"coeffs": torch.zeros(st.run.n_steps, columns, dtype=torch.float64)}

    def scaled(self, params, strength):
        return {"coeffs": params["coeffs"] * strength}

    def unchanged_steps(self, params):
        return (params["coeffs"] == 0).all(dim=1).to(torch.float64)

    def leaves(self, start, scales, device):
        if start.get("a") is None:
            start["a"] = torch.ones(start["coeffs"].shape[0], dtype=torch.float64, device=device)
        return {"coeffs": torch.zeros_like(start["coeffs"]), "a": torch.zeros_like(start["a"])}

    def materialize(self, start, leaves, scale):
        if "coeffs" not in leaves:
            return start
        return {"coeffs": start["coeffs"] + torch.einsum("ikl,il->ik", scale, leaves["coeffs"]),
                "a": start["a"] * leaves["a"].exp()}

    def check(self, cal, fail):
        coeffs = cal.params["coeffs"]
        if coeffs.ndim != 2:
            fail(f"coeffs must be (steps, basis) but is {tuple(coeffs.shape)}")
        try:
            VARIANT_BY_NAME[cal.method].with_basis(cal.options.get("basis")).depth(coeffs.shape[1])
        except ValueError as e:
            fail(str(e))
        if "a" in cal.params and (cal.params["a"].ndim != 1 or not (cal.params["a"] > 0).all()):
            fail("the evaluation time scales 'a' must be one positive number per step")

    def file_info(self, st):
        return {"history": st.variant.depth(st.params["coeffs"].shape[1])}


class _Gram:
    """sum <g_k, g_l>, sum <g_k, rho>, sum |rho|^2 and the sample count, in float64."""

    def __init__(self, k):
        self.G = torch.zeros(k, k, dtype=torch.float64)
        self.r = torch.zeros(k, dtype=torch.float64)
        self.yy = 0.0
        self.n = 0
        self.dim = 1

    def add(self, g, rho):  # g: (B, K, D), rho: (B, D)
        self.G += torch.einsum("bkd,bld->kl", g, g).cpu()
        self.r += torch.einsum("bkd,bd->k", g, rho).cpu()
        self.yy += float(rho.pow(2).sum())
        self.n += rho.shape[0]
        self.dim = rho.shape[1]

    def mse(self, c):
        """Mean squared residual per element after subtracting sum c_k g_k."""
        if self.n == 0:
            return float("nan")
        return max(self.yy - 2 * float(c @ self.r) + float(c @ self.G @ c), 0.0) / (self.n * self.dim)


def _solve(gram, ridge):
    k = gram.G.shape[0]
    scale = float(gram.G.diagonal().mean()) or 1.0
    return torch.linalg.solve(gram.G + ridge * scale * torch.eye(k, dtype=torch.float64), gram.r)


def _fit(run, variant, teacher, target, depth, ridge, options, fit_info, scales, afs=False):
    step_fn = B.BASE_STEPS[variant.base][0]
    n_coeffs = variant.columns(depth)
    coeffs = torch.zeros(run.n_steps, n_coeffs, dtype=torch.float64)
    before = torch.zeros(run.n_steps, dtype=torch.float64)
    after = torch.zeros(run.n_steps, dtype=torch.float64)
    fallback = torch.zeros(run.n_steps, dtype=torch.float64)
    ridges = []
    hist = []
    step_rms = torch.zeros(run.n_steps, dtype=torch.float64)
    gram = torch.zeros(run.n_steps, n_coeffs, n_coeffs, dtype=torch.float64)
    for i in range(run.n_steps):
        targets = teacher.advance(i, range(len(run.chunks))) if target == "trajectory" else None
        fit, held = _Gram(n_coeffs), _Gram(n_coeffs)
        x_base, records, live = [], [], None
        moved = 0.0
        for j, ch in enumerate(run.chunks):
            x = run.x[ch.sl].to(run.device)
            h = take_records(hist, ch.sl, run.device)
            ev = run.denoiser(ch, x)
            xb, q = step_fn(AnalyticFirst(ev, run.family) if (afs and i == 0) else ev, x, i, run.sig, h, run.family,
                            **options)
            y = targets[j].to(run.device) if targets is not None else teacher.local(i, x, h, ev)
            run.count(ev, ch)
            basis = variant.basis(q, h, run.family, depth)
            live = [k for k, g in enumerate(basis) if g is not None]
            g = torch.zeros(ch.n, n_coeffs, flat(xb).shape[1], dtype=torch.float64, device=run.device)
            for k in live:
                g[:, k] = flat(basis[k])
            (held if ch.held_out else fit).add(g, flat(y - xb))
            moved += float(flat(xb - x).pow(2).sum())
            x_base.append(xb.to(run.storage))
            records.append(take_records([q], slice(None), run.storage))
            run.tick()
        step_rms[i] = math.sqrt(moved / (run.x0.numel()))
        gram[i] = (fit.G + held.G) / run.x0.numel()
        c = torch.zeros(n_coeffs, dtype=torch.float64)
        chosen = None
        if live:
            sub = _Gram(len(live))
            sub.G, sub.r, sub.yy, sub.n, sub.dim = fit.G[live][:, live], fit.r[live], fit.yy, fit.n, fit.dim
            candidates = RIDGES if ridge is None else (ridge,)
            best = None
            for lam in candidates:
                cand = torch.zeros(n_coeffs, dtype=torch.float64)
                cand[live] = _solve(sub, lam)
                score = held.mse(cand) if held.n else fit.mse(cand)
                if best is None or score < best[0]:
                    best, chosen = (score, cand), lam
            c = best[1]
        zero = torch.zeros(n_coeffs, dtype=torch.float64)
        check = held if held.n else fit
        before[i], after[i] = check.mse(zero), check.mse(c)
        if live and not after[i] < before[i]:
            c, fallback[i], after[i], chosen = zero, 1.0, before[i], None
        coeffs[i] = c
        ridges.append(chosen)
        # advance every noise with the corrected update; the basis is rebuilt from the stored records
        new_x = []
        q_all = join_records(records, run.storage)[0]
        for j, ch in enumerate(run.chunks):
            xb = x_base[j].to(run.device)
            if c.abs().sum() > 0:
                xb = variant.correct(xb, c.tolist(), take_records([q_all], ch.sl, run.device)[0],
                                     take_records(hist, ch.sl, run.device), run.family, depth, i)
            new_x.append(xb.to(run.storage))
        remember(hist, q_all, max(HISTORY_KEPT, depth + 1))
        run.x = torch.cat(new_x)
        run.check_cancel()
    fit_info["ridge"] = ridges
    scales["coeffs"] = whitened_scales(step_rms, gram)
    return {"coeffs": coeffs}, before.sqrt(), after.sqrt(), fallback


def whitened_scales(step_rms, gram, floor=1e-3):
    """Per step, the matrix M with coeffs = start + M @ delta: a unit change of delta in any direction moves the
    step's result by its own displacement's RMS (the basis is whitened by its mean Gram matrix ``gram``, so
    nearly collinear vectors, such as the x0 predictions of neighbouring steps, do not make the problem
    ill-conditioned). Coefficients whose basis vector never exists get a zero row and column."""
    n_steps, k, _ = gram.shape
    out = torch.zeros_like(gram)
    for i in range(n_steps):
        live = gram[i].diagonal() > 0
        if not live.any():
            continue
        G = gram[i][live][:, live]
        lam, U = torch.linalg.eigh(G)
        lam = lam + floor * float(lam.max())  # directions the data barely determine are damped, not amplified
        M = U @ torch.diag(lam.rsqrt()) @ U.T * step_rms[i]
        idx = live.nonzero().flatten()
        out[i][idx[:, None], idx[None, :]] = M
    return out
