"""Analytic testbed: a Gaussian-mixture data model whose denoiser is exact, in every family's coordinates.

Data x0 ~ sum_k w_k N(mu_k, s^2 I). For any noisy observation x = a x0 + b n (a = 1, b = sigma in
variance-exploding / EDM / k-diffusion eps coordinates; a = 1 - sigma, b = sigma for flow), the posterior mean
E[x0 | x] is closed-form, so the probability-flow ODE's exact solution can be computed to any precision with a
fine Runge-Kutta solve (``reference``). Components carry class labels for a class-conditional model and
classifier-free guidance (``extra_args={"cond": labels, "cfg": w}``).

Model views (each ``model(x, sigma, **extra_args) -> x0`` in its own x-space, as ComfyUI/k-diffusion call them):
``edm()``, ``discrete_eps()`` (SD1.x discrete VP schedule, eps-prediction network), ``v_prediction()`` and
``flow()``. The discrete views compute what a real network wrapper does: scale the input by
1/sqrt(1+sigma^2), evaluate a "network" that predicts eps (or v) from the VP state and the timestep, and
convert back. Used by the tests, the benchmarks and the CLI: ``from calibrated_samplers.calibration.testbed.analytic import GaussianMixture``.
"""
import math

import torch


class GaussianMixture:
    def __init__(self, shape=(4, 4, 4), n_components=8, n_classes=4, spread=1.0, std=0.25, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.shape = tuple(shape)
        self.dim = math.prod(self.shape)
        self.mu = torch.randn(n_components, self.dim, generator=g, dtype=torch.float64) * spread
        logits = torch.randn(n_components, generator=g, dtype=torch.float64) * 0.5
        self.log_w = torch.log_softmax(logits, 0)
        self.s2 = std * std
        self.classes = torch.arange(n_components) % n_classes
        self.n_classes = n_classes

    # ------------------------------------------------------------------ exact posterior mean
    def posterior_mean(self, x, a, b, cond=None):
        """E[x0 | x = a x0 + b n] for per-sample scalars a, b (tensors or floats), optional class labels."""
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], -1).to(torch.float64)
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1).expand(shape[0], 1)
        b = torch.as_tensor(b, dtype=torch.float64).reshape(-1, 1).expand(shape[0], 1)
        var = a * a * self.s2 + b * b                                    # (B, 1)
        d2 = ((xf[:, None, :] - a[:, None, :] * self.mu[None]) ** 2).sum(-1)  # (B, K)
        logp = self.log_w[None] - d2 / (2 * var) - 0.5 * self.dim * torch.log(var)
        if cond is not None:
            mask = self.classes[None, :].to(xf.device) == torch.as_tensor(cond).reshape(-1, 1).to(xf.device)
            logp = logp.masked_fill(~mask, -math.inf)
        p = torch.softmax(logp, dim=1)
        gain = (a * self.s2 / var)[:, :, None]                           # (B, 1, 1)
        post = self.mu[None] + gain * (xf[:, None, :] - a[:, None, :] * self.mu[None])
        return (p[..., None] * post).sum(1).reshape(shape).to(dtype)

    def guided(self, x, a, b, cond=None, cfg=1.0):
        if cond is None or cfg == 1.0:
            return self.posterior_mean(x, a, b, cond)
        uncond = self.posterior_mean(x, a, b)
        return uncond + cfg * (self.posterior_mean(x, a, b, cond) - uncond)

    # ------------------------------------------------------------------ model views
    def edm(self):
        """x = x0 + sigma n; returns the exact (guided) x0."""
        def model(x, sigma, cond=None, cfg=1.0, **unused):
            return self.guided(x, 1.0, sigma, cond, cfg)
        return model

    def discrete_eps(self, schedule=None, quantize=False):
        return DiscreteVPModel(self, schedule or DiscreteSchedule(), "eps", quantize)

    def v_prediction(self, schedule=None, quantize=False):
        return DiscreteVPModel(self, schedule or DiscreteSchedule(), "v", quantize)

    def flow(self):
        """x = (1 - sigma) x0 + sigma n, sigma in (0, 1]; a velocity network v = n - x0, returned as x0."""
        def model(x, sigma, cond=None, cfg=1.0, **unused):
            s = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
            x0 = self.guided(x, 1 - sigma.to(torch.float64), sigma.to(torch.float64), cond, cfg)
            velocity = (x.to(torch.float64) - x0.to(torch.float64)) / s
            return (x.to(torch.float64) - s * velocity).to(x.dtype)
        return model

    # ------------------------------------------------------------------ sampling helpers
    def sample_data(self, n, seed=0, cond=None):
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=g)
        x = self.mu[k] + math.sqrt(self.s2) * torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return x.reshape(n, *self.shape)

    def noise(self, n, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, *self.shape, generator=g, dtype=torch.float64).to(dtype)

    def reference(self, x, sigma_from, sigma_to, family="ve", cond=None, cfg=1.0, steps_per_unit=200):
        """The exact ODE solution from (x, sigma_from) to sigma_to (0 allowed), by classical RK4 in
        u = log(sigma_ve) with a fine grid on the exact denoiser, in float64; ``family`` "ve" or "flow"."""
        x = x.to(torch.float64)
        if family == "flow":
            x, s_from = x / (1 - sigma_from), sigma_from / (1 - sigma_from)
            s_to = sigma_to / (1 - sigma_to) if sigma_to > 0 else 0.0
        else:
            s_from, s_to = sigma_from, sigma_to
        s_end = s_to if s_to > 0 else 1e-6  # D(x, 1e-6) is the limit to ~1e-11 for component std 0.25
        u0, u1 = math.log(s_from), math.log(s_end)
        n = max(8, int(math.ceil(abs(u1 - u0) * steps_per_unit)))
        h = (u1 - u0) / n

        def f(x, u):  # dx/du = x - D(x, sigma) with sigma = e^u
            return x - self.guided(x, 1.0, math.exp(u), cond, cfg)

        u = u0
        for _ in range(n):
            k1 = f(x, u)
            k2 = f(x + 0.5 * h * k1, u + 0.5 * h)
            k3 = f(x + 0.5 * h * k2, u + 0.5 * h)
            k4 = f(x + h * k3, u + h)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            u += h
        if s_to == 0:
            x = self.guided(x, 1.0, s_end, cond, cfg)
        if family == "flow":
            x = x * (1 - sigma_to)
        return x


