"""Recurrent modules (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) through the generic path.

The fused kernels these modules call (``_VF.lstm`` on flat weights) do not run under
``torch.func.vmap``, which the generic path (``hbpkit/modules/generic.py``) needs. The
rules here give it :func:`recurrence` instead: the module's recurrence written out from
its parameters (``weight_ih_l{k}[_reverse]``, ``weight_hh_l...``, ``bias_ih_l...``,
``bias_hh_l...``, ``weight_hr_l...`` of an LSTM with ``proj_size``), step by step, as
the PyTorch documentation of each module defines it. Every quantity is then exact, as
for any module on the generic path.

Shapes: ``N`` samples, ``T`` time steps, ``C`` input features, ``H`` hidden units,
``P`` the LSTM's projection size (``H`` without one), ``L`` layers, ``D`` directions
(2 if bidirectional). Input ``x`` ``[N, T, C]`` (``batch_first=True``), output
``[N, T, D * P]``, final states ``[L * D, N, P]`` (and the LSTM's cells ``[L * D, N, H]``).

Per time step (``a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``, the gate pre-activations):

* RNN: ``h_t = phi(a_t)`` (``phi``: tanh or ReLU);
* LSTM: ``i, f, g, o = sigma, sigma, tanh, sigma`` of the four chunks of ``a_t``,
  ``c_t = f c_{t-1} + i g``, ``h_t = W_hr (o tanh(c_t))`` (``W_hr = I`` without projection);
* GRU: ``r, z = sigma`` of the first two chunks of ``a_t``, ``n = tanh(W_in x_t + b_in +
  r (W_hn h_{t-1} + b_hn))``, ``h_t = (1 - z) n + z h_{t-1}``.

The layer ``k + 1`` reads the outputs of layer ``k`` (both directions concatenated).

hbpkit needs the batch dimension first at every recorded call, so ``batch_first=False``
(input ``[T, N, C]``) is refused; so are an initial state that requires gradients
(its batch dimension is the second), inputs without a batch dimension, dropout between
layers in training mode (its mask cannot be replayed), and Kronecker factors (the weights
act on every time step: the factors' expansion over time is not implemented).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.modules.generic import CallFunction, GenericRules

State = tuple[Tensor, ...]  # (h,) or, for an LSTM, (h, c)


def _param(module: nn.Module, params: dict[str, Tensor], name: str) -> Tensor | None:
    """``params[name]`` where given, else the module's own tensor (``None`` if it has none)."""
    if name in params:
        return params[name]
    return getattr(module, name, None)


def _lstm_step(a: Tensor, state: State, weights: dict[str, Tensor | None]) -> State:
    h, c = state
    a = a + F.linear(h, weights["weight_hh"], weights["bias_hh"])
    i, f, g, o = a.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if weights["weight_hr"] is not None:
        h = F.linear(h, weights["weight_hr"])
    return h, c


def _gru_step(a: Tensor, state: State, weights: dict[str, Tensor | None]) -> State:
    (h,) = state
    b = F.linear(h, weights["weight_hh"], weights["bias_hh"])
    a_r, a_z, a_n = a.chunk(3, dim=-1)
    b_r, b_z, b_n = b.chunk(3, dim=-1)
    r = torch.sigmoid(a_r + b_r)
    z = torch.sigmoid(a_z + b_z)
    n = torch.tanh(a_n + r * b_n)
    return ((1 - z) * n + z * h,)


def _rnn_step(phi: Callable[[Tensor], Tensor]) -> Callable:
    def step(a: Tensor, state: State, weights: dict[str, Tensor | None]) -> State:
        (h,) = state
        return (phi(a + F.linear(h, weights["weight_hh"], weights["bias_hh"])),)

    return step


def _step(module: nn.Module) -> Callable:
    if isinstance(module, nn.LSTM):
        return _lstm_step
    if isinstance(module, nn.GRU):
        return _gru_step
    if isinstance(module, nn.RNN):
        return _rnn_step(torch.tanh if module.nonlinearity == "tanh" else torch.relu)
    raise TypeError(f"{type(module).__name__} is not an nn.LSTM, nn.GRU or nn.RNN")


