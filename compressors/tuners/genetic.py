"""Genetic-algorithm ratio search: a population of per-unit preserve-ratio vectors, repaired to the budget by
scaling each vector to fill it, then through the action wall (the repaired ratios are written back into the
genes); fitness = the reward (held-out accuracy by default); tournament selection, uniform crossover, Gaussian
mutation and elitism."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from compressors.base import CompressionError

from .search import SearchTuner


@dataclass
class GAConfig:
    """Operators of the genetic algorithm."""

    tournament: int = 3
    crossover_rate: float = 0.9
    mutation_rate: float | None = None
    mutation_sigma: float = 0.1
    elite: int = 2


class GeneticAlgorithm:
    """Evolves real vectors in ``[low, high] ** genes`` towards high fitness.

    :meth:`initial` draws a uniform population; :meth:`next_generation` keeps the ``elite`` fittest, then fills the
    population with children of two tournament-selected parents (uniform crossover with probability
    ``crossover_rate``), each gene mutated with probability ``mutation_rate`` (default ``1 / genes``) by Gaussian
    noise of width ``mutation_sigma``, clipped to the bounds.
    """

    def __init__(self, genes: int, low: float, high: float, population: int, rng: np.random.Generator,
                 config: GAConfig | None = None):
        self.config = config or GAConfig()
        if population < 2:
            raise CompressionError(f"population must be at least 2, got {population}")
        if not 0 <= self.config.elite < population:
            raise CompressionError(f"elite must be in [0, population), got {self.config.elite} for a population of "
                                   f"{population}")
        self.genes, self.low, self.high, self.population, self.rng = genes, low, high, population, rng

    def initial(self) -> np.ndarray:
        """A uniform random population (population x genes)."""
        return self.rng.uniform(self.low, self.high, (self.population, self.genes))

    def _tournament(self, fitness: np.ndarray) -> int:
        entrants = self.rng.integers(0, len(fitness), min(self.config.tournament, len(fitness)))
        return int(entrants[np.argmax(fitness[entrants])])

    def next_generation(self, population: np.ndarray, fitness: np.ndarray) -> np.ndarray:
        """The next population from this one and its fitness (higher is better)."""
        c = self.config
        rate = c.mutation_rate if c.mutation_rate is not None else 1.0 / self.genes
        elite = population[np.argsort(-fitness, kind="stable")[:c.elite]]
        children = []
        while len(children) < self.population - c.elite:
            first = population[self._tournament(fitness)]
            second = population[self._tournament(fitness)]
            child = first.copy()
            if self.rng.random() < c.crossover_rate:
                take = self.rng.random(self.genes) < 0.5
                child[take] = second[take]
            mutate = self.rng.random(self.genes) < rate
            child[mutate] += self.rng.normal(0.0, c.mutation_sigma, int(mutate.sum()))
            children.append(np.clip(child, self.low, self.high))
        return np.vstack([elite, *children]) if children else elite

    def evolve(self, fitness_of: Callable[[np.ndarray], tuple[np.ndarray, float]], generations: int,
               population: np.ndarray | None = None,
               after: Callable[[np.ndarray], None] | None = None) -> tuple[np.ndarray, float]:
        """Run ``generations`` generations from ``population`` (a fresh one by default). ``fitness_of(genes)``
        returns the (possibly repaired) genes and their fitness; ``after(next population)`` is called at the end of
        each generation. Returns the best genes and fitness seen."""
        population = self.initial() if population is None else population
        best_genes, best_fitness = population[0], -math.inf
        for _ in range(generations):
            scored = [fitness_of(genes) for genes in population]
            genes = np.array([g for g, _ in scored])
            fitness = np.array([f for _, f in scored])
            if fitness.max() > best_fitness:
                best_genes, best_fitness = genes[int(np.argmax(fitness))].copy(), float(fitness.max())
            population = self.next_generation(genes, fitness)
            if after is not None:
                after(population)
        return best_genes, best_fitness


class GATuner(SearchTuner):
    """Genetic-algorithm search of per-group preserve ratios (shared arguments: see
    :class:`~compressors.tuners.search.SearchTuner`). ``population`` individuals per generation; ``generations``
    defaults to ``ceil(episodes / population)``, and ``episodes`` becomes ``population * generations`` (one episode
    per individual evaluated). Operator settings are keyword arguments named as in :class:`GAConfig`."""

    name = "GA"

    def __init__(self, origin_net, trainloader, valloader, flops_target: float = 0.5, compressor: Any = "l2",
                 episodes: int = 300, seed: int = 0, checkpointfolder=None, device=None, verbose: bool = False,
                 population: int = 20, generations: int | None = None, **options: Any):
        if isinstance(population, bool) or not isinstance(population, int) or population < 2:
            raise CompressionError(f"population must be an integer of at least 2, got {population!r}")
        names = set(GAConfig.__dataclass_fields__)
        chosen = {key: options.pop(key) for key in list(options) if key in names}
        config = GAConfig(**{"elite": min(GAConfig.elite, population - 1), **chosen})
        if generations is None:
            generations = max(1, math.ceil(episodes / population))
        if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
            raise CompressionError(f"generations must be a positive integer, got {generations!r}")
        super().__init__(origin_net, trainloader, valloader, flops_target, compressor, population * generations,
                         seed, checkpointfolder, device, verbose, **options)
        self.population_size, self.generations = population, generations
        self.rng = self.generator()
        self.ga = GeneticAlgorithm(len(self.units), self.lbound, 1.0, population, self.rng, config)
        self.population: np.ndarray | None = None

    def signature(self) -> dict[str, Any]:
        return {**super().signature(), "population": self.population_size, "ga": asdict(self.ga.config)}

    def _evaluate(self, genes: np.ndarray) -> tuple[np.ndarray, float]:
        keeps = self.wall.rescale(genes)
        episode = self.scorer.score(len(self.history), keeps, genes.tolist())
        self.record(episode, checkpoint=False)
        return np.array(episode.ratios), episode.reward

    def _next_generation(self, population: np.ndarray) -> None:
        self.population = population
        self.save_checkpoint()

    def run_agent(self) -> None:
        remaining = (self.episodes - len(self.history)) // self.population_size
        self.ga.evolve(self._evaluate, remaining, self.population, after=self._next_generation)

    def agent_state(self) -> dict[str, Any]:
        return {"population": self.population, "rng": self.rng.bit_generator.state}

    def load_agent_state(self, state: dict[str, Any]) -> None:
        self.population = state["population"]
        self.rng.bit_generator.state = state["rng"]