class DiscreteSchedule:
    """SD1.x's 1000-step scaled-linear schedule (betas 0.00085 to 0.012) as k-diffusion/ComfyUI use it."""

    def __init__(self, beta_start=0.00085, beta_end=0.012, n=1000):
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self):
        return float(self.sigmas[0])

    @property
    def sigma_max(self):
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma, quantize=False):
        log_sigma = sigma.to(torch.float64).log()
        dists = log_sigma[:, None] - self.log_sigmas[None]
        if quantize:
            return dists.abs().argmin(dim=1).to(torch.float64)
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=len(self.sigmas) - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * high

    def t_to_sigma(self, t):
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def karras(self, n, rho=7.0):
        return karras(n, self.sigma_min, self.sigma_max, rho)


class DiscreteVPModel:
    """A discrete-time VP network wrapped like k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser."""

    def __init__(self, mixture, schedule, prediction, quantize):
        self.mixture, self.schedule, self.prediction, self.quantize = mixture, schedule, prediction, quantize

    def network(self, z, t, cond=None, cfg=1.0):
        """What a trained eps- or v-network outputs for the VP state z at timestep t (exact here)."""
        sigma = self.schedule.t_to_sigma(t)
        alpha_vp = 1 / (1 + sigma ** 2) ** 0.5
        sigma_vp = sigma * alpha_vp
        x0 = self.mixture.guided(z, alpha_vp, sigma_vp, cond, cfg).to(torch.float64)
        zf = z.to(torch.float64)
        a = alpha_vp.reshape(-1, *([1] * (z.ndim - 1)))
        s = sigma_vp.reshape(-1, *([1] * (z.ndim - 1)))
        eps = (zf - a * x0) / s
        return eps if self.prediction == "eps" else a * eps - s * x0

    def __call__(self, x, sigma, cond=None, cfg=1.0, **unused):
        s = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        xf = x.to(torch.float64)
        c_in = 1 / (s ** 2 + 1) ** 0.5
        out = self.network(xf * c_in, self.schedule.sigma_to_t(sigma, self.quantize), cond, cfg)
        if self.prediction == "eps":
            return (xf - s * out).to(x.dtype)
        return (xf / (s ** 2 + 1) - s * c_in * out).to(x.dtype)


def karras(n, sigma_min, sigma_max, rho=7.0, zero=True):
    """Karras et al. (2022) schedule of n sigmas, optionally followed by 0 (as k-diffusion's get_sigmas_karras)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]) if zero else sig


def flow_sigmas(n, shift=3.0, sigma_min=0.0):
    """A flow schedule like ComfyUI's simple scheduler on ModelSamplingSD3: t uniform in (0, 1], shifted."""
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1] * (1 - sigma_min) + sigma_min
    sig = shift * t / (1 + (shift - 1) * t)
    return torch.cat([sig, sig.new_zeros(1)])


def ve_to_flow(sigma_ve):
    return sigma_ve / (1 + sigma_ve)


def rmse(a, b):
    return float(((a.to(torch.float64) - b.to(torch.float64)) ** 2).mean().sqrt())
