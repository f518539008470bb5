"""Brute-force reference quantities, built only on ``torch.autograd``.

Nothing here imports hbpkit: every helper is an independent definition that the
tests compare hbpkit against. All helpers are meant for tiny float64 models
(they form dense matrices and loop over entries).

Notation: ``N`` batch size, ``P`` number of entries of one parameter, ``O`` number
of entries of one sample's network output. A parameter "block" is indexed like
``p.flatten()`` (row-major), so for a weight ``[out, in]`` a Kronecker
approximation ``torch.kron(G [out, out], A [in, in])`` lives in the same basis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


# --------------------------------------------------------------------------- basics
def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate the flattened tensors: ``[sum_i t_i.numel()]``."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _grad(out: Tensor, inputs: Sequence[Tensor], **kwargs) -> list[Tensor]:
    """``torch.autograd.grad`` with zeros instead of ``None`` for unused inputs."""
    batched = kwargs.get("is_grads_batched", False)
    if not out.requires_grad:
        assert not batched
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(out, list(inputs), allow_unused=True, **kwargs)
    K = len(kwargs["grad_outputs"]) if batched else None
    return [
        (x.new_zeros(K, *x.shape) if batched else torch.zeros_like(x)) if g is None else g
        for x, g in zip(inputs, grads)
    ]


def jacobian(output: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """Dense Jacobian of ``output`` w.r.t. ``inputs`` through the existing graph.

    Returns ``[output.numel(), sum_i inputs[i].numel()]`` (row-major in both).
    The graph is retained.
    """
    flat_out = output.reshape(-1)
    rows = [flatten(_grad(flat_out[k], inputs, retain_graph=True)) for k in range(flat_out.numel())]
    return torch.stack(rows)


def hessian(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Exact Hessian of the scalar ``loss`` w.r.t. ``params`` (double backward).

    Returns ``[P, P]`` with ``P = sum_i params[i].numel()``, indexed like
    ``flatten(params)``. The graph is retained.
    """
    g = flatten(_grad(loss, params, create_graph=True, retain_graph=True))
    if not g.requires_grad:
        return torch.zeros(g.numel(), g.numel(), dtype=g.dtype)
    try:  # all rows in one vectorised backward pass
        eye = torch.eye(g.numel(), dtype=g.dtype)
        return flatten_rows(
            _grad(g, params, grad_outputs=eye, retain_graph=True, is_grads_batched=True)
        )
    except RuntimeError:  # an operation without a batching rule: one row at a time
        rows = [flatten(_grad(g[i], params, retain_graph=True)) for i in range(g.numel())]
        return torch.stack(rows)


def flatten_rows(tensors: Sequence[Tensor]) -> Tensor:
    """``[K, *shape_i]`` tensors -> ``[K, sum_i prod(shape_i)]``."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def blocks(matrix: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """The diagonal blocks of a ``[P, P]`` matrix, one ``[p.numel(), p.numel()]`` per param."""
    out, start = [], 0
    for p in params:
        stop = start + p.numel()
        out.append(matrix[start:stop, start:stop])
        start = stop
    return out


def loss_hessian_wrt_output(loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """Hessian of ``loss_fn(output, target)`` w.r.t. the output: ``[N*O, N*O]``."""
    out = output.detach().clone().requires_grad_(True)
    return hessian(loss_fn(out, target), [out])


# --------------------------------------------------------------------------- curvature
def ggn(output: Tensor, loss_fn: nn.Module, target: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Exact generalised Gauss-Newton ``J^T H_loss J`` of the loss as reduced.

    Args:
        output: the network output ``[N, *O]`` (carrying its graph to ``params``).
        loss_fn: the (reduced) loss module; ``loss = loss_fn(output, target)``.
    Returns:
        ``[P, P]``, ``J = d output / d params`` dense ``[N*O, P]``, ``H_loss``
        the Hessian of the loss w.r.t. the whole output ``[N*O, N*O]`` (block
        diagonal over samples, so this is ``sum_n J_n^T H_n J_n``).
    """
    J = jacobian(output, params)
    H = loss_hessian_wrt_output(loss_fn, output, target)
    return J.T @ H @ J


