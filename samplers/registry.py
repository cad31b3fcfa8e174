"""The sampler registry: name -> k-diffusion-compatible sampling function with its facts attached."""

SAMPLERS = {}


def register(name, fn, *, base, nfe_per_step, evaluations, kind, params=(), optional_params=(), uncalibrated=None,
             label=None):
    """Attach the registry facts to ``fn`` and list it.

    ``base``: the solver it reduces to uncalibrated; ``nfe_per_step``: model evaluations of a full step;
    ``evaluations(sigmas, **options)``: exact evaluations for a schedule (first/last steps may cost less);
    ``kind``: "iia", "amed" or "plain" (nothing to calibrate); ``params``: per-step parameter names;
    ``optional_params``: per-step parameters a calibration may leave out (then at their neutral value).
    ``uncalibrated``: what it runs without a calibration, in words (default: "the {base} solver").
    ``label``: its name for people (the web UIs' sampler list; default: ``name``).
    """
    fn.__name__ = fn.__qualname__ = f"sample_{name}"
    fn.sampler_name = name
    fn.base = base
    fn.uncalibrated = uncalibrated or f"the {base} solver"
    fn.label = label or name
    fn.nfe_per_step = nfe_per_step
    fn.evaluations = evaluations
    fn.kind = kind
    fn.params = tuple(params)
    fn.optional_params = tuple(optional_params)
    SAMPLERS[name] = fn
    return fn


def calibrated():
    """The names of the samplers a calibration fits (every kind but "plain"), in registration order."""
    return [name for name, fn in SAMPLERS.items() if fn.kind != "plain"]


def steps_for_evaluations(name, evaluations, **options):
    """(steps, ends_at_zero) so that sampler ``name`` costs exactly ``evaluations`` model calls, or None.

    A schedule ending at sigma = 0 is preferred (its last step costs one evaluation even for two-evaluation
    solvers); equal evaluations is how samplers are compared (a two-evaluation step counts twice).
    """
    import torch
    fn = SAMPLERS[name]
    for zero in (True, False):
        for steps in range(1, evaluations + 2):
            sig = torch.linspace(10.0, 1.0, steps + (0 if zero else 1), dtype=torch.float64)
            if zero:
                sig = torch.cat([sig, sig.new_zeros(1)])
            if fn.evaluations(sig, **options) == evaluations:
                return steps, zero
    return None
