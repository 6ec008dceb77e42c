"""The DDPG agent of AMC (He et al., ECCV 2018; mit-han-lab/amc ``lib/agent.py``): a deterministic actor and a
critic of two 300-unit hidden layers, a replay buffer, soft target updates, random actions during warm-up and
truncated-normal exploration around the actor's action afterwards, with a decaying width."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import truncnorm


@dataclass
class DDPGConfig:
    """The agent's hyper-parameters; the defaults are the paper's (and the official code's)."""

    hidden: int = 300
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    memory_per_step: int = 100
    warmup: int = 100
    init_delta: float = 0.5
    delta_decay: float = 0.95
    moving_alpha: float = 0.5
    lbound: float = 0.2
    rbound: float = 1.0


class Actor(nn.Module):
    """State -> preserve ratio in (0, 1) (a sigmoid output)."""

    def __init__(self, state_dim: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.body(state)


class Critic(nn.Module):
    """(state, action) -> Q: the state and the action each through a linear layer, summed, then two more layers."""

    def __init__(self, state_dim: int, hidden: int):
        super().__init__()
        self.state_in, self.action_in = nn.Linear(state_dim, hidden), nn.Linear(1, hidden)
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.body(self.state_in(state) + self.action_in(action))


class ReplayBuffer:
    """The most recent ``capacity`` transitions (state, action, reward, next state, terminal)."""

    def __init__(self, capacity: int, state_dim: int):
        self.capacity, self.count, self.position = capacity, 0, 0
        self.states = np.zeros((capacity, state_dim), np.float32)
        self.next_states = np.zeros((capacity, state_dim), np.float32)
        self.actions = np.zeros((capacity, 1), np.float32)
        self.rewards = np.zeros((capacity, 1), np.float32)
        self.terminals = np.zeros((capacity, 1), np.float32)

    def append(self, state: np.ndarray, action: float, reward: float, next_state: np.ndarray, terminal: bool) -> None:
        """Store one transition, overwriting the oldest when full."""
        i = self.position
        self.states[i], self.actions[i], self.rewards[i] = state, action, reward
        self.next_states[i], self.terminals[i] = next_state, float(terminal)
        self.position = (i + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def sample(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """``size`` stored transitions drawn uniformly with replacement."""
        index = rng.integers(0, self.count, size)
        return (self.states[index], self.actions[index], self.rewards[index], self.next_states[index],
                self.terminals[index])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the buffer."""
        return {key: getattr(self, key) for key in ("capacity", "count", "position", "states", "next_states",
                                                    "actions", "rewards", "terminals")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        for key, value in state.items():
            setattr(self, key, value)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """``target <- (1 - tau) * target + tau * source``, parameter by parameter."""
    with torch.no_grad():
        for goal, value in zip(target.parameters(), source.parameters()):
            goal.mul_(1 - tau).add_(value, alpha=tau)


class DDPGAgent:
    """AMC's DDPG agent for one-dimensional actions in ``[lbound, rbound]``.

    :meth:`act` gives a uniform random action during the first ``warmup`` episodes, then the actor's action plus
    truncated-normal noise of width ``init_delta * delta_decay ** (episode - warmup)``; :meth:`remember` stores a
    transition; :meth:`update` trains the critic on ``r + discount * (1 - terminal) * Q'(s', mu'(s'))`` with rewards
    centred by a moving average, the actor on ``-Q(s, mu(s))``, and soft-updates both targets.
    """

    def __init__(self, state_dim: int, steps_per_episode: int, config: DDPGConfig | None = None, seed: int = 0):
        self.config = config or DDPGConfig()
        c = self.config
        if not 0 <= c.lbound < c.rbound <= 1:
            raise ValueError(f"need 0 <= lbound < rbound <= 1, got {c.lbound} and {c.rbound}")
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
            self.actor, self.critic = Actor(state_dim, c.hidden), Critic(state_dim, c.hidden)
        self.actor_target, self.critic_target = Actor(state_dim, c.hidden), Critic(state_dim, c.hidden)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)
        self.memory = ReplayBuffer(c.memory_per_step * steps_per_episode, state_dim)
        self.rng = np.random.default_rng(seed)
        self.moving_average: float | None = None

    def delta(self, episode: int) -> float:
        """Exploration width at ``episode``."""
        return self.config.init_delta * self.config.delta_decay ** max(0, episode - self.config.warmup)

    def act(self, state: np.ndarray, episode: int, explore: bool = True) -> float:
        """The action for ``state``: random in warm-up, else the actor's, with exploration noise when ``explore``."""
        c = self.config
        if explore and episode < c.warmup:
            return float(self.rng.uniform(c.lbound, c.rbound))
        with torch.no_grad():
            mean = float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])
        if not explore:
            return float(np.clip(mean, c.lbound, c.rbound))
        sigma = self.delta(episode)
        mean = float(np.clip(mean, c.lbound, c.rbound))
        low, high = (c.lbound - mean) / sigma, (c.rbound - mean) / sigma
        return float(truncnorm.rvs(low, high, loc=mean, scale=sigma, random_state=self.rng))

    def remember(self, state: np.ndarray, action: float, reward: float, next_state: np.ndarray,
                 terminal: bool) -> None:
        """Store one transition."""
        self.memory.append(state, action, reward, next_state, terminal)

    def update(self) -> tuple[float, float]:
        """One gradient step of critic and actor on a sampled batch; returns (critic loss, actor loss)."""
        c = self.config
        states, actions, rewards, next_states, terminals = (
            torch.as_tensor(a) for a in self.memory.sample(c.batch_size, self.rng))
        batch_mean = float(rewards.mean())
        self.moving_average = batch_mean if self.moving_average is None else \
            self.moving_average + c.moving_alpha * (batch_mean - self.moving_average)
        rewards = rewards - self.moving_average
        with torch.no_grad():
            next_q = self.critic_target(next_states, self.actor_target(next_states))
            target = rewards + c.discount * (1 - terminals) * next_q
        critic_loss = nn.functional.mse_loss(self.critic(states, actions), target)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()
        actor_loss = -self.critic(states, self.actor(states)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()
        soft_update(self.actor_target, self.actor, c.tau)
        soft_update(self.critic_target, self.critic, c.tau)
        return critic_loss.item(), actor_loss.item()

    def state_dict(self) -> dict[str, Any]:
        """Networks, optimizers, replay buffer, reward baseline and generator state, for resuming."""
        return {"config": asdict(self.config), "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "memory": self.memory.state_dict(),
                "moving_average": self.moving_average, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_optimizer", "critic_optimizer"):
            getattr(self, name).load_state_dict(state[name])
        self.memory.load_state_dict(state["memory"])
        self.moving_average = state["moving_average"]
        self.rng.bit_generator.state = state["rng"]