def output_hessian_blocks(loss_fn: nn.Module, output: Tensor, target: Tensor) -> list[Tensor]:
    """``[H_1, ..., H_N]``: the Hessian of the reduced loss w.r.t. each sample's output.

    The diagonal ``[O, O]`` blocks of :func:`loss_hessian_wrt_output` (the loss is a
    sum over samples, so the off-diagonal blocks vanish).
    """
    N, O = output.shape[0], output[0].numel()
    H = loss_hessian_wrt_output(loss_fn, output, target)
    return [H[n * O : (n + 1) * O, n * O : (n + 1) * O] for n in range(N)]


def per_sample_loss_terms(loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """The ``N`` terms ``L = sum_n t_n`` of the reduced loss, through ``output``'s graph.

    For ``reduction='mean'`` the unreduced loss (``reduction='none'``, shape
    ``[N, ...]``) is divided by its number of entries (``N`` for
    ``CrossEntropyLoss``, ``N*D`` for ``MSELoss`` on ``[N, D]``), which is what
    the module's mean does. Returns ``[N]``.
    """
    unreduced = type(loss_fn)(reduction="none")(output, target)
    terms = unreduced.reshape(output.shape[0], -1).sum(1)
    if loss_fn.reduction == "mean":
        terms = terms / unreduced.numel()
    return terms


def per_sample_grads_from_graph(
    output: Tensor, loss_fn: nn.Module, target: Tensor, params: Sequence[Tensor]
) -> list[Tensor]:
    """Per-sample gradients ``d t_n / d p`` through the existing forward graph.

    Use this when a second forward pass would differ (``Dropout`` in train mode).
    Returns one ``[N, *p.shape]`` tensor per parameter.
    """
    terms = per_sample_loss_terms(loss_fn, output, target)
    loss = loss_fn(output, target)
    assert torch.allclose(terms.sum(), loss, rtol=1e-12, atol=1e-12), "reference bug"
    per = [_grad(t, params, retain_graph=True) for t in terms]
    return [torch.stack([g[i] for g in per]) for i in range(len(params))]


def per_sample_grads_loop(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, params: Sequence[Tensor]
) -> list[Tensor]:
    """Per-sample gradients by one forward/backward per sample.

    The n-th term of a ``mean``-reduced loss is ``loss_fn(f(x_n), y_n) / N``
    (the module's mean over one sample's entries, divided by ``N``); for ``sum``
    it is ``loss_fn(f(x_n), y_n)``. Returns one ``[N, *p.shape]`` per parameter.
    """
    N = X.shape[0]
    scale = 1.0 / N if loss_fn.reduction == "mean" else 1.0
    per = [_grad(loss_fn(model(X[n : n + 1]), y[n : n + 1]) * scale, params) for n in range(N)]
    return [torch.stack([g[i] for g in per]) for i in range(len(params))]


# --------------------------------------------------------------------------- chains
# The helpers below walk an ``nn.Sequential`` whose layers act on each sample
# independently, keeping every layer's input and output.
def forward_trace(model: nn.Sequential, X: Tensor) -> list[Tensor]:
    """``[x_0 = X, x_1, ..., x_L]``: the input of every layer, then the output."""
    xs = [X]
    for layer in model:
        xs.append(layer(xs[-1]))
    return xs


def elementwise_second_derivative(layer: nn.Module, x: Tensor) -> Tensor:
    """``phi''(x)`` of an elementwise activation, by double backward (``x.shape``)."""
    x = x.detach().clone().requires_grad_(True)
    # clone(): the layer might act in place
    (d1,) = _grad(layer(x.clone()).sum(), [x], create_graph=True)
    (d2,) = _grad(d1.sum(), [x])
    return d2


def is_elementwise(layer: nn.Module) -> bool:
    """Layers treated as elementwise activations by :func:`modified_hessian`."""
    return not isinstance(layer, (nn.Linear, nn.Flatten, nn.Identity, nn.Dropout)) and not list(
        layer.parameters()
    )


MODIFY: dict[str, Callable[[Tensor], Tensor]] = {
    "ggn": lambda r: torch.zeros_like(r),
    "hessian": lambda r: r,
    "pch-abs": torch.abs,
    "pch-clip": lambda r: r.clamp(min=0),
}
"""How each HBP curvature option treats an activation's residual ``phi''(x) * dL/dz``."""


def modified_hessian(
    model: nn.Sequential,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    params: Sequence[Tensor],
    curvature: str,
) -> Tensor:
    """Loss Hessian w.r.t. ``params`` with every activation residual modified.

    ``J_out^T H_loss J_out + sum_k J_k^T diag(m(phi_k''(x_k) * dL/dz_k)) J_k`` with
    ``x_k``/``z_k`` input/output of the k-th elementwise activation, ``J_k = dx_k/dparams``
    (all samples stacked) and ``m`` from :data:`MODIFY`. For a chain of Linear
    layers and elementwise activations, ``m = id`` gives the exact Hessian (any
    batch size), ``m = 0`` the GGN, ``abs``/``clip`` the positive-curvature
    Hessian (PCH) of Chen et al. 2018. Returns ``[P, P]``; only its diagonal
    parameter blocks are meaningful: the off-diagonal blocks lack the terms of
    the bilinear ``W x`` (``d2 z / dW dx != 0``), which a block-diagonal method
    never needs (within one block ``z`` is linear in ``W``).
    """
    xs = forward_trace(model, X)
    out = xs[-1]
    result = ggn(out, loss_fn, y, params)
    loss = loss_fn(out, y)
    for k, layer in enumerate(model):
        if not is_elementwise(layer):
            continue
        (dL_dz,) = _grad(loss, [xs[k + 1]], retain_graph=True)
        residual = MODIFY[curvature](elementwise_second_derivative(layer, xs[k]) * dL_dz).reshape(
            -1
        )
        if not residual.any():
            continue
        J = jacobian(xs[k], params)
        result = result + J.T @ (residual[:, None] * J)
    return result


def layer_jacobians(layer: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """Per-sample Jacobians of a layer's output ``z`` w.r.t. its input ``x``, ``[N, out, in]``.

    ``out``/``in``: one sample's output/input entries (flattened). Evaluated
    again at ``x``, except for ``Dropout`` in train mode, whose Jacobian is
    ``diag(z / x)`` (the mask of the forward pass that produced ``z``).
    """
    x = x.detach()
    if isinstance(layer, nn.Dropout) and layer.training:
        return torch.diag_embed((z.detach() / x).flatten(1))
    rows = []
    for n in range(x.shape[0]):
        xn = x[n : n + 1]
        J = torch.autograd.functional.jacobian(lambda v: layer(v.clone()), xn)
        rows.append(J.reshape(J.numel() // xn.numel(), xn.numel()))
    return torch.stack(rows)


def _linear_layers(
    model: nn.Sequential, loss_fn: nn.Module, X: Tensor, y: Tensor, xs: list[Tensor] | None = None
) -> tuple[Tensor, list[Tensor], list[tuple[nn.Linear, Tensor, Tensor]]]:
    """``(out, H_n, [(layer, z, x), ...])``: the output ``[N, O]``, the per-sample Hessians
    of :func:`output_hessian_blocks`, and for every Linear layer its output ``z`` (in the
    graph of ``out``) and its detached input ``x``. ``xs``: a :func:`forward_trace` to use."""
    xs = forward_trace(model, X) if xs is None else xs
    out = xs[-1]
    H_n = output_hessian_blocks(loss_fn, out, y)
    linears = [
        (layer, xs[k + 1], xs[k].detach())
        for k, layer in enumerate(model)
        if isinstance(layer, nn.Linear)
    ]
    return out, H_n, linears


def kron_factors_sqrt(
    model: nn.Sequential, loss_fn: nn.Module, X: Tensor, y: Tensor, xs: list[Tensor] | None = None
) -> dict[nn.Parameter, tuple[Tensor, ...]]:
    """KFLR's factors by definition (per-sample backpropagation, exact loss Hessian).

    For every Linear layer ``z = W x + b`` on ``[N, D]`` inputs:
    ``G = sum_n J_n^T H_n J_n`` with ``J_n = d f(x_n) / d z_n`` (``[O, out]``) and
    ``H_n`` the Hessian of the reduced loss w.r.t. sample n's output;
    ``A = 1/N sum_n x_n x_n^T``. Weight -> ``(G, A)``, bias -> ``(G,)``.
    ``xs``: a :func:`forward_trace` to use instead of a new forward pass.
    """
    out, H_n, linears = _linear_layers(model, loss_fn, X, y, xs)
    N, O = X.shape[0], out[0].numel()
    result = {}
    for layer, z, x in linears:
        J = jacobian(out, [z]).reshape(N, O, N, -1)  # d out_n / d z_m
        G = sum(J[n, :, n].T @ H_n[n] @ J[n, :, n] for n in range(N))
        A = x.T @ x / N
        result[layer.weight] = (G, A)
        if layer.bias is not None:
            result[layer.bias] = (G,)
    return result


def modified_hessian_wrt(
    xs: list[Tensor], model: nn.Sequential, loss_fn: nn.Module, y: Tensor, k: int, curvature: str
) -> Tensor:
    """Like :func:`modified_hessian`, w.r.t. the output ``z = xs[k + 1]`` of layer ``k``.

    ``xs``: a :func:`forward_trace`. Returns ``[N*D, N*D]`` (``D`` entries of one
    sample's ``z``); block diagonal over samples. With ``curvature="hessian"`` it
    is the Hessian of the loss w.r.t. ``z``.
    """
    out, z = xs[-1], xs[k + 1]
    J = jacobian(out, [z])
    result = J.T @ loss_hessian_wrt_output(loss_fn, out, y) @ J
    loss = loss_fn(out, y)
    for j in range(k + 1, len(model)):
        if not is_elementwise(model[j]):
            continue
        (dL_dz,) = _grad(loss, [xs[j + 1]], retain_graph=True)
        r = MODIFY[curvature](elementwise_second_derivative(model[j], xs[j]) * dL_dz).reshape(-1)
        Jj = jacobian(xs[j], [z])
        result = result + Jj.T @ (r[:, None] * Jj)
    return result


def kron_factors_sqrt_curvature(
    model: nn.Sequential, loss_fn: nn.Module, X: Tensor, y: Tensor, curvature: str
) -> dict[nn.Parameter, tuple[Tensor, ...]]:
    """``HBP(curvature, "exact", "sqrt")`` by definition, any batch size.

    Per-sample backpropagation of the exact loss Hessian (with every residual
    modified per sample, :data:`MODIFY`) gives, at the output ``z`` of a Linear
    layer, sample n's curvature ``M_n`` of the loss w.r.t. ``z_n``:
    ``G = sum_n M_n`` (the diagonal blocks of :func:`modified_hessian_wrt`),
    ``A = 1/N sum_n x_n x_n^T``. ``curvature="ggn"`` is KFLR.
    """
    xs = forward_trace(model, X)
    N = X.shape[0]
    result = {}
    for k, layer in enumerate(model):
        if not isinstance(layer, nn.Linear):
            continue
        M = modified_hessian_wrt(xs, model, loss_fn, y, k, curvature)
        D = M.shape[0] // N
        G = sum(M[n * D : (n + 1) * D, n * D : (n + 1) * D] for n in range(N))
        x = xs[k].detach()
        result[layer.weight] = (G, x.T @ x / N)
        if layer.bias is not None:
            result[layer.bias] = (G,)
    return result


def kron_factors_batch_average(
    model: nn.Sequential,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    curvature: str = "ggn",
    xs: list[Tensor] | None = None,
) -> dict[nn.Parameter, tuple[Tensor, ...]]:
    """The batch-average recursion of approximation (9), S.11 (KFRA, ``HBP(., "average", ...)``).

    Start at the output with ``H_z = sum_n d2L / dz_n dz_n``; through every layer
    ``H_x = mean_n(J_n^T H_z J_n) + sum_n m(diag(phi''(x_n) * dL/dz_n))``
    (the residual only for elementwise activations, ``m`` from :data:`MODIFY`).
    A Linear layer gets ``(H_z, 1/N sum_n x_n x_n^T)`` for its weight and
    ``(H_z,)`` for its bias, ``H_z`` taken at the layer output. Layers on
    ``[N, D]`` only (no weight sharing). ``xs``: as in :func:`kron_factors_sqrt`.
    """
    xs = forward_trace(model, X) if xs is None else xs
    out = xs[-1]
    N = X.shape[0]
    Hz = sum(output_hessian_blocks(loss_fn, out, y))
    loss = loss_fn(out, y)
    result = {}
    for k in reversed(range(len(model))):
        layer, x = model[k], xs[k]
        if isinstance(layer, nn.Linear):
            assert x.dim() == 2, "no weight sharing here"
            xd = x.detach()
            result[layer.weight] = (Hz, xd.T @ xd / N)
            if layer.bias is not None:
                result[layer.bias] = (Hz,)
        Jn = layer_jacobians(layer, x, xs[k + 1])  # [N, out, in]
        Hx = torch.einsum("noi,op,npj->ij", Jn, Hz, Jn) / N
        if is_elementwise(layer):
            (dL_dz,) = _grad(loss, [xs[k + 1]], retain_graph=True)
            r = elementwise_second_derivative(layer, x) * dL_dz  # [N, *]
            Hx = Hx + torch.diag(MODIFY[curvature](r.reshape(N, -1)).sum(0))
        Hz = Hx
    return result


def kron_factors_weight_sharing(
    model: nn.Sequential, loss_fn: nn.Module, X: Tensor, y: Tensor, approx: str
) -> dict[nn.Parameter, Tensor]:
    """``kron(G, A)`` of KFLR for Linear layers on ``[N, T, D]`` (Eschenhagen et al. 2023).

    With ``J_{n,t} = d f(x_n) / d z_{n,t}`` (``[O, out]``), ``x_{n,t}`` the layer
    input at position ``t``:

    * ``"expand"`` (each position is a sample): ``G = sum_{n,t} J_{n,t}^T H_n J_{n,t}``,
      ``A = 1/(N T) sum_{n,t} x_{n,t} x_{n,t}^T``;
    * ``"reduce"``: ``G = sum_n (sum_t J_{n,t})^T H_n (sum_t J_{n,t})``,
      ``A = 1/N sum_n xbar_n xbar_n^T`` with ``xbar_n = 1/T sum_t x_{n,t}``.

    Only ``kron(G, A)`` is returned (how the scale is split between the two
    factors is a convention). Maps weight -> ``kron(G, A)``, bias -> ``G``
    (the bias's ``A`` is the scalar 1).
    """
    out, H_n, linears = _linear_layers(model, loss_fn, X, y)
    N, O = X.shape[0], out[0].numel()
    result = {}
    for layer, z, x in linears:
        if x.dim() == 2:  # no weight sharing: T = 1
            x = x[:, None]
        T, D_out = x.shape[1], z.shape[-1]
        J = jacobian(out, [z]).reshape(N, O, N, T, D_out)
        if approx == "expand":
            G = sum(J[n, :, n, t].T @ H_n[n] @ J[n, :, n, t] for n in range(N) for t in range(T))
            xf = x.reshape(N * T, -1)
            A = xf.T @ xf / (N * T)
        elif approx == "reduce":
            G = sum(J[n, :, n].sum(1).T @ H_n[n] @ J[n, :, n].sum(1) for n in range(N))
            xbar = x.mean(1)
            A = xbar.T @ xbar / N
        else:
            raise ValueError(approx)
        result[layer.weight] = torch.kron(G, A)
        if layer.bias is not None:
            # bias: A = 1 for "expand" per position; with "reduce" xbar of the constant 1 is 1
            result[layer.bias] = G
    return result
