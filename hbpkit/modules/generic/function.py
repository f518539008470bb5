"""The function one call of a module without rules computed, replayed for ``torch.func``.

The generic path (``hbpkit/modules/generic/``) differentiates this function: the whole
batch for Jacobian products, one sample at a time (under ``vmap``) for per-sample
parameter gradients.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from hbpkit.core.calls import ModuleCall, replaying

STRUCTURES = ("general", "selection")


def MATH_ATTENTION():  # noqa: N802 (a context manager factory)
    """Attention through its composite (matmul, softmax) form when a call is replayed: the
    fused CPU kernels have no forward-mode derivative."""
    return sdpa_kernel(SDPBackend.MATH)


GENERIC_ADVICE = (
    "The module has no rules of its own (the generic autograd path forms this tensor); "
    "register rules for it with hbpkit.register(...), use a GGN extension or products"
)


class CallFunction:
    """The function one call computed, ready for ``torch.func``, built once per call.

    ``self(params, *xs)`` recomputes the call's output ``[N, *out]`` from the followed
    inputs ``xs`` (the tensor inputs that required gradients) and a dict of parameters
    (those not given are the module's own); :meth:`per_sample` is the same function of
    one sample, for ``vmap``. The call's keyword arguments are replayed as recorded
    (tensors among them with the batch dimension are sliced per sample as well).
    """

    def __init__(self, call: ModuleCall, rules: Any) -> None:
        self.module = call.module
        self.n_args = len(call.inputs)
        self.kw_names = tuple(call.kwargs)
        everything = (*call.inputs, *call.kwargs.values())
        self.inputs = tuple(t.detach() if isinstance(t, Tensor) else t for t in everything)
        self.followed = followed_slots(call)
        self.output_index = call.output_index
        self.N = call.output_shape[0]
        self.batched = tuple(  # a tensor with N rows is per sample (see batched_inputs)
            isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == self.N for t in everything
        )
        known = getattr(call.module, "batched_inputs", None)  # a region knows which are
        if known is not None and len(known) == self.n_args:
            self.batched = (
                tuple(a and b for a, b in zip(known, self.batched)) + self.batched[self.n_args :]
            )
        self.params = {name: p.detach() for name, p in rules.trainable_params(call.module)}
        self.function = rules.function(call.module)

    def _run(self, params: dict[str, Tensor], values: list[Any]) -> Tensor:
        args, kwargs = values[: self.n_args], dict(zip(self.kw_names, values[self.n_args :]))
        with replaying(), MATH_ATTENTION():
            out = self.function(self.module, params, args, kwargs)
        return out if self.output_index is None else out[self.output_index]

    def __call__(self, params: dict[str, Tensor], *xs: Tensor) -> Tensor:
        values = list(self.inputs)
        for slot, x in zip(self.followed, xs):
            values[slot] = x
        return self._run(params, values)

    def per_sample(self, params: dict[str, Tensor], *values: Any) -> Tensor:
        """``f(x_n, theta)`` for one sample; ``values``: every input, sliced where batched."""
        values = [v.unsqueeze(0) if b else v for v, b in zip(values, self.batched)]
        return self._run(params, values).squeeze(0)

    def in_dims(self) -> tuple[int | None, ...]:
        return tuple(0 if b else None for b in self.batched)

    def followed_inputs(self) -> tuple[Tensor, ...]:
        return tuple(self.inputs[i] for i in self.followed)


def call_module(
    module: nn.Module, params: dict[str, Tensor], args: list[Any], kwargs: dict[str, Any]
) -> Any:
    """``module(*args, **kwargs)`` with ``params`` in place of the module's own tensors."""
    return functional_call(module, params, tuple(args), kwargs)


def followed_slots(call: ModuleCall) -> tuple[int, ...]:
    """The inputs of ``call`` curvature is backpropagated to: tensors that required gradients
    when the call was recorded."""
    return call.grad_slots
