"""The mathematics of low-rank layer decomposition: per-group rank-r factors of a layer's weight, from its weights
alone (truncated SVD) or from data (Zhang, Zou, He, Sun, "Accelerating Very Deep Convolutional Networks for
Classification and Detection", TPAMI 2016), and the allocation of ranks across a network under one MACs budget.

A layer computes ``y = W x + b`` per output position, with ``W`` (n × fan-in) split into ``groups`` row blocks
(grouped convolutions; one block otherwise). A rank-``r`` decomposition replaces it by ``y ≈ L (R x) + b'``: ``R``
(r × fan-in, a k×k conv to r channels) then ``L`` (n × r, a 1×1 conv back), block by block. What matters is not
``y`` itself but the responses the next layers see, ``z = scale ⊙ y + shift`` (the following BatchNorm in eval
mode; identity without one): every solver here works in ``z`` space and maps its factors back to ``y`` space.

- **Weight SVD**: ``L R`` is the truncated SVD of ``diag(scale) W`` (Eckart–Young: the best rank-r approximation
  of the weights in Frobenius norm; its error is the sum of the squared discarded singular values).
- **Data-driven, linear, asymmetric**: ``z ≈ M ẑ + d`` with ``rank(M) ≤ r``, where ``z`` are the original
  network's responses and ``ẑ`` those of the layer fed by the already-decomposed network. This is reduced-rank
  regression: ``M = P Pᵀ M₀`` with ``M₀`` the full least-squares map and ``P`` the top-r eigenvectors of the fitted
  responses' covariance ``M₀ Σ_ẑẑ M₀ᵀ`` (with ``ẑ = z`` it is PCA of the response covariance, the paper's
  symmetric case). The factors are ``L = P``, ``R = Pᵀ M₀ diag(scale) W``.
- **Data-driven, nonlinear**: reconstruct ``relu(z)`` instead (the paper's Sec. 3.2): alternate between auxiliary
  responses ``a`` (closed form per element) minimising ``‖relu(z) − relu(a)‖² + λ‖a − (M ẑ + d)‖²`` and a
  reduced-rank regression of ``a`` on ``ẑ`` (the paper's GSVD step), with ``λ`` rising; the iterate with the lowest
  true post-ReLU error (the linear solution included) is kept, so it is never worse than the linear one.
- **Rank allocation** (the paper's Sec. 4.1): maximise ``∏ₗ Eₗ(rₗ)`` — the fraction of each layer's response (or
  weight) energy its rank keeps — under a MACs budget, greedily removing the rank whose loss of ``log E`` per MAC
  saved is smallest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .features import ResponseStatistics


@dataclass
class Factors:
    """A rank-r decomposition of one layer in ``y`` space, blocks stacked group by group: ``first`` (r × fan-in per
    group, rows of group g at ``g*r_g:(g+1)*r_g``), ``second`` (n × r_g, rows of group g at ``g*n_g:(g+1)*n_g``),
    ``bias`` (n) or None, and ``error``: the relative reconstruction error the solver minimised."""

    first: torch.Tensor
    second: torch.Tensor
    bias: torch.Tensor | None
    error: float


@dataclass
class ResponseSpace:
    """The channel-wise affine map ``z = scale ⊙ y + shift`` from a layer's outputs to the responses that matter."""

    scale: torch.Tensor
    shift: torch.Tensor

    @classmethod
    def identity(cls, channels: int) -> "ResponseSpace":
        """``z = y``."""
        return cls(torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))

    def inverse_scale(self) -> torch.Tensor:
        """``1 / scale``, 0 where ``scale`` is 0 (there ``z`` is the constant ``shift`` whatever ``y`` is)."""
        scale = self.scale.double()
        return torch.where(scale == 0, torch.zeros_like(scale), 1 / torch.where(scale == 0, 1.0, scale))


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(left, right, singular_values)`` with ``left @ right`` the best rank-``rank`` approximation of ``matrix``
    (``left`` = Uᵣ, ``right`` = Sᵣ Vᵣᵀ) and all singular values, via ``torch.linalg.svd`` in float64."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :rank], s[:rank, None] * vh[:rank], s


def _blocks(total: int, groups: int) -> list[slice]:
    size = total // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]


