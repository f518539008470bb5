"""References by definition (float64) for any zoo model, through ``torch.func``.

Nothing here imports hbpkit. Every quantity is computed from the model's own forward
(``functional_call`` with the parameters as explicit inputs) and the loss as the user
applies it (``ZooCase.criterion``). Notation: ``N`` samples, ``t_n(theta)`` the ``n``-th
term of the batch loss ``L = sum_n t_n`` (for ``mean`` the loss of sample ``n`` alone
divided by ``N``), ``f_n(theta)`` the flattened model output of sample ``n`` (``[O]``),
``J_n = d f_n / d theta_b`` (``[O, P_b]`` for a parameter block ``b``), ``H_n = d^2 t_n /
d f_n^2`` (``[O, O]``). A block is indexed like ``p.flatten()``.

* per-sample gradients: ``d t_n / d theta`` (``vmap`` of ``grad`` over the samples);
* ``.grad``: ``d L / d theta``;
* the GGN of a block: ``G_b = sum_n J_n^T H_n J_n`` (supplement of the HBP paper, eq. S.3
  with the second-order module terms dropped); its diagonal, its products with ``V`` and
  the dense block;
* the Hessian of a block, ``d^2 L / d theta_b^2``: products (reverse-over-reverse) and the
  diagonal (products with the unit vectors, so small blocks only);
* KFLR at batch size 1 for a ``Linear`` layer on ``[1, D]`` inputs that produces the model
  output: ``G = H_1`` (the loss Hessian w.r.t. the layer's output, which is the model
  output) and ``A = a a^T`` (its input, with the trailing one handled by the bias block);
  then ``kron(G, A)`` is the exact GGN block of the weight (``f = W a + b``).

The helpers fall back from ``vmap`` to Python loops where an operation has no batching
rule (e.g. the fused RNN kernels).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo import ZooCase

Params = dict[str, Tensor]


def params_of(model: nn.Module) -> Params:
    """The trainable parameters, detached: ``{name: tensor}`` in ``named_parameters`` order."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _scale(case: ZooCase) -> float:
    return 1.0 / case.batch_size if case.loss_fn.reduction == "mean" else 1.0


def _vmap_or_loop(fn: Callable, *batched: Tensor):
    """``vmap(fn)(*batched)``, or a loop with the results stacked when ``vmap`` fails."""
    try:
        return vmap(fn)(*batched)
    except (RuntimeError, NotImplementedError):
        outs = [fn(*args) for args in zip(*batched)]
        if isinstance(outs[0], dict):
            return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
        return torch.stack(outs)


