"""Weight initializers, in the style of ``torch.nn.init``.

Orthonormal initialization (docs/METHOD-NOTES.md, Orthonormal initialization): a weight of shape ``(f_out, C, kh, kw)``
is viewed as ``V`` of shape ``(f_out, f_in)``, one filter per row, and set so that
``V V^T = I``. When ``f_out > f_in`` no such ``V`` exists, so the rows are split into
consecutive groups of ``f_in`` (the last group holds the remainder) and each group is
orthonormal on its own.

    >>> w = torch.empty(64, 16, 3, 3, dtype=torch.float64)
    >>> v = orthonormal_(w).reshape(64, -1)
    >>> torch.allclose(v @ v.T, torch.eye(64, dtype=torch.float64))
    True
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .weights import LayerFilter, filter_matrices, geometry, is_weight_layer, plain_weight, distinct_weights, \
    weight_from_filters, weight_layers

__all__ = ["orthonormal_", "delta_orthogonal_", "dirac_delta", "group_slices", "check_weight", "is_weight_layer",
           "looks_linear_", "init_model_", "lsuv_", "INIT_SCHEMES", "DATA_INIT_SCHEMES", "MODEL_INIT_SCHEMES"]

INIT_SCHEMES = ("orthonormal", "msra", "default", "delta-orthogonal", "dirac", "suo-delta")
DATA_INIT_SCHEMES = ("lsuv",)  # need a batch of data: orthonormal init, then lsuv_ (the trainer does both)
MODEL_INIT_SCHEMES = ("looks-linear",)  # need to know which layers a CReLU feeds: orthomod.models.create does it


def group_slices(f_out: int, f_in: int) -> list[slice]:
    """Row ranges of the orthonormal groups of an ``(f_out, f_in)`` matrix.

    One group when ``f_out <= f_in``; otherwise ``ceil(f_out / f_in)`` consecutive groups of
    ``f_in`` rows, the last holding the remainder (docs/METHOD-NOTES.md, Orthonormal initialization, Decision).
    """
    size = min(f_out, f_in)
    return [slice(start, min(start + size, f_out)) for start in range(0, f_out, size)]


def check_weight(tensor: torch.Tensor) -> tuple[int, int]:
    """``(f_out, f_in)`` of a floating-point weight with at least 2 dimensions, or a ValueError
    (TypeError for a non-floating dtype) saying why not."""
    if not tensor.is_floating_point():
        raise TypeError(f"orthonormal weights need a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() < 2:
        raise ValueError(
            f"orthonormal weights need at least 2 dimensions (f_out, f_in, ...), got shape {tuple(tensor.shape)}"
        )
    f_out = tensor.shape[0]
    f_in = 1
    for size in tensor.shape[1:]:
        f_in *= size
    if f_out == 0 or f_in == 0:
        raise ValueError(f"cannot orthonormalize an empty weight of shape {tuple(tensor.shape)}")
    return f_out, f_in


def orthonormal_(
    tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None, *, groups: int = 1,
    transposed: bool = False,
) -> torch.Tensor:
    """Fill ``tensor`` in place with group-wise orthonormal filters, scaled by ``gain``.

    Each group is the Q factor of a Gaussian matrix (with the sign of R's diagonal folded in,
    which makes the draw uniform over orthonormal frames), computed in float64 so that
    ``V V^T = I`` holds to the tensor's precision. ``groups`` and ``transposed`` give the
    layer's conv groups and layout (``ConvTranspose``): ``V`` is then taken per conv group, one
    row per output channel (:mod:`orthomod.weights`).

    >>> w = orthonormal_(torch.empty(8, 2, 3, 3, dtype=torch.float64), groups=4)  # Conv2d(8, 8, 3, groups=4)
    >>> v = filter_matrices(w, groups=4)          # 4 groups of 2 filters over 18 inputs
    >>> torch.allclose(v @ v.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(4, 2, 2))
    True
    """
    check_weight(tensor)
    if groups < 1 or (tensor.shape[1 if transposed else 0] % groups):
        raise ValueError(f"groups={groups} does not divide the weight's {'second' if transposed else 'first'} "
                         f"dimension (shape {tuple(tensor.shape)})")
    v = filter_matrices(torch.empty(tensor.shape, dtype=torch.float64), groups, transposed)
    _, f_out, f_in = v.shape
    for rows in v:
        for group in group_slices(f_out, f_in):
            rows[group] = _semi_orthogonal(group.stop - group.start, f_in, generator)
    with torch.no_grad():
        tensor.copy_(weight_from_filters(gain * v, tensor.shape, transposed))
    return tensor


def _semi_orthogonal(rows: int, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    """A ``(rows, cols)`` float64 matrix with orthonormal columns (rows > cols) or rows, drawn
    uniformly (the Q factor of a Gaussian matrix with the signs of R's diagonal folded in)."""
    device = generator.device if generator is not None else torch.device("cpu")
    gaussian = torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float64, device=device,
                           generator=generator).cpu()
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
    return q if rows > cols else q.T  # square: q.T, the draw orthonormal_ has always made