def _initial_state(module: nn.Module, hx: Any, x: Tensor, index: int) -> State:
    """The initial state of layer-direction ``index = l * D + d``: ``[N, P]`` (and ``[N, H]``)."""
    N = x.shape[0]
    lstm = isinstance(module, nn.LSTM)
    P = module.proj_size if lstm and module.proj_size > 0 else module.hidden_size
    if hx is None:
        h = x.new_zeros(N, P)
        return (h, x.new_zeros(N, module.hidden_size)) if lstm else (h,)
    if lstm:
        return hx[0][index], hx[1][index]
    return (hx[index],)


def _direction(
    step: Callable, x: Tensor, state: State, weights: dict[str, Tensor | None], reverse: bool
) -> tuple[Tensor, State]:
    """One layer in one direction: ``x`` ``[N, T, C_k]`` -> outputs ``[N, T, P]``, final state."""
    a = F.linear(x, weights["weight_ih"], weights["bias_ih"])  # [N, T, G], all steps at once
    T = x.shape[1]
    outputs: list[Tensor | None] = [None] * T
    for t in reversed(range(T)) if reverse else range(T):
        state = step(a[:, t], state, weights)
        outputs[t] = state[0]
    return torch.stack(outputs, dim=1), state


def recurrence(module: nn.Module, params: dict[str, Tensor], args: list[Any]) -> Any:
    """What ``module(*args)`` returns, from ``params`` (default: the module's own tensors).

    ``args``: ``[x]`` or ``[x, hx]``, ``x`` ``[N, T, C]`` (``[T, N, C]`` if not
    ``batch_first``), ``hx`` ``[L * D, N, P]`` (LSTM: ``(h_0, c_0)``) or ``None``. Returns
    ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``). Dropout between layers is not
    applied (the module in eval mode).
    """
    x = args[0]
    hx = args[1] if len(args) > 1 else None
    if x.dim() != 3:
        raise ValueError(f"expected a batched sequence [N, T, C], got shape {tuple(x.shape)}")
    if not module.batch_first:
        x = x.transpose(0, 1)
    step = _step(module)
    D = 2 if module.bidirectional else 1
    finals: list[State] = []
    for layer in range(module.num_layers):
        outputs = []
        for d in range(D):
            suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")
            weights = {
                kind: _param(module, params, kind + suffix)
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
            }
            state = _initial_state(module, hx, x, layer * D + d)
            out, state = _direction(step, x, state, weights, reverse=d == 1)
            outputs.append(out)
            finals.append(state)
        x = torch.cat(outputs, dim=-1) if D > 1 else outputs[0]
    output = x if module.batch_first else x.transpose(0, 1)
    h_n = torch.stack([s[0] for s in finals])
    if isinstance(module, nn.LSTM):
        return output, (h_n, torch.stack([s[1] for s in finals]))
    return output, h_n


def _recurrence_call(
    module: nn.Module, params: dict[str, Tensor], args: list[Any], kwargs: dict[str, Any]
) -> Any:
    """:func:`recurrence` as the generic path calls a module (``hx`` may come by keyword)."""
    if kwargs.get("hx") is not None:
        args = [*args, kwargs["hx"]]
    return recurrence(module, params, list(args))


def _map_state(f: Callable[[Tensor], Any], hx: Any) -> Any:
    """``f`` applied to the tensors of an initial state (a tensor, a tuple of them, ``None``)."""
    if hx is None:
        return None
    if isinstance(hx, Tensor):
        return f(hx)
    return tuple(f(t) for t in hx)


class RecurrentFunction(CallFunction):
    """:class:`~hbpkit.modules.generic.CallFunction` of a recurrent call: the sequence
    ``x`` has its batch dimension first, the initial state ``hx`` second."""

    def per_sample(self, params: dict[str, Tensor], *args: Any) -> Tensor:
        x, *rest = args  # (an initial state given by keyword comes last)
        args = [x.unsqueeze(0), *(_map_state(lambda t: t.unsqueeze(1), h) for h in rest)]
        return recurrence(self.module, params, args)[0].squeeze(0)

    def in_dims(self) -> tuple[Any, ...]:
        return (0, *(_map_state(lambda t: 1, h) for h in self.inputs[1:]))


