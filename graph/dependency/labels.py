"""Channel element ids and the record of how ops couple them.

Every prunable channel position of every tensor carries an *element id*. A :class:`Labeling` says which dims of a
tensor carry ids and holds them as an array over those dims (several dims when a channel dim was split, e.g. heads
x head_dim). Ops add *unions* (two elements must be removed together), *blocks* (an element must never be removed),
*explicit* marks (only a plan naming the group removes it) and *inexact* marks (removing it changes other values,
e.g. through a normalisation over channels). Unions are resolved at the end with
``scipy.sparse.csgraph.connected_components``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass(frozen=True)
class Factor:
    """Element ids over one or more tensor dims (``ids.shape`` matches those dims' sizes, in ``dims`` order)."""

    dims: tuple[int, ...]
    ids: np.ndarray

    def rows(self, dim: int) -> np.ndarray:
        """The ids at each position along tensor dim ``dim``, one row per position (the factor's other dims
        flattened)."""
        axis = self.dims.index(dim)
        return np.moveaxis(self.ids, axis, 0).reshape(self.ids.shape[axis], -1)


@dataclass(frozen=True)
class Labeling:
    """The channel elements of a tensor of rank ``rank``: independent factors over disjoint dims.

    Removing an element removes every position holding its id along its factor's dims: a 1-d factor is an ordinary
    channel dim; a joint factor arises where a reshape split a channel dim (heads x head_dim).
    """

    rank: int
    factors: tuple[Factor, ...]

    @classmethod
    def single(cls, rank: int, dim: int, ids: np.ndarray) -> "Labeling":
        """A labeling with one 1-d factor."""
        return cls(rank, (Factor((dim % rank,), np.asarray(ids)),))

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(sorted(d for f in self.factors for d in f.dims))

    def factor_at(self, dim: int) -> Factor | None:
        """The factor covering ``dim``."""
        dim %= self.rank
        return next((f for f in self.factors if dim in f.dims), None)

    def remap(self, mapping: dict[int, int], rank: int) -> "Labeling | None":
        """Move factors to new dims (``mapping`` old -> new); factors touching an unmapped dim are dropped."""
        factors = tuple(Factor(tuple(mapping[d] for d in f.dims), f.ids) for f in self.factors
                        if all(d in mapping for d in f.dims))
        return Labeling(rank, factors) if factors else None

    def replace(self, old: Factor, new: Factor | None) -> "Labeling | None":
        """This labeling with factor ``old`` replaced by ``new`` (or removed)."""
        factors = tuple(f for f in self.factors if f is not old) + ((new,) if new is not None else ())
        return Labeling(self.rank, factors) if factors else None

    def all_ids(self) -> np.ndarray:
        """Every element id of every factor."""
        return np.concatenate([f.ids.ravel() for f in self.factors]) if self.factors else np.zeros(0, np.int64)


@dataclass
class ElementRecord:
    """Everything the rules said about elements: how many exist, unions, blocks and inexact marks with reasons."""

    count: int = 0
    union_a: list[np.ndarray] = field(default_factory=list)
    union_b: list[np.ndarray] = field(default_factory=list)
    blocked: list[tuple[np.ndarray, str]] = field(default_factory=list)
    inexact: list[tuple[np.ndarray, str]] = field(default_factory=list)
    explicit: list[tuple[np.ndarray, str]] = field(default_factory=list)

    def new(self, shape: tuple[int, ...]) -> np.ndarray:
        """Fresh element ids arranged in ``shape``."""
        size = int(np.prod(shape)) if shape else 1
        ids = np.arange(self.count, self.count + size, dtype=np.int64).reshape(shape)
        self.count += size
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple ``a[i]`` with ``b[i]`` for every position (arrays broadcast against each other)."""
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        self.union_a.append(a.ravel())
        self.union_b.append(b.ravel())

    def union_all(self, ids: np.ndarray) -> np.ndarray:
        """Couple every element of ``ids`` into one; returns the representative id."""
        flat = np.asarray(ids).ravel()
        self.union(flat[:1], flat)
        return flat[0]

    def block(self, ids: np.ndarray, reason: str) -> None:
        """Mark elements as never removable, saying why."""
        self.blocked.append((np.asarray(ids).ravel(), reason))

    def mark_inexact(self, ids: np.ndarray, reason: str) -> None:
        """Mark elements whose removal changes the remaining values (masking is not equivalent)."""
        self.inexact.append((np.asarray(ids).ravel(), reason))

    def mark_explicit(self, ids: np.ndarray, reason: str) -> None:
        """Mark elements that automatic plans leave alone (pruned only when a plan names their group)."""
        self.explicit.append((np.asarray(ids).ravel(), reason))

    def components(self) -> np.ndarray:
        """Component label of every element after all unions."""
        if self.union_a:
            a, b = np.concatenate(self.union_a), np.concatenate(self.union_b)
        else:
            a = b = np.zeros(0, dtype=np.int64)
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(self.count, self.count))
        return connected_components(graph, directed=False)[1]