class Hardsigmoid(nn.Module):
    """``clamp(x + 3, 0, 6) / 6``: ``nn.Hardsigmoid`` with a double backward.

    PyTorch 2.13 has no derivative for ``aten::hardsigmoid_backward``, so a Hessian through
    ``nn.Hardsigmoid`` (MobileNet-V3's squeeze-excitation) fails; this is the same function
    (its second derivative is zero almost everywhere), written with ``clamp``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x + 3, 0, 6) / 6


def twice_differentiable(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.Hardsigmoid`` replaced by :class:`Hardsigmoid`
    (same function, same parameter names)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Hardsigmoid):
                setattr(parent, child_name, Hardsigmoid())
    return model


class BruteForce:
    """The references of one :class:`~zoo.ZooCase`, computed lazily and cached.

    The functional forms run on :func:`twice_differentiable` of the case's model.
    """

    def __init__(self, case: ZooCase) -> None:
        case = dataclasses.replace(case, model=twice_differentiable(case.model))
        self.case = case
        self.theta = params_of(case.model)
        self._jac: list[Params] | None = None
        self._out_hess: list[Tensor] | None = None

    # ---------------------------------------------------------------- functional forms
    def output(self, theta: Params, x: Tensor) -> Tensor:
        """The model output of a batch ``x`` at ``theta``.

        Attention runs on the math kernel of ``F.scaled_dot_product_attention``: the fused
        CPU kernel has no double backward (``aten::_scaled_dot_product_flash_attention_for_cpu
        _backward``), which the Hessian references need.
        """
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(self.case.model, theta, (x,))

    def term(self, theta: Params, x_n: Tensor, y_n: Tensor) -> Tensor:
        """``t_n``: the term of sample ``x_n`` (no batch axis) in the batch loss."""
        c = self.case
        return c.criterion(c.loss_fn, self.output(theta, x_n[None]), y_n[None]) * _scale(c)

    def loss(self, theta: Params) -> Tensor:
        c = self.case
        return c.criterion(c.loss_fn, self.output(theta, c.X), c.y)

    def check_terms(self) -> None:
        """The terms add up to the batch loss (else the per-sample convention is wrong)."""
        c = self.case
        terms = torch.stack([self.term(self.theta, x, y) for x, y in zip(c.X, c.y)])
        torch.testing.assert_close(terms.sum(), self.loss(self.theta), rtol=1e-12, atol=1e-12)

    # ---------------------------------------------------------------- first order
    def gradient(self) -> Params:
        """``d L / d theta``."""
        return grad(self.loss)(self.theta)

    def per_sample_gradients(self) -> Params:
        """``{name: [N, *shape]}``, ``d t_n / d theta``."""
        c = self.case
        return _vmap_or_loop(lambda x, y: grad(self.term)(self.theta, x, y), c.X, c.y)

    # ---------------------------------------------------------------- GGN
    def _per_sample_factors(self) -> tuple[list[Params], list[Tensor]]:
        """``J_n`` (``{name: [O, *shape]}``) and ``H_n`` (``[O, O]``) for every sample."""
        if self._jac is None:
            c = self.case
            self._jac, self._out_hess = [], []
            for x_n, y_n in zip(c.X, c.y):

                def f(theta, x_n=x_n):
                    return self.output(theta, x_n[None]).reshape(-1)

                self._jac.append(_jacobian(f, self.theta))
                shape = self.output(self.theta, x_n[None]).shape
                out = f(self.theta).detach()

                def t(o, y_n=y_n, shape=shape):
                    return c.criterion(c.loss_fn, o.reshape(shape), y_n[None]) * _scale(c)

                self._out_hess.append(torch.func.hessian(t)(out).contiguous())
        return self._jac, self._out_hess

    def ggn_diagonal(self) -> Params:
        """``diag(G_b)`` for every block, shaped like the parameter."""
        J, H = self._per_sample_factors()
        out = {}
        for name, p in self.theta.items():
            out[name] = sum(
                torch.einsum("op,oq,qp->p", J_n[name].flatten(1), H_n, J_n[name].flatten(1))
                for J_n, H_n in zip(J, H)
            ).reshape(p.shape)
        return out

    def ggn_matmul(self, name: str, V: Tensor) -> Tensor:
        """``G_b V`` for ``V`` ``[K, *shape]`` (each slice flattened like the parameter)."""
        J, H = self._per_sample_factors()
        Vf = V.flatten(1).T  # [P, K]
        out = sum(
            J_n[name].flatten(1).T @ (H_n @ (J_n[name].flatten(1) @ Vf)) for J_n, H_n in zip(J, H)
        )
        return out.T.reshape(V.shape)

    def ggn_block(self, name: str) -> Tensor:
        """The dense ``[P_b, P_b]`` GGN block."""
        J, H = self._per_sample_factors()
        return sum(J_n[name].flatten(1).T @ H_n @ J_n[name].flatten(1) for J_n, H_n in zip(J, H))

    # ---------------------------------------------------------------- Hessian
    def hessian_matmul(self, name: str, V: Tensor, chunk: int = 256) -> Tensor:
        """``H_b V`` for ``V`` ``[K, *shape]``, ``H_b = d^2 L / d theta_b^2`` (others fixed)."""

        def loss_of_block(p):
            return self.loss({**self.theta, name: p})

        _, hvp = vjp(grad(loss_of_block), self.theta[name])  # H symmetric: vjp == product
        outs = []
        for start in range(0, V.shape[0], chunk):
            block = V[start : start + chunk]
            try:
                outs.append(vmap(hvp)(block)[0])
            except (RuntimeError, NotImplementedError):
                outs.append(torch.stack([hvp(v)[0] for v in block]))
        return torch.cat(outs)

    def hessian_diagonal(self, name: str) -> Tensor:
        """``diag(H_b)`` from the products with all unit vectors (small blocks only)."""
        p = self.theta[name]
        eye = torch.eye(p.numel(), dtype=p.dtype).reshape(p.numel(), *p.shape)
        return self.hessian_matmul(name, eye).flatten(1).diagonal().reshape(p.shape)

    # ---------------------------------------------------------------- KFLR, batch size 1
    def kflr_output_layer(self, layer_name: str) -> tuple[Tensor, Tensor]:
        """``(G, A)`` of KFLR at batch size 1 for the ``Linear`` whose output is the model's.

        ``G``: the loss Hessian w.r.t. the output (``[out, out]``), ``A = a a^T`` with ``a``
        the layer's input (``[in, in]``). The layer must produce the model output (checked).
        """
        c = self.case
        layer = c.model.get_submodule(layer_name)
        assert isinstance(layer, nn.Linear), layer_name
        assert c.batch_size == 1, "KFLR is exact at batch size 1"
        seen: dict[str, Tensor] = {}
        handle = layer.register_forward_hook(
            lambda m, inp, out: seen.update(a=inp[0].detach(), z=out.detach())
        )
        try:
            with torch.no_grad():
                out = c.model(c.X)
        finally:
            handle.remove()
        torch.testing.assert_close(seen["z"], out, rtol=0, atol=0)
        a = seen["a"].reshape(-1)
        _, H = self._per_sample_factors()
        return H[0], torch.outer(a, a)


def _jacobian(f: Callable[[Params], Tensor], theta: Params) -> Params:
    """``{name: [O, *shape]}``: ``jacrev``, or one ``torch.autograd`` backward per row."""
    try:
        return jacrev(f)(theta)
    except (RuntimeError, NotImplementedError):
        pass
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in theta.items()}
    out = f(leaves)
    rows, inputs = [], list(leaves.values())
    for k in range(out.numel()):
        grads = torch.autograd.grad(out[k], inputs, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)])
    return {n: torch.stack([r[i] for r in rows]) for i, n in enumerate(leaves)}


class BatchBruteForce(BruteForce):
    """The references through the statistics of the batch (a model in train mode whose
    ``BatchNorm`` layers couple the samples): every output depends on every sample.

    The functional forms run on a copy without running statistics (batch statistics, no
    buffer written). ``t_n`` is sample ``n``'s term of the batch loss computed from the
    batch output; per-sample gradients are ``d t_n / d theta`` through the batch map
    (``jacrev`` of the vector of terms). The GGN is ``J^T H J`` with ``J`` the Jacobian of
    the whole batch's flattened output ``[N O, P_b]`` and ``H`` the loss Hessian w.r.t. it
    ``[N O, N O]``; Hessian products as in :class:`BruteForce` (of the batch loss).
    """

    def __init__(self, case: ZooCase) -> None:
        super().__init__(case)
        model = copy.deepcopy(self.case.model)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        self.case = dataclasses.replace(self.case, model=model)
        self._batch: tuple[Params, Tensor] | None = None

    def terms(self, theta: Params) -> Tensor:
        """``[N]``: each sample's term of the batch loss, from the batch output."""
        c = self.case
        out = self.output(theta, c.X)
        return torch.stack(
            [c.criterion(c.loss_fn, out[n : n + 1], c.y[n : n + 1]) for n in range(len(out))]
        ) * _scale(c)

    def check_terms(self) -> None:
        torch.testing.assert_close(
            self.terms(self.theta).sum(), self.loss(self.theta), rtol=1e-12, atol=1e-12
        )

    def per_sample_gradients(self) -> Params:
        return _jacobian(self.terms, self.theta)

    def _batch_factors(self) -> tuple[Params, Tensor]:
        """``J`` (``{name: [N O, *shape]}``) and ``H`` ``[N O, N O]`` of the whole batch."""
        if self._batch is None:
            c = self.case
            out = self.output(self.theta, c.X).detach()
            J = _jacobian(lambda theta: self.output(theta, c.X).reshape(-1), self.theta)
            H = torch.func.hessian(lambda o: c.criterion(c.loss_fn, o.reshape(out.shape), c.y))(
                out.reshape(-1)
            )
            self._batch = (J, H)
        return self._batch

    def ggn_diagonal(self) -> Params:
        J, H = self._batch_factors()
        return {
            name: torch.einsum("op,oq,qp->p", J[name].flatten(1), H, J[name].flatten(1)).reshape(
                p.shape
            )
            for name, p in self.theta.items()
        }

    def ggn_matmul(self, name: str, V: Tensor) -> Tensor:
        J, H = self._batch_factors()
        Jb = J[name].flatten(1)
        return (Jb.T @ (H @ (Jb @ V.flatten(1).T))).T.reshape(V.shape)

    def ggn_block(self, name: str) -> Tensor:
        J, H = self._batch_factors()
        Jb = J[name].flatten(1)
        return Jb.T @ H @ Jb
