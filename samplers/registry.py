"""The sampler registry: name -> k-diffusion-compatible sampling function with its facts attached."""

SAMPLERS = {}


def register(name, fn, *, base, nfe_per_step, evaluations, kind, params=()):
    """Attach the registry facts to ``fn`` and list it.

    ``base``: the solver it reduces to uncalibrated; ``nfe_per_step``: model evaluations of a full step;
    ``evaluations(sigmas, **options)``: exact evaluations for a schedule (first/last steps may cost less);
    ``kind``: "iia", "amed" or "plain" (nothing to calibrate); ``params``: per-step parameter names.
    """
    fn.__name__ = fn.__qualname__ = f"sample_{name}"
    fn.sampler_name = name
    fn.base = base
    fn.nfe_per_step = nfe_per_step
    fn.evaluations = evaluations
    fn.kind = kind
    fn.params = tuple(params)
    SAMPLERS[name] = fn
    return fn
