"""The bundled models calibrations are measured on: the exact Gaussian mixture and the tiny learned digit UNets.

The product uses them for its command line and demo, the benchmarks for every table and the tests as golden
models, so they live here rather than under tests/. ``testbed(name)`` gives a model with the facts a calibration
needs (family, schedule range, sample shape, classes); ``analytic`` and ``tiny`` are the models themselves.
Pure torch, like the rest of calibration/.
"""
import torch

NAMES = ("digits-eps", "digits-flow", "digits-eps-narrow", "shapes-eps", "textures-flow", "analytic-edm", "analytic-eps",
         "analytic-flow")


class Testbed:
    """A bundled model with the facts a calibration needs: family, schedule range, sample shape, conditions."""

    def __init__(self, name, model, family, shift, sigma_min, sigma_max, shape, classes, fingerprint):
        self.name, self.model, self.family, self.shift = name, model, family, shift
        self.sigma_min, self.sigma_max, self.shape, self.classes = sigma_min, sigma_max, shape, classes
        self.fingerprint = fingerprint

    def sigmas(self, steps, zero=True):
        """Karras sigmas (rho 7) for VE-type families; for flow, t uniform in (0, 1] with the model's shift."""
        from .analytic import flow_sigmas, karras
        if self.family == "flow":
            sig = flow_sigmas(steps, shift=self.shift)
            return sig if zero else torch.cat([sig[:-1], sig.new_tensor([self.sigma_min])])
        return karras(steps if zero else steps + 1, self.sigma_min, self.sigma_max, zero=zero)

    def noise(self, n, seed, sigmas):
        """Initial states for ``n`` seeds: sigma_max * N(0, I), or pure noise for flow (sigma_0 = 1)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *self.shape, generator=g)
        return x if self.family == "flow" else x * float(sigmas[0])

    def conditions(self, cfg):
        """One extra_args per class (classifier-free guidance at ``cfg``), or a single unconditional one."""
        if not self.classes:
            return [{}]
        return [{"cond": c, "cfg": float(cfg)} for c in range(self.classes)]


def testbed(name):
    """The bundled model ``name`` (one of ``NAMES``) as a Testbed; ValueError names the choices."""
    from . import tiny
    if name in tiny.MODELS:
        model = tiny.load(name)
        fingerprint = f"sha256:{tiny.file_sha256(tiny.weight_path(name))}"
        if model.family == "eps":
            return Testbed(name, model, "eps", 1.0, model.sigma_min, model.sigma_max, tiny.image_shape(name), 10,
                           fingerprint)
        return Testbed(name, model, "flow", 1.0, 1e-3, 1.0, tiny.image_shape(name), 10, fingerprint)
    if name in ("analytic-edm", "analytic-eps", "analytic-flow"):
        from .analytic import DiscreteSchedule, GaussianMixture
        mix = GaussianMixture()
        fp = "analytic:GaussianMixture(seed=0)"
        if name == "analytic-edm":
            return Testbed(name, mix.edm(), "edm", 1.0, 0.002, 80.0, mix.shape, mix.n_classes, fp)
        if name == "analytic-eps":
            sched = DiscreteSchedule()
            return Testbed(name, mix.discrete_eps(sched), "eps", 1.0, sched.sigma_min, sched.sigma_max, mix.shape,
                           mix.n_classes, fp)
        return Testbed(name, mix.flow(), "flow", 3.0, 1e-3, 1.0, mix.shape, mix.n_classes, fp)
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(NAMES)}")
