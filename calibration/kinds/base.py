"""What every calibrated kind says about itself (one class per kind: ``kinds.iia.IIA``, ``kinds.amed.AMED``)."""
import torch


def flat(t):
    """(batch, everything else) in float64: the fits compare whole samples."""
    return t.reshape(t.shape[0], -1).to(torch.float64)


class Kind:
    """A calibrated kind: how it fits step by step, its neutral parameters, how the end-to-end stage moves them and
    what a file of it must hold. ``st`` is the calibration's state (engine.py's stages); ``st.run`` its batch."""

    name = None

    def variants(self, sampler, options):
        """Solver options to calibrate ``sampler`` with one after another, the better on the held-out noises kept
        (the first where nothing is held out); none by default."""
        return []

    def setup(self, st):
        """Choices this kind makes once per calibration, from its settings (none by default)."""

    def fit_units(self, n_steps, n_chunks, ends_in_zero):
        """Progress units of the per-step fit."""
        raise NotImplementedError

    def fit_evaluations(self, st):
        """Model evaluations per noise of the per-step fit's own steps (the teacher's are counted apart); an upper
        bound where the fit's search decides how many candidates it tries."""
        raise NotImplementedError

    def fit(self, st):
        """The per-step fit along the calibrated trajectory: (params, residual before, after, fallback), the
        residuals per step on the held-out share, fallback 1 where a step kept the base update."""
        raise NotImplementedError

    def neutral(self, st, like=None):
        """The parameters with which the sampler is exactly its base solver (shaped as ``like`` where given)."""
        raise NotImplementedError

    def scaled(self, params, strength):
        """``params`` moved towards the neutral ones: strength 1 is ``params``, 0 the base solver."""
        raise NotImplementedError

    def unchanged_steps(self, params):
        """Float per step: 1 where the step's parameters are exactly the base update's."""
        raise NotImplementedError

    def leaves(self, start, scales, device):
        """The end-to-end stage's free numbers (zeros: the start), by name; may complete ``start`` in place."""
        raise NotImplementedError

    def materialize(self, start, leaves, scale):
        """The sampler's parameters at the free numbers ``leaves`` (carrying their gradients)."""
        raise NotImplementedError

    def check(self, cal, fail):
        """Kind-specific checks of a loaded file's parameters; ``fail(message)`` raises."""

    def file_info(self, st):
        """What the file's info records about this kind's fit (none by default)."""
        return {}