class RecurrentRules(GenericRules):
    """Exact rules of ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` from their written-out recurrence.

    Everything the generic path gives (per-sample gradients, exact diagonals, exact
    curvature-matrix products, backpropagation to the sequence) on the recorded output
    ``output`` ``[N, T, D * P]``; the final states may be returned but not used towards
    the loss (they are not recorded). Kronecker factors are not implemented.
    """

    support_note = (
        "generic path on the written-out recurrence (modules/recurrent.py): exact; "
        "batch_first=True; no Kronecker factors"
    )

    def __init__(self) -> None:
        super().__init__(linear_in_input=False, structure="general", linear_in_params=False)

    def function(self, module: nn.Module) -> Callable[[nn.Module, dict, list, dict], Any]:
        return _recurrence_call

    def capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> object:
        """The first sample's output, which :meth:`validate` replays (a copy, ``[T, D * P]``)."""
        if output.dim() != 3 or not module.batch_first:
            return None  # refused by validate
        return output[:1].detach().clone()

    def validate(self, call: ModuleCall) -> None:
        module, name = call.module, describe(call.module)
        if not module.batch_first:
            raise NotImplementedError(
                f"{name} has batch_first=False (input [T, N, C]); hbpkit needs the batch "
                "dimension first at every module: construct it with batch_first=True and "
                "pass the sequence as [N, T, C]"
            )
        x = call.inputs[0]
        if x.dim() != 3:
            raise NotImplementedError(
                f"{name} got an input of shape {tuple(x.shape)}; hbpkit needs a batch of "
                "sequences [N, T, C]"
            )
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise NotImplementedError(
                f"{name} has dropout={module.dropout} between its layers in training mode: "
                "its mask cannot be replayed; call eval() on it or set dropout=0"
            )
        hx = call.inputs[1] if len(call.inputs) > 1 else call.kwargs.get("hx")
        states = [] if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
        if any(t.requires_grad for t in states):
            raise NotImplementedError(
                f"{name} got an initial state hx that requires gradients; hbpkit "
                "backpropagates only to the sequence input (hx has its batch dimension "
                "second): pass hx.detach(), or none"
            )
        self._check_replay(call)

    def _check_replay(self, call: ModuleCall) -> None:
        """The written-out recurrence reproduces the recorded output of the first sample:
        refuse what it does not see (``hx`` passed as a keyword, a subclass's own forward)."""
        first = call.captured
        if not isinstance(first, Tensor):
            return
        f = self._function(call)
        x, *rest = f.inputs
        with torch.no_grad():
            replay = f.per_sample(f.params, x[0], *(_map_state(lambda t: t[:, 0], h) for h in rest))
        tol = _replay_tolerance(first)
        if not torch.allclose(replay, first[0], rtol=tol, atol=tol * float(first.abs().max())):
            raise NotImplementedError(
                f"{describe(call.module)}: its recurrence, replayed from its parameters, does "
                "not reproduce the output it returned (an initial state passed as the "
                "keyword hx=..., which hbpkit does not see: pass it positionally; or a "
                "subclass with a forward of its own: register rules for it)"
            )

    def _function(self, call: ModuleCall) -> CallFunction:
        key = ("generic_function",)
        if key not in call.cache:
            call._check_alive()
            call.cache[key] = RecurrentFunction(call, self)
        return call.cache[key]


def _replay_tolerance(t: Tensor) -> float:
    """``10 sqrt(eps)`` of ``t``'s precision; on CUDA in float32 that of TF32 (cuDNN's fused
    recurrent kernels may use it, ``torch.backends.cudnn.allow_tf32``)."""
    eps = torch.finfo(t.dtype).eps
    if t.is_cuda and t.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        eps = 2.0**-10
    return 10 * eps**0.5


#: the rules of the recurrent modules (one object serves all three)
RECURRENT_RULES = RecurrentRules()
RECURRENT: dict[type, RecurrentRules] = {
    nn.LSTM: RECURRENT_RULES,
    nn.GRU: RECURRENT_RULES,
    nn.RNN: RECURRENT_RULES,
}
