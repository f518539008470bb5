"""Exact block curvature-matrix products: ``GGNMP``, ``HMP``, ``PCHMP``.

After ``loss.backward()`` inside ``backprop(HMP())``, every trainable parameter
``p`` (shape ``S``) of a supported module has ``p.hmp``, a function
``V [K, *S] -> [K, *S]`` that multiplies each slice ``V[k]`` with the exact
block of the batch loss's Hessian for ``p`` (``p.ggnmp``: GGN, ``p.pchmp``: PCH),
for any batch size. With ``z_n = f(x_n, p)`` the module's output for sample
``n`` and ``J_{p,n} = dz_n/dp``:

    ``H_pp V = sum_n J_{p,n}^T H_{z_n} J_{p,n} V  (+ sum_n sum_k d2z_{n,k}/dp2 dz_{n,k} V)``

(eq. 7 of the paper for a parameter; the last term vanishes for modules linear
in their parameters: Linear, convolutions). ``H_{z_n}`` is applied by the
backpropagated operator :class:`~hbpkit.extensions.messages.OutputCurvature`,
``H_{x_n} m = J_n^T H_{z_n} J_n m + r_n * m`` down from the loss Hessian, with
the residual ``r_n = phi''(x_n) * dz_n`` of every elementwise module (S.9):
kept (HMP), dropped (GGNMP), or replaced per sample by ``|r_n|`` /
``max(r_n, 0)`` (``PCHMP(modify="abs" | "clip")``, Chen et al. 2018). BackPACK
1.7.1 modifies the batch-summed residual instead: the two agree at ``N = 1``.

Nothing is densified: a product costs two Jacobian-vector products per module
between ``p`` and the loss (``K`` columns at once). The functions keep the
forward data of the calls they use (see :meth:`ModuleCall.keep`) and the
*current* parameter values: call them before the parameters change. They are
freed when the attributes are deleted or overwritten.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hbpkit.collectives import ProductAllReduce
from hbpkit.core.calls import ModuleCall
from hbpkit.extensions.base import check_choice
from hbpkit.extensions.graph_curvature import GraphCurvature
from hbpkit.extensions.messages import OutputCurvature, ProductMessage
from hbpkit.extensions.second_order import SecondOrder
from hbpkit.modules.base import ModuleRules

MODIFY = ("abs", "clip")


class BlockProduct:
    """``V [K, *S] -> [K, *S]``: the exact curvature block of one parameter times ``V``.

    ``J_p^T H_z J_p V`` summed over samples (plus the parameter residual for
    modules nonlinear in their parameters), see the module docstring.
    """

    __slots__ = ("rules", "call", "name", "shape", "output_curvature", "grad_output", "curvature")

    def __init__(
        self,
        rules: ModuleRules,
        call: ModuleCall,
        name: str,
        shape: torch.Size,
        output_curvature: OutputCurvature,
        grad_output: Tensor | None,
        curvature: str = "hessian",
    ) -> None:
        self.curvature = curvature
        self.rules = rules
        self.call = call
        self.name = name
        self.shape = shape
        self.output_curvature = output_curvature
        self.grad_output = grad_output
        call.keep()

    def __call__(self, V: Tensor) -> Tensor:
        if V.dim() != len(self.shape) + 1 or V.shape[1:] != self.shape:
            raise ValueError(
                f"expected V of shape [K, {', '.join(map(str, self.shape))}] for the "
                f"{self.name} of {type(self.call.module).__name__}, got {tuple(V.shape)}"
            )
        rules, call, name = self.rules, self.call, self.name
        with torch.no_grad():
            JV = rules.param_jac_mat_prod(call, name, V)  # [K, N, *out]
            out = rules.param_jac_t_mat_prod_sum(call, name, self.output_curvature(JV))
            if self.grad_output is not None:
                out = out + rules.param_residual_mat_prod(
                    call, name, self.grad_output, V, self.curvature
                )
        return out

    def __repr__(self) -> str:
        return (
            f"BlockProduct({type(self.call.module).__name__}.{self.name}, "
            f"shape={tuple(self.shape)})"
        )


class TiedBlockProduct:
    """``V [K, *S] -> [K, *S]``: the exact GGN block of a parameter used by several calls.

    ``J_p = sum_u J_{p,u}`` over its uses ``u`` (the chain rule), so the block is
    ``sum_{u,u'} J_{p,u}^T G_{u,u'} J_{p,u'}`` with ``G_{u,u'}`` the GGN between the uses'
    outputs: one push of every ``J_{p,u'} V`` through the recorded graph at once and the
    cotangents read at every use (:meth:`GraphCurvature.apply`).
    """

    __slots__ = ("uses", "curvature", "shape")

    def __init__(self, uses: list[tuple], shape: torch.Size) -> None:
        self.uses = [(rules, call, name) for rules, call, name, _ in uses]
        graph = uses[0][3]
        self.curvature = GraphCurvature(graph, tuple(call for _, call, _ in self.uses))
        self.shape = shape
        for _, call, _ in self.uses:
            call.keep()

    def __call__(self, V: Tensor) -> Tensor:
        if V.dim() != len(self.shape) + 1 or V.shape[1:] != self.shape:
            raise ValueError(
                f"expected V of shape [K, {', '.join(map(str, self.shape))}] for a parameter "
                f"tied over {len(self.uses)} uses, got {tuple(V.shape)}"
            )
        with torch.no_grad():
            JV = [rules.param_jac_mat_prod(call, name, V) for rules, call, name in self.uses]
            out = 0
            for (rules, call, name), cot in zip(self.uses, self.curvature.apply(JV)):
                out = out + rules.param_jac_t_mat_prod_sum(call, name, cot)
        return out


class _CurvMatProd(SecondOrder):
    """Base of the product extensions: one :class:`BlockProduct` per parameter."""

    message: ProductMessage
    reduction = ProductAllReduce()  # the full block is sum_r w_r C_r: exact

    def required_param_rules(self, rules: ModuleRules) -> list[str]:
        """``J_p V`` and ``sum_n J_p^T M``; the parameter residual for a module nonlinear in
        its parameters unless the curvature is the GGN."""
        needed = ["param_jac_mat_prod", "param_jac_t_mat_prod_sum"]
        if not rules.linear_in_params and self.message.curvature != "ggn":
            needed.append("param_residual_mat_prod")
        return needed

    def param_quantity(
        self,
        rules: ModuleRules,
        call: ModuleCall,
        name: str,
        param: nn.Parameter,
        grad_output: Tensor,
        message: OutputCurvature,
    ) -> BlockProduct:
        # the rules it needs were checked before the pass (required_param_rules)
        curvature = self.message.curvature
        residual = None
        if not rules.linear_in_params and curvature != "ggn":
            residual = grad_output
        # the same operator and residual give the same function: share it (GGN/Hessian/PCH)
        key = ("block_product", name, id(message), residual is not None and curvature)
        if key not in call.cache:
            call.cache[key] = BlockProduct(
                rules, call, name, param.shape, message, residual, curvature
            )
        return call.cache[key]

    # a tied parameter: the GGN block of the sum over its uses (TiedBlockProduct); the
    # Hessian's has mixed second derivatives of a later use in its parameter and its input
    @property
    def combines_tied_uses(self) -> bool:
        return self.message.curvature == "ggn"

    def required_tied_rules(self, rules: ModuleRules) -> list[str]:
        return ["param_jac_mat_prod", "param_jac_t_mat_prod_sum"]

    def tied_contribution(self, rules, call, name, grad_output, factors=None) -> tuple:
        return rules, call, name, factors  # factors: the pass's ProductGraph

    def combine_tied(self, contributions: list[tuple]) -> TiedBlockProduct:
        rules, call, name, _ = contributions[0]
        shape = dict(call.module.named_parameters())[name].shape
        return TiedBlockProduct(contributions, shape)


class GGNMP(_CurvMatProd):
    """Exact GGN block products, ``p.ggnmp``: ``V [K, *p.shape] -> [K, *p.shape]``.

    ``sum_n J_{p,n}^T G_{z_n} J_{p,n} V`` with ``G`` backpropagated without residuals.
    """

    savefield = "ggnmp"
    message = ProductMessage("ggn")


class HMP(_CurvMatProd):
    """Exact Hessian block products, ``p.hmp``: ``V [K, *p.shape] -> [K, *p.shape]``.

    ``sum_n J_{p,n}^T H_{z_n} J_{p,n} V``, residuals of eq. 7 / S.9 kept.
    """

    savefield = "hmp"
    message = ProductMessage("hessian")


class PCHMP(_CurvMatProd):
    """Exact positive-curvature Hessian (PCH) block products, ``p.pchmp``.

    ``V [K, *p.shape] -> [K, *p.shape]``; each sample's residual
    ``phi''(x_n) * dz_n`` (S.9) replaced by its absolute value (``modify="abs"``)
    or positive part (``modify="clip"``, the default as in BackPACK).
    """

    savefield = "pchmp"

    def __init__(self, modify: str = "clip") -> None:
        self.modify = check_choice("modify", modify, MODIFY)
        self.message = ProductMessage(f"pch-{modify}")

    def __repr__(self) -> str:
        return f"PCHMP(modify={self.modify!r})"
