"""laplace-torch curvature backends on hbpkit: ``HbpkitGGN`` and ``HbpkitEF``.

``pip install hbpkit[laplace]``; importing this module imports laplace (``import hbpkit``
never does). Use them as any of laplace's backends::

    from laplace import Laplace
    from hbpkit.integrations.laplace import HbpkitGGN

    la = Laplace(model, "classification", hessian_structure="kron", backend=HbpkitGGN)
    la.fit(train_loader)

Conventions (those of laplace's BackPACK and curvlinops backends,
``laplace/curvature/{backpack,curvlinops}.py``):

* the loss is laplace's ``lossfunc``, summed over the batch (``CrossEntropyLoss`` or
  ``MSELoss`` with ``reduction="sum"``), and every curvature and loss is multiplied by
  ``factor`` (``1/2`` for regression, the Gaussian likelihood with unit noise);
* ``kron``: one list per parameter in the order of ``model.parameters()``, ``[G, A]`` for a
  weight (``G`` the output factor, ``A`` the input factor), ``[G]`` for a bias, ``A``
  rescaled by ``M / N`` (batch size over data set size) in place, as laplace's
  ``Kron`` expects; a parameter whose factors are not one ``(G, A)`` pair in ``p.flatten()``
  order (grouped or transposed convolutions, normalization layers) gets its dense block
  ``[B]``;
* ``last_layer=True``: only ``model.last_layer`` (laplace's ``FeatureExtractor``) is
  extended, and its curvature is computed from the features, so the earlier layers
  stay plain PyTorch; ``subnetwork_indices`` select entries of ``jacobians``,
  ``gradients``, ``diag`` and ``full``; inputs may be dicts (``dict_key_x``) where the
  model takes them;
* classification outputs ``[N, *, C]`` are viewed as ``[N *, C]`` before the loss (as the
  BackPACK backend does).

Quantities, one backward pass each: ``jacobians`` (``BatchJacobian``, all outputs at
once), ``gradients`` (``BatchGrad``), GGN ``diag`` (``DiagGGNExact`` / ``DiagGGNMC``),
``kron`` (``KFLR`` / ``KFAC``), ``full`` (``SqrtGGNExact`` / ``SqrtGGNMC``: ``V^T V``);
EF ``diag`` (``SumGradSquared``), ``kron`` (``EmpiricalKFAC``), ``full`` (per-sample
gradients). ``jacobians(x, enable_backprop=True)`` uses laplace's ``torch.func`` path.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils import Kron
from torch import Tensor, nn

from hbpkit.curvature.kronecker import KroneckerFactors
from hbpkit.engine.context import backprop
from hbpkit.engine.extend import extend
from hbpkit.extensions import (
    KFAC,
    KFLR,
    BatchGrad,
    DiagGGNExact,
    DiagGGNMC,
    EmpiricalKFAC,
    SqrtGGNExact,
    SqrtGGNMC,
    SumGradSquared,
)
from hbpkit.integrations.jacobians import batch_jacobian

#: keyword arguments the curvature methods take (laplace passes ``N`` to ``diag`` / ``full``)
_KRON_OPTIONS = ("kfac_approx", "mc_samples")
_FULL_OPTIONS = ("mc_samples",)


class HbpkitInterface(CurvatureInterface):
    """laplace's ``CurvatureInterface`` on hbpkit: Jacobians and per-sample gradients."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        if last_layer and getattr(model, "last_layer", None) is None:
            raise ValueError(
                "last_layer=True needs laplace's FeatureExtractor with its last layer found "
                "(model.last_layer)"
            )
        extend(self._model)
        self.lossfunc = extend(self.lossfunc)

    # forward passes ---------------------------------------------------------------------
    def _output(self, x: Tensor | MutableMapping[str, Any]) -> Tensor:
        """The output whose curvature is taken: the model's, or for ``last_layer`` the last
        layer's on the features (computed without a graph), so only the extended last layer is
        in the graph."""
        if not self.last_layer:
            return self.model(x)
        with torch.no_grad():  # the features are constants: no graph through the body
            _, phi = self.model.forward_with_features(x)
        return self._model(phi)

    def _loss(self, x: Tensor | MutableMapping[str, Any], y: Tensor) -> Tensor:
        f = self._output(x)
        if self.likelihood != "regression":  # [N, *, C] -> [N *, C], as laplace's BackPACK
            f, y = f.view(-1, f.size(-1)), y.view(-1)
        return self.lossfunc(f, y)

    def _run(self, x, y, *extensions) -> Tensor:
        """``lossfunc`` on ``(x, y)``, its backward pass with ``extensions`` (``p.grad`` left
        as it was); returns the loss."""
        loss = self._loss(x, y)
        with backprop(*extensions):
            torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.detach()

    def _collect(self, field: str) -> list[Any]:
        """``p.<field>`` of every parameter in ``self.params``, removed from them."""
        out = []
        for p in self.params:
            if not hasattr(p, field):
                raise RuntimeError(
                    f"hbpkit attached no {field} to the parameter of shape {tuple(p.shape)}: "
                    "it does not reach the loss through extended modules"
                )
            out.append(getattr(p, field))
            delattr(p, field)
        return out

    def _flat(self, values: list[Tensor], start_dim: int) -> Tensor:
        flat = torch.cat([v.flatten(start_dim) for v in values], dim=start_dim)
        if self.subnetwork_indices is not None:
            flat = flat[..., self.subnetwork_indices]
        return flat

    # laplace's interface ------------------------------------------------------------------
    def jacobians(
        self, x: Tensor | MutableMapping[str, Any], enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(Js [N, C, P], f [N, C])`` from one backward pass (``BatchJacobian``);
        ``enable_backprop=True``: laplace's ``torch.func`` Jacobians (differentiable)."""
        if enable_backprop:
            return CurvatureInterface.jacobians(self, x, enable_backprop=True)
        if self.last_layer:
            _, phi = self.model.forward_with_features(x)
            Js, f = batch_jacobian(self._model, phi.detach(), self.params)
        else:
            Js, f = batch_jacobian(self.model, x, self.params)
        if self.subnetwork_indices is not None:
            Js = Js[:, :, self.subnetwork_indices]
        return Js, f

    def selected_output_jacobians(
        self,
        x: Tensor | MutableMapping[str, Any],
        outputs: Tensor,
        enable_backprop: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The Jacobians of the outputs ``outputs`` (``[N]`` or ``[N, S]`` indices) per
        input, ``[N, S, P]``, selected from :meth:`jacobians` (one backward pass)."""
        Js, f = self.jacobians(x, enable_backprop=enable_backprop)
        if outputs.ndim == 1:
            outputs = outputs[:, None]
        if outputs.shape[0] != Js.shape[0]:
            raise ValueError("Output selectors must match the input batch size.")
        index = outputs.to(Js.device, dtype=torch.long).unsqueeze(-1)
        return torch.gather(Js, 1, index.expand(-1, -1, Js.shape[-1])), f

    def gradients(self, x: Tensor | MutableMapping[str, Any], y: Tensor) -> tuple[Tensor, Tensor]:
        """``(Gs [N, P], loss)``: per-sample gradients of ``lossfunc`` (``BatchGrad``)."""
        loss = self._run(x, y, BatchGrad())
        return self._flat(self._collect("grad_batch"), 1), loss


def _check_options(kwargs: dict[str, Any], allowed: tuple[str, ...], method: str) -> None:
    unknown = sorted(set(kwargs) - set(allowed) - {"N"})
    if unknown:
        raise ValueError(
            f"hbpkit's laplace backend: {method}() got unknown options {unknown}; "
            f"it takes {list(allowed)}"
        )


def _kron_entry(factors: KroneckerFactors) -> list[Tensor]:
    """One parameter's entry of laplace's ``Kron``: ``[G, A]`` / ``[G]``, or the dense
    block ``[B]`` where the factors are grouped or transposed (not one pair in
    ``p.flatten()`` order)."""
    if factors.groups > 1 or factors.transposed:
        return [factors.to_dense()]
    return [f.clone() for f in factors]


def _kron(factors: list[KroneckerFactors], M: int, N: int, scale: float) -> Kron:
    """laplace's ``Kron`` with the input factors rescaled by ``M / N`` (the batch's share of
    the data set, laplace's ``_rescale_kron_factors``) and every block by ``scale``."""
    kfacs = [_kron_entry(f) for f in factors]
    for F in kfacs:
        if len(F) == 2:
            F[1] *= M / N
    return Kron(kfacs) * scale


class HbpkitGGN(HbpkitInterface, GGNInterface):
    """The generalized Gauss-Newton (``stochastic=True``: its Monte-Carlo Fisher with
    ``num_samples`` draws) on hbpkit."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        low_rank: int = 10,
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self.stochastic = stochastic
        self.num_samples = num_samples
        self.low_rank = low_rank

    def diag(
        self, x: Tensor | MutableMapping[str, Any], y: Tensor, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``(factor * loss, factor * diag)`` of the GGN ``[P]`` (``DiagGGNExact`` / ``MC``)."""
        _check_options(kwargs, _FULL_OPTIONS, "diag")
        mc = kwargs.get("mc_samples", self.num_samples)
        ext = DiagGGNMC(mc) if self.stochastic else DiagGGNExact()
        loss = self._run(x, y, ext)
        return self.factor * loss, self.factor * self._flat(self._collect(ext.savefield), 0)

    def kron(
        self, x: Tensor | MutableMapping[str, Any], y: Tensor, N: int, **kwargs: Any
    ) -> tuple[Tensor, Kron]:
        """``(factor * loss, Kron)``: ``KFLR`` (``KFAC`` if ``stochastic``) factors, ``A``
        rescaled by ``M / N``, times ``factor``; options ``kfac_approx``, ``mc_samples``."""
        _check_options(kwargs, _KRON_OPTIONS, "kron")
        approx = kwargs.get("kfac_approx", "expand")
        if self.stochastic:
            ext = KFAC(mc_samples=kwargs.get("mc_samples", self.num_samples), kfac_approx=approx)
        else:
            ext = KFLR(kfac_approx=approx)
        loss = self._run(x, y, ext)
        M = len(y)  # laplace's batch size M
        return self.factor * loss, _kron(self._collect(ext.savefield), M, N, self.factor)

    def full(
        self, x: Tensor | MutableMapping[str, Any], y: Tensor, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``(factor * loss, factor * G)``, ``G = V^T V`` ``[P, P]`` from the GGN's sqrt
        factors ``V`` (``SqrtGGNExact``; ``SqrtGGNMC`` with ``mc_samples`` if ``stochastic``),
        cross-layer blocks included."""
        _check_options(kwargs, _FULL_OPTIONS, "full")
        if self.stochastic:
            ext = SqrtGGNMC(kwargs.get("mc_samples", self.num_samples))
        else:
            ext = SqrtGGNExact()
        loss = self._run(x, y, ext)
        V = self._flat(self._collect(ext.savefield), 2).flatten(0, 1)  # [C N, P]
        return self.factor * loss, self.factor * (V.T @ V)

    def eig_lowrank(self, data_loader: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(U [P, k], factor * eigenvalues [k], factor * loss)`` for laplace's
        ``LowRankLaplace``: the top ``low_rank`` eigenpairs of the exact GGN of the whole
        data set (Lanczos over exact GGN products, :class:`hbpkit.operators.GGNOperator`),
        those above laplace's threshold ``1e-6``; the loss summed over the batches."""
        from hbpkit.operators import GGNOperator

        if self.stochastic or self.last_layer or self.subnetwork_indices is not None:
            raise NotImplementedError(
                "HbpkitGGN.eig_lowrank takes the exact GGN of all weights (stochastic=False, "
                "last_layer=False, no subnetwork_indices)"
            )
        batches = [(x, y) for x, y in data_loader]
        operator = GGNOperator(self.model, self.lossfunc, batches, params=self.params)
        values, vectors = operator.eigh_lowrank(min(self.low_rank, operator.shape[0]))
        keep = values > 1e-6  # laplace's EPS for its low-rank backends
        with torch.no_grad():
            loss = sum(self._loss(x, y) for x, y in batches)
        return vectors[:, keep], self.factor * values[keep], self.factor * loss


class HbpkitEF(HbpkitInterface, EFInterface):
    """The empirical Fisher on hbpkit."""

    def diag(
        self, x: Tensor | MutableMapping[str, Any], y: Tensor, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``(factor * loss, factor * sum_n g_n**2)`` (``SumGradSquared``)."""
        _check_options(kwargs, (), "diag")
        loss = self._run(x, y, SumGradSquared())
        return self.factor * loss, self.factor * self._flat(self._collect("sum_grad_squared"), 0)

    def kron(
        self, x: Tensor | MutableMapping[str, Any], y: Tensor, N: int, **kwargs: Any
    ) -> tuple[Tensor, Kron]:
        """``(factor * loss, Kron)`` with the empirical Fisher's ``G = sum g g^T`` of the
        summed loss (``EmpiricalKFAC``), ``A`` rescaled by ``M / N``; option ``kfac_approx``."""
        _check_options(kwargs, ("kfac_approx",), "kron")
        ext = EmpiricalKFAC(kfac_approx=kwargs.get("kfac_approx", "expand"))
        loss = self._run(x, y, ext)
        M = len(y)  # laplace's batch size M
        return self.factor * loss, _kron(self._collect(ext.savefield), M, N, self.factor)

    def full(
        self, x: Tensor | MutableMapping[str, Any], y: Tensor, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``(factor * loss, factor * sum_n g_n g_n^T)`` from the per-sample gradients."""
        _check_options(kwargs, (), "full")
        Gs, loss = self.gradients(x, y)
        return self.factor * loss, self.factor * (Gs.T @ Gs)


__all__ = ["HbpkitEF", "HbpkitGGN", "HbpkitInterface"]