def _conv_centre(tensor: torch.Tensor, what: str) -> tuple[int, ...]:
    if not tensor.is_floating_point():
        raise TypeError(f"{what} needs a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() not in (3, 4, 5) or tensor.numel() == 0:
        raise ValueError(f"{what} takes a non-empty Conv1d/2d/3d weight (C_out, C_in, k, ...), got shape "
                         f"{tuple(tensor.shape)}")
    kernel = tuple(tensor.shape[2:])
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"{what} needs odd kernel sizes (a centre tap), got kernel {kernel}")
    return tuple(k // 2 for k in kernel)


def delta_orthogonal_(tensor: torch.Tensor, gain: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Delta-orthogonal init (Xiao et al. 2018): every tap zero but the kernel's centre, which
    holds ``gain`` times a random ``(C_out, C_in)`` matrix with orthonormal columns when
    ``C_out >= C_in`` (the conv then preserves the norm of every input, times ``gain``, with zero
    padding and stride 1) and orthonormal rows otherwise. PyTorch's layout, odd kernels.

    >>> w = delta_orthogonal_(torch.empty(32, 16, 3, 3, dtype=torch.float64))
    >>> x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    >>> y = torch.nn.functional.conv2d(x, w, padding=1)
    >>> torch.allclose(y.norm(), x.norm())
    True
    """
    centre = _conv_centre(tensor, "delta_orthogonal_")
    matrix = gain * _semi_orthogonal(tensor.shape[0], tensor.shape[1], generator)
    with torch.no_grad():
        tensor.zero_()
        tensor[(slice(None), slice(None)) + centre] = matrix.to(tensor.dtype)
    return tensor


def looks_linear_(tensor: torch.Tensor, gain: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Looks-linear init (Balduzzi et al. 2017) of a conv or linear weight fed by a CReLU,
    ``[relu(x), relu(-x)]`` (:class:`orthomod.layers.CReLU`): ``W = [W0, -W0]`` over the input
    channels, so that ``W [relu(x), relu(-x)] = W0 x``, and the layer starts linear in ``x``.
    ``W0`` (half of ``W``'s input width) takes :func:`orthonormal_` init, times ``gain``: its
    filters, flattened over channels and taps, are orthonormal. PyTorch's layout; the input
    width must be even. (Not delta-orthogonal ``W0``: a net of centre taps that starts linear
    mixes no positions, and is a per-pixel map of the image's 3 colours; docs/METHOD-NOTES.md.)

    >>> w = looks_linear_(torch.empty(16, 32, 3, 3, dtype=torch.float64))
    >>> torch.equal(w[:, 16:], -w[:, :16])
    True
    >>> x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    >>> crelu = torch.cat((x.relu(), (-x).relu()), dim=1)
    >>> conv = torch.nn.functional.conv2d
    >>> torch.allclose(conv(crelu, w, padding=1), conv(x, w[:, :16], padding=1))
    True
    """
    if not tensor.is_floating_point():
        raise TypeError(f"looks_linear_ needs a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() < 2 or tensor.numel() == 0 or tensor.shape[1] % 2:
        raise ValueError(f"looks_linear_ takes a non-empty conv or linear weight (C_out, C_in, ...) whose input width "
                         f"C_in is even (a CReLU's [relu(x), relu(-x)]), got shape {tuple(tensor.shape)}")
    w0 = torch.empty((tensor.shape[0], tensor.shape[1] // 2, *tensor.shape[2:]), dtype=torch.float64)
    orthonormal_(w0, gain, generator)
    with torch.no_grad():
        tensor.copy_(torch.cat((w0, -w0), dim=1).to(tensor.dtype))
    return tensor


def dirac_delta(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The identity kernel of a conv weight shape, also where ``C_out != C_in`` (DiracNets):
    output channel ``o`` copies input channel ``o mod C_in`` when ``C_out > C_in``, and sums
    input channels ``o, o + C_out, ...`` when ``C_out < C_in``. With ``C_out == C_in`` it is
    ``torch.nn.init.dirac_``."""
    delta = torch.zeros(shape, dtype=dtype)
    centre = _conv_centre(delta, "dirac_delta")
    c_out, c_in = shape[0], shape[1]
    for o in range(c_out):
        for i in range(o % c_in, c_in, c_out) if c_out < c_in else [o % c_in]:
            delta[(o, i) + centre] = 1.0
    return delta


def init_model_(model: nn.Module, scheme: str = "msra", generator: torch.Generator | None = None,
                filter: LayerFilter = None) -> nn.Module:
    """Initialize the weight layers (:mod:`orthomod.weights`: convs, transposed convs, linear
    layers; ``filter`` narrows them) and every BN layer of ``model`` in place; return it.

    Schemes:
      - ``"orthonormal"``: conv and linear weights by :func:`orthonormal_` (gain 1), per conv
        group, transposed convs in their output-filter view.
      - ``"msra"``: He normal with ``fan_out`` for convs, as in the ResNet protocol (for a
        transposed conv the outputs each input feeds, ``C_out / groups * prod(kernel)``, which
        torch calls its ``fan_in``); linear layers keep PyTorch's default uniform init.
      - ``"default"``: PyTorch's own ``reset_parameters``.
      - ``"delta-orthogonal"``: conv weights by :func:`delta_orthogonal_`, linear weights by a
        semi-orthogonal matrix (Xiao et al. 2018).
      - ``"dirac"``: conv weights by :func:`dirac_delta` (identity, DiracNets' repeat where the
        width changes); linear layers keep PyTorch's default init (ISONet's Dirac init).
      - ``"suo-delta"``: DKS/TAT's scaled-uniform-orthogonal delta init of every conv and
        linear weight (:func:`orthomod.tat.init_tat_`; needs ``dks``; refuses BN layers).
    In every scheme biases are zero and BN starts at ``gamma = 1, beta = 0``. A layer a scheme
    cannot initialize (an even kernel under delta-orthogonal or dirac, a grouped conv, a
    parametrized weight) raises a ``ValueError`` that names it.
    """
    if scheme in DATA_INIT_SCHEMES:
        raise ValueError(f"init {scheme!r} needs data: init_model_(model, 'orthonormal'), then "
                         f"lsuv_(model, a_batch_of_inputs)")
    if scheme in MODEL_INIT_SCHEMES:
        raise ValueError(f"init {scheme!r} needs to know which layers a CReLU feeds: orthomod.models.create(name, "
                         f"activation='crelu', init={scheme!r}) for the plain nets, or looks_linear_(layer.weight) "
                         f"on the layers your own CReLUs feed")
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    if scheme == "suo-delta":  # DKS/TAT's init, through the optional dks package
        from .tat import init_tat_

        return init_tat_(model)
    named = weight_layers(model, filter, user="init_model_")
    for name, module in distinct_weights(named, "init_model_"):  # a shared weight is initialized once
        _init_weight(name, module, scheme, generator)
    for _, module in named:  # biases are each layer's own
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()
    return model


def _init_weight(name: str, module: nn.Module, scheme: str, generator: torch.Generator | None) -> None:
    """One weight layer's weight by ``scheme`` (init_model_'s schemes that need no data)."""
    weight = plain_weight(name, module, "init_model_")
    groups, transposed = geometry(module)
    if scheme in ("delta-orthogonal", "dirac") and not isinstance(module, nn.Linear):
        _init_identity_like(name, module, scheme, generator)
    elif scheme == "delta-orthogonal":
        with torch.no_grad():
            weight.copy_(_semi_orthogonal(*weight.shape, generator))
    elif scheme == "orthonormal":
        orthonormal_(weight, generator=generator, groups=groups, transposed=transposed)
    elif scheme == "msra" and not isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(weight, mode="fan_in" if transposed else "fan_out", nonlinearity="relu",
                                generator=generator)
    else:
        module.reset_parameters()


class _Measured(Exception):
    """Raised by lsuv_'s hook once the layer it calibrates has run: the rest of the pass is not needed."""


@torch.no_grad()
def lsuv_(model: nn.Module, x: torch.Tensor, tol: float = 0.1, max_iter: int = 10,
          filter: LayerFilter = None) -> list[float]:
    """Layer-sequential unit variance (Mishkin & Matas 2016; docs/METHOD-NOTES.md, LSUV): scale
    each weight layer of ``model`` (:mod:`orthomod.weights`; ``filter`` narrows them), in the
    order they run on ``x``, by ``1 / sqrt(Var)`` of its output over the batch until that
    variance is within ``tol`` of 1, at most ``max_iter`` times per layer. Only the scale of each
    weight changes (start from orthonormal init, as the paper does); biases are left alone.

    The passes run in training mode (BN on batch statistics, as training starts); the model's
    mode and every buffer (BN's running statistics) are restored after. Returns each calibrated
    layer's output variance at the end, in forward order; a layer still outside the tolerance
    after ``max_iter`` scalings is named in a warning, a layer ``x`` never reaches in an error.
    A layer that runs more than once in a forward pass has one weight: it is measured and
    scaled at its first call, and its later calls see the scaled weight; a weight held by
    several layers (tied) is scaled once, for the first of them.

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> variances = lsuv_(init_model_(net, "orthonormal"), 5 * torch.randn(16, 3, 12, 12))
        >>> all(abs(v - 1) < 0.1 for v in variances)
        True
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"lsuv_ needs a floating-point batch of inputs, got {type(x).__name__}"
                        + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if not (tol > 0 and max_iter >= 1):
        raise ValueError(f"lsuv_ needs tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    named = weight_layers(model, filter, user="lsuv_")
    named = distinct_weights(named, "lsuv_")  # a shared weight is scaled once, at its first layer
    if not named:
        raise ValueError("lsuv_ found no weight layers in the model" + (" that the filter accepts" if filter else ""))
    weights = {id(m): plain_weight(name, m, "lsuv_") for name, m in named}
    order: list[nn.Module] = []
    target: list[nn.Module | None] = [None]
    variance: list[float] = [math.nan]

    def hook(module, inputs, output):
        if module not in order:
            order.append(module)
        if module is target[0]:
            out = output.detach()
            variance[0] = float(out.to(torch.promote_types(out.dtype, torch.float32)).var())  # bf16 in float32
            raise _Measured

    was_training = model.training
    buffers = [(b, b.clone()) for b in model.buffers()]
    handles = [m.register_forward_hook(hook) for _, m in named]
    try:
        model.train()
        model(x)  # the forward order
        missing = [name for name, m in named if m not in order]
        if missing:
            raise ValueError(f"lsuv_: the batch never reaches weight layer(s) {', '.join(missing)}; pass filter= "
                             "to leave them out")
        names = {id(m): name for name, m in named}
        result, unsettled = [], []
        for layer in order:
            target[0] = layer
            for i in range(max_iter + 1):
                try:
                    model(x)
                except _Measured:
                    pass
                v = variance[0]
                if not (v > 0 and math.isfinite(v)):
                    raise ValueError(f"lsuv_: layer {names[id(layer)]!r} has output variance {v} on this batch: "
                                     "nothing to scale (a dead or diverging layer)")
                if abs(v - 1) < tol or i == max_iter:
                    break
                weights[id(layer)].mul_(1 / math.sqrt(v))
            result.append(v)
            if abs(v - 1) >= tol:
                unsettled.append(f"{names[id(layer)]} ({v:.3g})")
        if unsettled:
            warnings.warn(f"lsuv_: output variance still outside 1 +- {tol} after {max_iter} scalings: "
                          f"{', '.join(unsettled)}", stacklevel=2)
        return result
    finally:
        for h in handles:
            h.remove()
        for b, saved in buffers:
            b.copy_(saved)
        model.train(was_training)


def _init_identity_like(name: str, conv: nn.Module, scheme: str, generator: torch.Generator | None) -> None:
    if getattr(conv, "groups", 1) != 1:
        raise ValueError(f"init {scheme!r} is defined for ungrouped convs; layer {name!r} has groups={conv.groups}")
    # a transposed conv in its output-filter view (C_out, C_in, k...): the same map at the centre tap
    weight = conv.weight.transpose(0, 1) if geometry(conv)[1] else conv.weight
    try:
        if scheme == "dirac":
            with torch.no_grad():
                weight.copy_(dirac_delta(tuple(weight.shape), weight.dtype))
        else:
            delta_orthogonal_(weight, generator=generator)
    except ValueError as exc:
        raise ValueError(f"init {scheme!r} cannot initialize layer {name!r}: {exc}") from None
