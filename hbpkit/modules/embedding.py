"""Rules of ``nn.Embedding``: ``z_{n,t} = W[i_{n,t}]`` for integer indices ``i`` ``[N, *]``.

With ``e_i`` the one-hot vector of index ``i`` (``[E]``, ``E = num_embeddings``) the layer
is a Linear layer without bias, ``z_{n,t} = W^T e_{i_{n,t}}`` (S.8 with ``x = e_i``), whose
weight ``W`` ``[E, D]`` is stored transposed and shared over the ``T = prod(*)`` positions.
Everything is exact except the Kronecker factors; nothing is backpropagated to the
input (integers), so an ``Embedding`` must be the first module of the network.
``padding_idx``: its row receives no gradient (as in PyTorch), so its one-hot entry
is treated as zero everywhere.

Kronecker factors, in the order of the weight's dimensions: ``(A, G)`` with
``A`` ``[E, E]`` over the rows and ``G`` ``[D, D]``, ``torch.kron(A, G)`` approximating the
block in ``p.flatten()`` order (``KroneckerFactors`` multiplies ``A V G^T``). With
``s_{v,n,t}`` the sqrt factors at the output and ``c_n`` ``[E]`` the counts of each index
in sample ``n`` (``kfac_approx`` as for ``Linear`` on ``[N, T, D]``):

* ``"expand"``: ``A = 1/(N T) sum_{n,t} e_i e_i^T = diag(sum_n c_n) / (N T)`` (diagonal: the
  one-hot input covariance), ``G = sum_{v,n,t} s s^T``;
* ``"reduce"``: ``A = 1/N sum_n (c_n / T)(c_n / T)^T`` (dense where indices co-occur),
  ``G = sum_{v,n} (sum_t s)(sum_t s)^T``.

At ``N = T = 1`` both are the exact block ``e_i e_i^T kron G``.
"""

from __future__ import annotations

from einops import einsum, rearrange
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall
from hbpkit.curvature.factors import DiagonalFactor, Factor, SqrtFactor
from hbpkit.modules.base import (
    ModuleRules,
    output_factor_from_average,
    output_factor_from_sqrt,
)

NOT_BACKPROPAGATED = (
    "the input of Embedding is integer indices: nothing is backpropagated to it, so "
    "Embedding must be the first module of the network"
)


