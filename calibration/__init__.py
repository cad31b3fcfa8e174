"""Fitting IIA coefficients and AMED parameters to a model, and the calibration file (imports samplers/).

Not built yet: this is the calibration-engine issue. The samplers already accept any object with
``.params`` (per-step tensors) and optional ``.method``, ``.sigmas``, ``.family``, ``.options``.
"""