def weight_svd_factors(weight: torch.Tensor, groups: int, rank: int, space: ResponseSpace,
                       bias: torch.Tensor | None) -> Factors:
    """Rank-``rank``-per-group factors of ``weight`` (n × fan-in per group) by truncated SVD of ``diag(scale) W``
    per group; the bias is kept on the second factor. ``error``: discarded / total squared singular values."""
    firsts, seconds, tail, total = [], [], 0.0, 0.0
    inverse = space.inverse_scale()
    for rows in _blocks(weight.shape[0], groups):
        left, right, values = truncated_svd(space.scale[rows, None].double() * weight[rows].double(), rank)
        firsts.append(right)
        seconds.append(inverse[rows, None] * left)
        tail += float((values[rank:] ** 2).sum())
        total += float((values ** 2).sum())
    return Factors(torch.cat(firsts), torch.cat(seconds), None if bias is None else bias.double(),
                   tail / total if total > 0 else 0.0)


def weight_energy(weight: torch.Tensor, groups: int, space: ResponseSpace) -> torch.Tensor:
    """Squared singular values of ``diag(scale) W`` per group, as a (groups × rank) tensor, descending."""
    return torch.stack([torch.linalg.svdvals(space.scale[rows, None].double() * weight[rows].double()) ** 2
                        for rows in _blocks(weight.shape[0], groups)])