class EmbeddingRules(ModuleRules):
    """Parameter rules of ``nn.Embedding`` (a Linear layer on one-hot inputs, S.8)."""

    support_note = (
        "first module only (integer input); Kronecker factors `(A, G)`, `A` the one-hot "
        "input covariance (diagonal for `expand`)"
    )

    def param_names(self, module: nn.Embedding) -> list[str]:
        return ["weight"]

    def validate(self, call: ModuleCall) -> None:
        module = call.module
        for option, value in (
            ("max_norm", module.max_norm),
            ("scale_grad_by_freq", module.scale_grad_by_freq or None),
            ("sparse", module.sparse or None),
        ):
            if value is not None:
                raise NotImplementedError(
                    f"{module}: {option}={value!r} is not supported (max_norm rewrites the "
                    "weight during the forward pass, scale_grad_by_freq rescales the gradient "
                    "by batch frequencies, sparse gives sparse gradients); use the defaults"
                )
        if call.inputs[0].dim() < 1:
            raise NotImplementedError(f"{module} needs batched indices [N, *], got a scalar")

    def _indices(self, call: ModuleCall) -> Tensor:
        """``[N, T]`` indices."""
        return call.input.reshape(call.input.shape[0], -1)

    def _mask(self, call: ModuleCall) -> Tensor | None:
        """``[N, T]``: 0 where the index is ``padding_idx`` (no gradient), else 1; or ``None``."""
        pad = call.module.padding_idx
        if pad is None:
            return None
        return (self._indices(call) != pad).to(call.module.weight.dtype)

    def _scatter(self, call: ModuleCall, t: Tensor, over_samples: bool = False) -> Tensor:
        """``sum_t e_{i_{n,t}} t_{n,t}^T``: ``[*, N, T, D] -> [*, N, E, D]`` (padding dropped).

        ``over_samples``: also summed over ``n``, ``[*, N, T, D] -> [*, E, D]``.
        """
        idx = self._indices(call)
        mask = self._mask(call)
        if mask is not None:
            t = t * mask[..., None]
        if over_samples:
            t, idx = t.flatten(-3, -2).unsqueeze(-3), idx.reshape(1, -1)
        out = t.new_zeros(*t.shape[:-2], call.module.num_embeddings, t.shape[-1])
        out = out.scatter_add_(-2, idx[..., None].expand(t.shape), t)
        return out.squeeze(-3) if over_samples else out

    def _masked(self, call: ModuleCall, t: Tensor) -> Tensor:
        """``t`` ``[*, N, T, D]`` with zeros at ``padding_idx`` positions."""
        mask = self._mask(call)
        return t if mask is None else t * mask[..., None]

    def _same_index(self, call: ModuleCall) -> Tensor:
        """``[N, T, T]``: 1 where positions ``t``, ``u`` of a sample hold the same index."""
        idx = self._indices(call)
        return (idx[:, :, None] == idx[:, None, :]).to(call.module.weight.dtype)

    def _positions(self, call: ModuleCall, t: Tensor, batch_dims: int) -> Tensor:
        """``[*batch, N, *, D] -> [*batch, N, T, D]``."""
        return t.reshape(*t.shape[: batch_dims + 1], -1, t.shape[-1])

    def jac_t_mat_prod(self, call: ModuleCall, mat: Tensor) -> Tensor:
        raise NotImplementedError(NOT_BACKPROPAGATED)

    def batch_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        return self._scatter(call, self._positions(call, grad_output, 0))

    def summed_grad(self, call: ModuleCall, name: str, grad_output: Tensor) -> Tensor:
        return self._scatter(call, self._positions(call, grad_output, 0), over_samples=True)

    def param_diag(self, call: ModuleCall, name: str, factors: list[Factor]) -> Tensor:

        def of_diagonal(f: DiagonalFactor) -> Tensor:  # entry (t, d) adds sign s^2 at (i_t, d)
            sq = self._positions(call, f.signed_square(), 0)
            return self._scatter(call, sq, over_samples=True)

        def of_dense(f: SqrtFactor) -> Tensor:
            # (sum_{t: i_t = r} s_t)^2 = sum_{t: i_t = r} s_t * (sum_{u: i_u = i_t} s_u)
            S = self._masked(call, self._positions(call, f.S, 1))  # [V, N, T, D]
            summed = einsum(self._same_index(call), S, "n t u, v n u d -> v n t d")
            products = SqrtFactor(S * summed, f.sign).signed()
            return self._scatter(call, products.sum(0), over_samples=True)

        return sum(f.match(dense=of_dense, diagonal=of_diagonal) for f in factors)

    def param_jac_t_columns(self, call: ModuleCall, name: str, factor: Factor) -> SqrtFactor:
        """``sum_t e_{i_{n,t}} s_{v,n,t}^T`` per column and sample, ``[V, N, E, D]``."""
        f = factor.dense()
        return SqrtFactor(self._scatter(call, self._positions(call, f.S, 1)), f.sign)

    def input_factor(self, call: ModuleCall, approx: str) -> Tensor:
        """``A`` ``[E, E]``: ``diag(counts) / (N T)`` (expand), ``mean_n cbar cbar^T`` (reduce)."""
        key = ("embedding_A", approx)
        if key not in call.cache:
            idx = self._indices(call)
            N, T = idx.shape
            ones = call.module.weight.new_ones(N, T, 1)
            counts = self._scatter(call, ones)[..., 0]  # [N, E]
            if approx == "reduce":
                cbar = counts / T
                A = cbar.T @ cbar / N
            else:
                A = counts.sum(0).diag() / (N * T)
            call.cache[key] = A
        return call.cache[key]

    kron_output_factor = 1  # [A over the vocabulary rows, G over the embedding columns]

    def kron_from_sqrt(
        self, call: ModuleCall, name: str, factors: list[Factor], approx: str
    ) -> list[Tensor]:
        G = output_factor_from_sqrt(factors, lambda S: self._positions(call, S, 1), approx)
        return [self.input_factor(call, approx), G]

    def kron_from_average(
        self, call: ModuleCall, name: str, mat: Tensor, approx: str
    ) -> list[Tensor]:
        T = self._indices(call).shape[1]
        H = rearrange(mat, "(t o) (s p) -> o t p s", t=T, s=T)
        return [self.input_factor(call, approx), output_factor_from_average(H, approx)]

    def param_jac_mat_prod(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, E, D] -> [K, N, *, D]``: ``V_k[i_{n,t}]`` (zero at ``padding_idx``)."""
        idx = self._indices(call)
        out = mat[:, idx]  # [K, N, T, D]
        mask = self._mask(call)
        if mask is not None:
            out = out * mask[..., None]
        return out.reshape(mat.shape[0], *call.output_shape)

    def param_jac_t_mat_prod_sum(self, call: ModuleCall, name: str, mat: Tensor) -> Tensor:
        """``[K, N, *, D] -> [K, E, D]``: ``sum_{n,t} e_{i_{n,t}} m_{k,n,t}^T``."""
        return self._scatter(call, self._positions(call, mat, 1), over_samples=True)
