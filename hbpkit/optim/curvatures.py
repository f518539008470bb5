"""Which hbpkit extension an optimizer's ``curvature`` option needs, and where it lands.

The extension classes are looked up in :mod:`hbpkit.extensions` only when an
optimizer's ``.extensions`` is first read, so importing :mod:`hbpkit.optim` never
depends on which extensions exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor


class CurvatureSpec(NamedTuple):
    """Which extension an optimizer's ``curvature`` option needs, and what the step reads.

    The savefield is the extension's own (``savefield`` of its class): the extension
    owns where its quantity lands, the optimizer only names the extension.
    """

    extension: str  # class name in hbpkit.extensions
    kwargs: dict[str, Any]
    kronecker: bool  # a KroneckerFactors result (else: a product function V -> C V)

    @property
    def extension_class(self) -> type:
        """The extension class in :mod:`hbpkit.extensions` (looked up when first needed)."""
        import hbpkit.extensions as extensions

        cls = getattr(extensions, self.extension, None)
        if cls is None:
            raise RuntimeError(
                f"the curvature option needs hbpkit.extensions.{self.extension}, which this "
                "version of hbpkit does not provide"
            )
        return cls

    @property
    def savefield(self) -> str:
        """Where the extension attaches its quantity: what the step reads."""
        return self.extension_class.savefield


CURVATURES: dict[str, CurvatureSpec] = {
    "ggn": CurvatureSpec("GGNMP", {}, False),
    "hessian": CurvatureSpec("HMP", {}, False),
    "pch-abs": CurvatureSpec("PCHMP", {"modify": "abs"}, False),
    "pch-clip": CurvatureSpec("PCHMP", {"modify": "clip"}, False),
    "kfac": CurvatureSpec("KFAC", {}, True),
    "kflr": CurvatureSpec("KFLR", {}, True),
    "kfra": CurvatureSpec("KFRA", {}, True),
    "hbp": CurvatureSpec("HBP", {}, True),
    "empirical": CurvatureSpec("EmpiricalKFAC", {}, True),
}

KRONECKER_CURVATURES = tuple(name for name, spec in CURVATURES.items() if spec.kronecker)


def curvature_spec(curvature: str, choices: tuple[str, ...]) -> CurvatureSpec:
    """The spec of ``curvature``, or ``ValueError`` listing ``choices``."""
    if curvature not in choices:
        raise ValueError(f"curvature={curvature!r} is not one of {choices}")
    return CURVATURES[curvature]


def check_extension(extension: Any, spec: CurvatureSpec, curvature: str) -> None:
    """A user-given extension must write the savefield the step reads."""
    if extension is None:
        return
    if getattr(extension, "savefield", None) != spec.savefield:
        raise ValueError(
            f"curvature={curvature!r} reads p.{spec.savefield}, but extension={extension!r} "
            f"writes p.{getattr(extension, 'savefield', None)}"
        )


def build_extension(spec: CurvatureSpec, curvature: str) -> Any:
    """An instance of the default extension for ``curvature``."""
    return spec.extension_class(**spec.kwargs)


def loss_of(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """The loss ``closure()`` returns, with gradients enabled (steps run under ``no_grad``)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def iter_quantities(
    param_groups: list[dict], savefield: str, groups: Callable[[dict], bool] = lambda g: True
) -> Iterator[tuple[dict, Tensor, Any]]:
    """``(group, p, p.<savefield>)`` for every parameter with a gradient (in the chosen
    ``groups``), one at a time; the :func:`missing_quantity` error where one lacks it."""
    for g_idx, group in enumerate(param_groups):
        if not groups(group):
            continue
        for p_idx, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            value = getattr(p, savefield, None)
            if value is None:
                name = f"{p_idx} of group {g_idx} (shape {tuple(p.shape)})"
                raise missing_quantity(name, savefield)
            yield group, p, value


def with_quantities(
    param_groups: list[dict], savefield: str, groups: Callable[[dict], bool] = lambda g: True
) -> list[tuple[dict, Tensor, Any]]:
    """All of :func:`iter_quantities` read first: the :func:`missing_quantity` error comes
    before anything moves."""
    return list(iter_quantities(param_groups, savefield, groups))


def heavy_ball(state: dict, d: Tensor, momentum: float) -> Tensor:
    """The direction after heavy-ball momentum: ``buf <- momentum * buf + d`` (``buf = d`` on
    the first step, kept in ``state["momentum_buffer"]``); ``d`` itself where ``momentum == 0``."""
    if momentum == 0:
        return d
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = d.clone()
    else:
        buf.mul_(momentum).add_(d)
    return buf


def missing_quantity(param_name: str, savefield: str) -> RuntimeError:
    """The error for a parameter with a gradient but without its curvature quantity."""
    return RuntimeError(
        f"parameter {param_name} has a gradient but no p.{savefield}: run the backward pass "
        "inside `with backprop(*opt.extensions): loss.backward()` before opt.step()"
    )


def missing_g_bar(p: Tensor, needed_by: str) -> RuntimeError:
    """The error for Kronecker roots without ``g_bar`` where ``needed_by`` uses them."""
    return RuntimeError(
        f"the parameter of shape {tuple(p.shape)} has p.kronecker_roots without g_bar, which "
        f"{needed_by} needs: run the backward pass inside `with backprop(*opt.extensions)`"
    )


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that read what an hbpkit extension attaches.

    Subclasses call :meth:`_setup` in ``__init__`` and check each parameter
    group's hyperparameters in :meth:`_check_group`.
    """

    def _setup(
        self, params: Any, curvature: str, choices: tuple[str, ...], extension: Any, defaults: dict
    ) -> None:
        self.curvature_spec = curvature_spec(curvature, choices)
        check_extension(extension, self.curvature_spec, curvature)
        self.curvature = curvature
        self._extension = extension
        self._check_group(defaults)
        torch.optim.Optimizer.__init__(self, params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    def _check_group(self, group: dict) -> None:
        """Raise ``ValueError`` for invalid hyperparameters (``lr`` and ``damping`` here)."""
        if group["lr"] < 0:
            raise ValueError(f"lr must be non-negative, got {group['lr']}")
        if group["damping"] < 0:
            raise ValueError(f"damping must be non-negative, got {group['damping']}")

    @property
    def extensions(self) -> tuple:
        """The hbpkit extensions :meth:`step` needs: ``with backprop(*opt.extensions)``."""
        if self._extension is None:
            self._extension = build_extension(self.curvature_spec, self.curvature)
        return (self._extension,)
