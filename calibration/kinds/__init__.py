"""The calibrated kinds, one class each (``base.Kind`` says what a kind declares); ``KINDS`` by the registry's
``SAMPLERS[name].kind``."""
from .amed import AMED
from .base import Kind
from .iia import IIA

KINDS = {kind.name: kind for kind in (IIA(), AMED())}

__all__ = ["AMED", "IIA", "KINDS", "Kind"]
