"""Pure cost maths: the price catalogue, memory fit and estimates. No I/O happens here.

- `catalogue`: the catalogue's shape and validation (GPU types, MIG profiles, zone prices).
- `facts`: a model's shape for the maths, from what the library's inspectors recorded.
- `fit`: bytes a replica needs; the smallest GPU or MIG profile (or N GPUs) that holds them.
- `estimate`: hourly and monthly cost, line by line, with the working.
"""

from converge.core.costs.catalogue import (
    GB,
    GIB,
    CatalogueError,
    CatalogueProblem,
    PriceCatalogue,
    Pricing,
    resolve_gpu_type,
    validate_catalogue,
)
from converge.core.costs.estimate import (
    DEFAULT_CPU,
    DEFAULT_MEMORY_BYTES,
    Ask,
    DoesNotFit,
    Estimate,
    Line,
    NeedsFacts,
    estimate,
)
from converge.core.costs.facts import Missing, ModelShape, model_shape
from converge.core.costs.fit import (
    MAX_GPUS,
    OVERHEAD_FIXED_BYTES,
    OVERHEAD_FRACTION,
    Device,
    Fit,
    MemoryNeed,
    Step,
    UnknownName,
    choose_fit,
    devices,
    memory_need,
)

__all__ = [
    "DEFAULT_CPU",
    "DEFAULT_MEMORY_BYTES",
    "GB",
    "GIB",
    "MAX_GPUS",
    "OVERHEAD_FIXED_BYTES",
    "OVERHEAD_FRACTION",
    "Ask",
    "CatalogueError",
    "CatalogueProblem",
    "Device",
    "DoesNotFit",
    "Estimate",
    "Fit",
    "Line",
    "MemoryNeed",
    "Missing",
    "ModelShape",
    "NeedsFacts",
    "PriceCatalogue",
    "Pricing",
    "Step",
    "UnknownName",
    "choose_fit",
    "devices",
    "estimate",
    "memory_need",
    "model_shape",
    "resolve_gpu_type",
    "validate_catalogue",
]
