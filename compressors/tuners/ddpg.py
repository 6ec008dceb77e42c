"""AMC's DDPG tuner (He et al., ECCV 2018): an agent walks the network's prunable groups in topological order,
choosing each one's preserve ratio from a ten-feature state; the action wall keeps the MACs (or latency) budget;
the held-out accuracy of the finished policy rewards every step of the episode."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from .agent import DDPGAgent, DDPGConfig
from .env import CompressionEnv, Episode
from .search import SearchTuner


def run_episode(env: CompressionEnv, agent: DDPGAgent, episode: int, learn: bool = True) -> Episode:
    """One episode: act at every step, score the policy, give its reward to every transition, and (after warm-up)
    take one agent update per transition, as the official code does."""
    state = env.reset()
    transitions = []
    done = False
    while not done:
        action = agent.act(state, episode, explore=learn)
        next_state, done = env.step(action)
        transitions.append((state, action, next_state, done))
        state = next_state
    outcome = env.finish(episode)
    if learn:
        for state, action, next_state, done in transitions:
            agent.remember(state, action, outcome.reward, next_state, done)
        if episode >= agent.config.warmup:
            for _ in transitions:
                agent.update()
    return outcome


class DDPGTuner(SearchTuner):
    """DDPG search of per-group preserve ratios (see :class:`~compressors.tuners.search.SearchTuner` for the shared
    arguments). Agent hyper-parameters are keyword arguments named as in :class:`DDPGConfig` (``warmup=100``,
    ``hidden=300``, ``tau=0.01``, ``init_delta=0.5``, ``delta_decay=0.95``, ``batch_size=64`` …); the action's
    ``lbound`` is the tuner's. ``result.history`` holds every episode (warm-up included)."""

    name = "DDPG"

    def __init__(self, origin_net, trainloader, valloader, flops_target: float = 0.5, compressor: Any = "l2",
                 episodes: int = 300, seed: int = 0, checkpointfolder=None, device=None, verbose: bool = False,
                 **options: Any):
        names = {f.name for f in fields(DDPGConfig)} - {"lbound", "rbound"}
        agent_options = {key: options.pop(key) for key in list(options) if key in names}
        super().__init__(origin_net, trainloader, valloader, flops_target, compressor, episodes, seed,
                         checkpointfolder, device, verbose, **options)
        self.config = DDPGConfig(lbound=self.lbound, **agent_options)
        self.env = CompressionEnv(self.wall, self.encoder, self.scorer)
        self.agent = DDPGAgent(self.encoder.dim, self.env.steps, self.config, self.seed)

    def run_agent(self) -> None:
        for episode in range(len(self.history), self.episodes):
            self.record(run_episode(self.env, self.agent, episode))

    def agent_state(self) -> dict[str, Any]:
        return self.agent.state_dict()

    def load_agent_state(self, state: dict[str, Any]) -> None:
        self.agent.load_state_dict(state)
