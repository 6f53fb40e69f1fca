"""orthomod: train extremely deep plain CNNs with orthonormality and modulation.

Xie, Xiong & Pu, "All You Need is Beyond a Good Init", CVPR 2017. The pieces work on their own
in any PyTorch training loop:

- :func:`orthomod.init.orthonormal_` and :func:`orthomod.init.init_model_`
- :class:`orthomod.regularizers.OrthonormalRegularizer` (replaces L2 weight decay)
- :class:`orthomod.modulation.ErrorModulator` (backward error modulation)
- :func:`orthomod.models.create` (CIFAR plain and residual networks)
- :mod:`orthomod.diagnostics` (filter correlation, error moments, the BN Jacobian)
- :mod:`orthomod.weights` (which layers each of them acts on: one definition, ``filter=`` on each)

Those modules are the library: they need only torch and import nothing of the application
(``train``, ``data``, ``folder_data``, ``config``, ``files``, ``hardware``, ``distributed``,
``report``, ``cli``), which runs experiments with them; tests/test_layering.py checks it.
"""
from . import init, models, modulation, regularizers, weights
from .init import init_model_, orthonormal_
from .models import create
from .modulation import ErrorModulator
from .regularizers import OrthonormalRegularizer, orthonormal_penalty

__version__ = "0.1.0"
__all__ = [
    "init", "models", "modulation", "regularizers", "weights",
    "orthonormal_", "init_model_", "create", "ErrorModulator", "OrthonormalRegularizer", "orthonormal_penalty",
]
