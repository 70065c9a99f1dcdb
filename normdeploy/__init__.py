"""normdeploy: deploy models whose normalization layers cost inference time.

The public API is :func:`optimize`, :func:`inspect` and :func:`benchmark` (:mod:`normdeploy.api`),
their options (:mod:`normdeploy.options`) and errors (:mod:`normdeploy.core.errors`).
"""

from .api import benchmark, inspect, optimize
from .core.errors import AccuracyError, InputError, NormdeployError, UnsupportedError
from .core.version import __version__
from .options import (
    BenchOptions,
    ExportOptions,
    Options,
    OrtOptions,
    RewriteOptions,
    TrtOptions,
    VerifyOptions,
)

__all__ = ["optimize", "inspect", "benchmark", "Options", "ExportOptions", "RewriteOptions", "VerifyOptions",
           "BenchOptions", "OrtOptions", "TrtOptions", "NormdeployError", "InputError", "UnsupportedError",
           "AccuracyError", "__version__"]
