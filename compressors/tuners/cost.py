"""Cost models: the MACs (or latency) of a network as a closed-form function of every unit's kept count, cheap
enough to evaluate thousands of times per episode (the action wall evaluates one per candidate count).

A cost model is a sum over the network's nodes. A node's cost depends on the units whose channels it touches
(``touches[node, unit]``); :meth:`CostModel.cost` evaluates it for a batch of kept-count vectors at once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from compressors.base import CompressionError
from graph.flops import count_flops

from .units import Unit

Builder = Callable[[Sequence[int]], object]
"""Builds the compressed network at one kept count per unit (the action adapter's ``compress``)."""


class CostModel:
    """Base of the cost models: node names, each node's cost at full size (``base``), which units it depends on
    (``touches``, nodes x units) and ``fixed`` cost of everything else. Subclasses implement :meth:`node_costs`."""

    unit_name = "cost"

    def __init__(self, units: list[Unit], nodes: list[str], base: np.ndarray, touches: np.ndarray, fixed: float):
        self.units = units
        self.nodes = nodes
        self.base = np.asarray(base, dtype=np.float64)
        self.touches = np.asarray(touches, dtype=bool)
        self.fixed = float(fixed)
        self.sizes = np.array([unit.size for unit in units], dtype=np.int64)

    @property
    def full(self) -> float:
        """The cost of the uncompressed network."""
        return float(self.fixed + self.base.sum())

    def node_costs(self, keeps: np.ndarray) -> np.ndarray:
        """Per-node costs, (batch x nodes), of a batch of kept-count vectors (batch x units)."""
        raise NotImplementedError

    def cost(self, keeps: np.ndarray | Sequence[int]) -> np.ndarray | float:
        """Total cost of one kept-count vector (a float) or of a batch of them (batch x units -> batch)."""
        keeps = np.asarray(keeps, dtype=np.float64)
        single = keeps.ndim == 1
        batch = np.atleast_2d(keeps)
        if batch.shape[1] != len(self.units):
            raise ValueError(f"expected {len(self.units)} kept counts per vector, got {batch.shape[1]}")
        totals = self.fixed + self.node_costs(batch).sum(axis=1)
        return float(totals[0]) if single else totals

    def unit_cost(self, index: int) -> float:
        """Full-size cost of the nodes that depend on unit ``index`` (the "MACs of the layer" state feature)."""
        return float(self.base[self.touches[:, index]].sum())

    def cost_after(self, index: int) -> float:
        """Full-size cost of the nodes that depend on any unit after ``index`` (the "remaining" state feature)."""
        return float(self.base[self.touches[:, index + 1:].any(axis=1)].sum())


class MacsModel(CostModel):
    """Multiply-adds, exact at every allowed policy: each node's MACs are a polynomial of degree at most two in the
    kept counts of the units it depends on (a conv reading a concatenation: out x (a + b); a conv whose input and
    output are one group: k squared; a depthwise conv: k). Which units each node depends on is measured by shrinking
    one unit at a time; the polynomials are fitted to MACs counted (:func:`graph.flops.count_flops`) on networks
    rebuilt by ``build`` at random policies, then checked on as many fresh ones (to the MAC, after rounding):
    :class:`CompressionError` names a node whose cost is not such a polynomial."""

    unit_name = "MACs"

    def __init__(self, rnet, units: list[Unit], build: Builder, seed: int = 0):
        report = count_flops(rnet)
        names = [row.name for row in report.rows if row.macs]
        full = np.array([report.by_node[name].macs for name in names], dtype=np.float64)
        sizes = np.array([unit.size for unit in units], dtype=np.int64)

        def measure(keeps: np.ndarray) -> np.ndarray:
            counted = count_flops(build([int(k) for k in keeps])).by_node
            return np.array([(counted[name].macs or 0) if name in counted else 0 for name in names], np.float64)

        touches = np.zeros((len(names), len(units)), dtype=bool)
        for index, unit in enumerate(units):
            keeps = sizes.copy()
            keeps[index] = unit.lowest
            touches[:, index] = measure(keeps) != full
        super().__init__(units, names, full, touches, report.total_macs - full.sum())
        self.pairs = sorted({(i, j) for row in touches for i in np.flatnonzero(row) for j in np.flatnonzero(row)
                             if i <= j})
        columns = [self._columns(row) for row in touches]
        rng = np.random.default_rng(seed)
        count = 2 * max((len(c) for c in columns), default=1) + 2

        def policies(number: int) -> np.ndarray:
            return np.array([[rng.choice(unit.keeps) for unit in units] for _ in range(number)], dtype=np.int64)

        design = np.vstack([sizes, [unit.lowest for unit in units], policies(count)])
        measured = np.array([measure(keeps) for keeps in design])
        features = self._monomials(design)
        self.coefficients = np.zeros((features.shape[1], len(names)))
        for node, cols in enumerate(columns):
            solution = np.linalg.lstsq(features[:, cols], measured[:, node], rcond=None)[0]
            self.coefficients[cols, node] = solution
        check = policies(count)
        wrong = np.abs(self.node_costs(check) - np.array([measure(keeps) for keeps in check])).max(axis=0)
        if wrong.size and wrong.max() > 0:
            raise CompressionError(f"the MACs of node {names[int(np.argmax(wrong))]} are not a polynomial of degree "
                                   "two in the kept channel counts; this network cannot be searched under a MACs "
                                   "budget")

    def _columns(self, row: np.ndarray) -> list[int]:
        """Monomial columns a node touching the units in ``row`` may use: the constant, its units, their pairs."""
        units = set(np.flatnonzero(row).tolist())
        singles = [1 + u for u in sorted(units)]
        pairs = [1 + len(self.units) + p for p, (i, j) in enumerate(self.pairs) if i in units and j in units]
        return [0, *singles, *pairs]

    def _monomials(self, keeps: np.ndarray) -> np.ndarray:
        """Features of each policy: 1, every unit's kept fraction, and products of the co-occurring pairs."""
        fractions = keeps / self.sizes
        products = [fractions[:, i] * fractions[:, j] for i, j in self.pairs]
        return np.column_stack([np.ones(len(keeps)), fractions, *products])

    def node_costs(self, keeps: np.ndarray) -> np.ndarray:
        return np.round(self._monomials(keeps) @ self.coefficients)


class RankMacsModel(CostModel):
    """Multiply-adds of a network whose decomposable layers (one unit each, ``unit.key`` a
    :class:`compressors.low_rank_layers.Candidate`) are either kept whole (kept count = the unit's size) or split at
    rank r per group, which costs ``r * macs_per_rank``; every other node is fixed. Exact to rounding: a rank-r
    split of a layer with ``g`` groups, ``n`` outputs and fan-in ``f`` per group runs ``r * HW * (g f + n)``
    multiply-adds."""

    unit_name = "MACs"

    def __init__(self, rnet, units: list[Unit]):
        base = np.array([unit.key.macs for unit in units], dtype=np.float64)
        total = count_flops(rnet).total_macs
        super().__init__(units, [unit.key.name for unit in units], base, np.eye(len(units), dtype=bool),
                         total - base.sum())
        self.per_rank = np.array([unit.key.macs_per_rank for unit in units], dtype=np.float64)

    def node_costs(self, keeps: np.ndarray) -> np.ndarray:
        return np.where(keeps >= self.sizes, self.base, np.round(keeps * self.per_rank))