@dataclass
class Moments:
    """Centred second moments of paired responses: ``cov_aa`` = Cov(ẑ), ``cov_ta`` = Cov(z, ẑ), ``cov_tt`` = Cov(z)
    and the means, in ``z`` space."""

    cov_aa: torch.Tensor
    cov_ta: torch.Tensor
    cov_tt: torch.Tensor
    mean_a: torch.Tensor
    mean_t: torch.Tensor

    @classmethod
    def from_statistics(cls, stats: ResponseStatistics, space: ResponseSpace) -> "Moments":
        """The moments of ``z = scale ⊙ y + shift`` from running statistics of ``y``."""
        n = stats.count
        if n < 2:
            raise ValueError("at least two sampled responses are needed")
        mean_a, mean_t = stats.sum_a.cpu() / n, stats.sum_t.cpu() / n
        scale, shift = space.scale.double(), space.shift.double()
        outer = scale[:, None] * scale[None, :]

        def cov(gram: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            return (gram.cpu() / n - left[:, None] * right[None, :]) * outer

        return cls(cov(stats.aa, mean_a, mean_a), cov(stats.ta, mean_t, mean_a), cov(stats.tt, mean_t, mean_t),
                   scale * mean_a + shift, scale * mean_t + shift)

    @classmethod
    def from_rows(cls, approx: torch.Tensor, target: torch.Tensor) -> "Moments":
        """The moments of paired rows (already in ``z`` space)."""
        approx, target = approx.double(), target.double()
        mean_a, mean_t = approx.mean(0), target.mean(0)
        a, t = approx - mean_a, target - mean_t
        n = approx.shape[0]
        return cls(a.T @ a / n, t.T @ a / n, t.T @ t / n, mean_a, mean_t)

    def block(self, rows: slice) -> "Moments":
        """The moments of one group's channels."""
        return Moments(self.cov_aa[rows, rows], self.cov_ta[rows, rows], self.cov_tt[rows, rows],
                       self.mean_a[rows], self.mean_t[rows])


def reduced_rank_regression(moments: Moments, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, Q, eigenvalues)``: the rank-``rank`` map ``M = P Q`` (P n×r, Q r×n) minimising
    ``E‖(t − μₜ) − M (a − μₐ)‖²`` (see the module docstring), and all eigenvalues of the fitted covariance."""
    cov_aa = moments.cov_aa
    ridge = 1e-9 * float(cov_aa.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(cov_aa.shape[0], dtype=cov_aa.dtype, device=cov_aa.device)
    full = torch.linalg.solve(cov_aa + ridge * eye, moments.cov_ta.T).T
    fitted = moments.cov_ta @ full.T
    values, vectors = torch.linalg.eigh((fitted + fitted.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    projection = vectors[:, :rank]
    return projection, projection.T @ full, values


def relative_error(moments: Moments, mapping: torch.Tensor) -> float:
    """``E‖(t − μₜ) − M (a − μₐ)‖² / E‖t − μₜ‖²`` from the moments."""
    total = float(moments.cov_tt.trace())
    residual = total - 2 * float((mapping * moments.cov_ta).sum()) \
        + float((mapping @ moments.cov_aa * mapping).sum())
    return max(residual, 0.0) / total if total > 0 else 0.0


def _layer_factors(weight: torch.Tensor, bias: torch.Tensor | None, space: ResponseSpace, rows: slice,
                   projection: torch.Tensor, coder: torch.Tensor, offset: torch.Tensor) -> tuple:
    """``y``-space factors of one group from a ``z``-space fit ``z ≈ P Q ẑ + offset`` (see the module docstring):
    ``R = Q diag(scale) W``, ``L = diag(1/scale) P``, bias ``(P Q (scale ⊙ b + shift) + offset − shift) / scale``."""
    scale, shift = space.scale[rows].double(), space.shift[rows].double()
    inverse = space.inverse_scale()[rows]
    first = coder @ (scale[:, None] * weight[rows].double())
    second = inverse[:, None] * projection
    response_bias = scale * (bias[rows].double() if bias is not None else 0.0) + shift
    new_bias = inverse * (projection @ (coder @ response_bias) + offset - shift)
    return first, second, new_bias


def data_factors(weight: torch.Tensor, bias: torch.Tensor | None, groups: int, rank: int, space: ResponseSpace,
                 moments: Moments) -> Factors:
    """Rank-``rank``-per-group factors reconstructing the target responses from the approximated ones (linear,
    asymmetric; ``moments`` in ``z`` space). ``error``: the relative response reconstruction error."""
    firsts, seconds, biases, residual, total = [], [], [], 0.0, 0.0
    for rows in _blocks(weight.shape[0], groups):
        block = moments.block(rows)
        projection, coder, _ = reduced_rank_regression(block, rank)
        mapping = projection @ coder
        offset = block.mean_t - mapping @ block.mean_a
        first, second, new_bias = _layer_factors(weight, bias, space, rows, projection, coder, offset)
        firsts.append(first), seconds.append(second), biases.append(new_bias)
        block_total = float(block.cov_tt.trace())
        residual += relative_error(block, mapping) * block_total
        total += block_total
    return Factors(torch.cat(firsts), torch.cat(seconds), torch.cat(biases), residual / total if total > 0 else 0.0)


def response_energy(moments: Moments, groups: int) -> torch.Tensor:
    """Eigenvalues of the target response covariance per group (groups × channels per group), descending: what
    a rank keeps of the responses (the paper's PCA energy)."""
    return torch.stack([torch.linalg.eigvalsh(moments.block(rows).cov_tt).flip(0).clamp_min(0)
                        for rows in _blocks(moments.cov_tt.shape[0], groups)])


def _relu_auxiliary(target: torch.Tensor, linear: torch.Tensor, weight: float) -> torch.Tensor:
    """Per element, the ``a`` minimising ``(target − relu(a))² + weight (a − linear)²`` (``target`` ≥ 0)."""
    negative = torch.clamp(linear, max=0)
    negative_cost = target ** 2 + weight * (negative - linear) ** 2
    positive = torch.clamp((target + weight * linear) / (1 + weight), min=0)
    positive_cost = (target - positive) ** 2 + weight * (positive - linear) ** 2
    return torch.where(negative_cost <= positive_cost, negative, positive)


def relu_error(approx: torch.Tensor, target: torch.Tensor, mapping: torch.Tensor, offset: torch.Tensor) -> float:
    """``‖relu(z) − relu(M ẑ + d)‖² / ‖relu(z) − mean‖²`` over paired rows in ``z`` space."""
    truth = target.clamp(min=0)
    predicted = (approx @ mapping.T + offset).clamp(min=0)
    spread = float(((truth - truth.mean(0)) ** 2).sum())
    return float(((truth - predicted) ** 2).sum()) / spread if spread > 0 else 0.0


def nonlinear_block(approx: torch.Tensor, target: torch.Tensor, rank: int, start: tuple[torch.Tensor, ...],
                    iterations: int = 25, weights: Sequence[float] | None = None) -> tuple[torch.Tensor, ...]:
    """``(P, Q, offset, error)``: a rank-``rank`` fit ``relu(z) ≈ relu(P Q ẑ + offset)`` of one group's rows in
    ``z`` space by alternating minimisation from ``start = (P, Q, offset)`` (the linear solution); the iterate with
    the lowest post-ReLU error is returned, ``start`` included."""
    approx, target = approx.double(), target.double()
    truth = target.clamp(min=0)
    weights = weights or [0.01 * 100 ** (i / max(iterations - 1, 1)) for i in range(iterations)]
    projection, coder, offset = start
    best = (projection, coder, offset, relu_error(approx, target, projection @ coder, offset))
    for weight in weights:
        linear = approx @ (projection @ coder).T + offset
        auxiliary = _relu_auxiliary(truth, linear, weight)
        moments = Moments.from_rows(approx, auxiliary)
        projection, coder, _ = reduced_rank_regression(moments, rank)
        offset = moments.mean_t - projection @ (coder @ moments.mean_a)
        error = relu_error(approx, target, projection @ coder, offset)
        if error < best[3]:
            best = (projection, coder, offset, error)
    return best


def nonlinear_factors(weight: torch.Tensor, bias: torch.Tensor | None, groups: int, rank: int,
                      space: ResponseSpace, moments: Moments, approx_rows: torch.Tensor, target_rows: torch.Tensor,
                      iterations: int = 25) -> Factors:
    """Like :func:`data_factors` but reconstructing the responses after the following ReLU, from paired sampled
    rows of ``y`` (mapped to ``z`` here); starts from the linear solution and never does worse than it on the
    post-ReLU error, which is the ``error`` reported."""
    scale, shift = space.scale.double(), space.shift.double()
    approx_z, target_z = approx_rows.double() * scale + shift, target_rows.double() * scale + shift
    firsts, seconds, biases, residual, total = [], [], [], 0.0, 0.0
    for rows in _blocks(weight.shape[0], groups):
        block = moments.block(rows)
        projection, coder, _ = reduced_rank_regression(block, rank)
        offset = block.mean_t - projection @ (coder @ block.mean_a)
        projection, coder, offset, error = nonlinear_block(approx_z[:, rows], target_z[:, rows], rank,
                                                           (projection, coder, offset), iterations)
        first, second, new_bias = _layer_factors(weight, bias, space, rows, projection, coder, offset)
        firsts.append(first), seconds.append(second), biases.append(new_bias)
        truth = target_z[:, rows].clamp(min=0)
        spread = float(((truth - truth.mean(0)) ** 2).sum())
        residual += error * spread
        total += spread
    return Factors(torch.cat(firsts), torch.cat(seconds), torch.cat(biases), residual / total if total > 0 else 0.0)


@dataclass
class RankCurve:
    """One layer's choices for rank allocation: ``energy`` (groups × full rank) of descending eigen/singular values,
    ``original_macs`` (kept undecomposed), ``macs_per_rank`` (MACs of one rank in every group) and ``max_rank``,
    the largest rank per group that still saves MACs."""

    energy: torch.Tensor
    original_macs: float
    macs_per_rank: float
    max_rank: int

    def __post_init__(self) -> None:
        kept = self.energy.double().sum(0).cumsum(0)
        total = float(kept[-1]) if kept.numel() else 0.0
        self._log_kept = [0.0] + [math.log(max(float(k) / total, 1e-12)) if total > 0 else 0.0 for k in kept]

    def log_kept(self, rank: int) -> float:
        """``log`` of the energy fraction rank ``rank`` keeps (0 for the undecomposed layer, ``rank`` 0)."""
        return self._log_kept[rank]

    def macs(self, rank: int) -> float:
        """MACs at ``rank`` per group (0 meaning: not decomposed)."""
        return self.original_macs if rank == 0 else rank * self.macs_per_rank


def allocate_ranks(curves: dict[str, RankCurve], budget: float) -> dict[str, int]:
    """Ranks per group (0: leave the layer as it is) whose total MACs are at most ``budget``, chosen greedily: from
    all layers undecomposed, repeatedly take the one-rank step (undecomposed → the largest saving rank → one less)
    that loses the least ``log`` energy per MAC saved (the paper's ``∏ E`` objective). ``ValueError`` when even
    rank 1 everywhere exceeds the budget."""
    ranks = {name: 0 for name in curves}
    total = sum(curve.original_macs for curve in curves.values())
    while total > budget:
        best, best_cost = None, math.inf
        for name, curve in curves.items():
            rank = ranks[name]
            step = curve.max_rank if rank == 0 else rank - 1
            if step < 1:
                continue
            saved = curve.macs(rank) - curve.macs(step)
            cost = (curve.log_kept(rank) - curve.log_kept(step)) / saved
            if cost < best_cost:
                best, best_cost = name, cost
        if best is None:
            raise ValueError(f"the MACs budget {budget:,.0f} cannot be met: at rank 1 everywhere the decomposable "
                             f"layers still need {total:,.0f}")
        rank = ranks[best]
        step = curves[best].max_rank if rank == 0 else rank - 1
        total -= curves[best].macs(rank) - curves[best].macs(step)
        ranks[best] = step
    return ranks
