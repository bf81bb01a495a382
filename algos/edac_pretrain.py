"""EDAC with actor-critic pre-training: first imitate, then improve.

Implements "Efficient Offline Reinforcement Learning: First Imitate, then Improve" (Jelley, McInroe,
Devlin and Storkey, 2024, arXiv 2406.13376) on top of EDAC (An et al., 2021: SAC with N critics and a
term that diversifies their action gradients). Pre-training is sequential, because the critics of an
entropy-regularised agent value the actor's entropy too:
  1. soft behaviour cloning: the actor maximises the likelihood of dataset actions plus an entropy
     bonus, with the temperature alpha tuned towards the target entropy -|A|;
  2. actor and alpha frozen, the entropy of the actor at every next state is estimated once and the
     "soft" Monte-Carlo return (rewards plus discounted entropy bonuses) computed for every transition;
     all N critics regress onto it, with EDAC's diversity term on;
  3. EDAC continues from those networks, target networks and optimiser states.
LayerNorm follows every hidden linear layer of actor and critics. With --lam > 0 the critics regress
onto soft lambda-returns (lam = 0 is pure Monte-Carlo, lam = 1 one-step TD).

Usage:
    python algos/edac_pretrain.py --env-id walker2d-medium-v2 --lam 0.1
    python algos/edac_pretrain.py --env-id local/hopper/medium-v0 --total-steps 100000
    python algos/edac_pretrain.py --resume runs/<run-name>    # continue an interrupted run exactly
"""

import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# common/returns.py sits beside this script's folder; this lets the script run from any directory.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.returns import lambda_returns, soft_returns  # noqa: E402


@dataclass
class Args:
    env_id: str = "hopper-medium-v2"
    """a D4RL name (hopper-medium-v2, pen-human-v1, ...) mapped to Minari's id, or any Minari dataset id used verbatim (mujoco/hopper/medium-v0, local/hopper/medium-v0)"""
    seed: int = 0
    """seed for network initialisation, batch sampling and evaluation episodes"""
    total_steps: Optional[int] = None
    """gradient steps in all, pre-training included (default per dataset, as the authors: halfcheetah 100k, hopper and walker2d 500k, Adroit 300k, else 1M)"""
    pretrain_steps: Optional[int] = None
    """gradient steps of pre-training at the start of the budget, actor then critics (default per dataset, as the authors: 20k, walker2d 100k, Adroit 200k)"""
    actor_pretrain_fraction: float = 0.5
    """share of --pretrain-steps spent on soft behaviour cloning of the actor; the rest trains the critics"""
    pretrain: Literal["actor-critic", "actor", "critic", "none"] = "actor-critic"
    """what to pre-train: both (the method), actor only or critic only (the paper's ablations), or none (EDAC from scratch)"""
    lam: float = 0.0
    """lambda of the critics' pre-training targets: 0 is pure Monte-Carlo, 1 is one-step TD"""
    lambda_refresh_interval: int = 5000
    """with --lam > 0: recompute the lambda-returns over the whole dataset from the target networks every this many steps"""
    num_critics: Optional[int] = None
    """size of the critic ensemble N (default per dataset from the authors' table, else 10)"""
    eta: Optional[float] = None
    """weight of EDAC's gradient-diversity term (default per dataset from the authors' table, else 1)"""
    batch_size: int = 256
    """transitions per gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate of actor, critics and temperature"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target networks"""
    entropy_samples: int = 10
    """actions sampled per next state to estimate the actor's entropy for the soft returns"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    actor_layernorm: bool = True
    """LayerNorm after every hidden linear layer of the actor"""
    critic_layernorm: bool = True
    """LayerNorm after every hidden linear layer of the critics"""
    bootstrap_truncated: bool = True
    """at a truncated episode end, assume the last reward repeats forever in the Monte-Carlo return"""
    eval_interval: int = 5000
    """evaluate the actor every this many gradient steps (and at the end)"""
    eval_episodes: int = 10
    """evaluation episodes, run in parallel (0 skips evaluation, for datasets without an environment)"""
    eval_protocol: Literal["standard", "adroit"] = "standard"
    """adroit: ignore `terminated` until the longest human demonstration (pen 100, door 300, hammer 624, relocate 527 steps), as in the paper"""
    log_interval: int = 1000
    """write losses and speed to tensorboard every this many steps"""
    checkpoint_interval: int = 50_000
    """save a resumable checkpoint every this many steps (0 disables)"""
    resume: Optional[str] = None
    """continue the run saved in this run directory (other flags are ignored)"""
    run_name: Optional[str] = None
    """name of the run directory under runs/ (default: <dataset>__<script>__<seed>__<time>)"""
    device: str = "auto"
    """torch device: auto picks cuda when available"""


# Per-dataset settings of the paper's authors (method.md): ensemble size N, eta, budgets, pre-training steps.
ADROIT_ENVS = {"pen": 100, "door": 300, "hammer": 624, "relocate": 527}  # longest human demonstration
EDAC_ENSEMBLES = {  # (env, quality) -> (N, eta)
    ("halfcheetah", "medium"): (10, 1.0), ("halfcheetah", "medium-replay"): (10, 1.0),
    ("halfcheetah", "medium-expert"): (10, 5.0), ("halfcheetah", "expert"): (50, 5.0),
    ("walker2d", "medium"): (10, 1.0), ("walker2d", "medium-replay"): (10, 1.0),
    ("walker2d", "medium-expert"): (10, 5.0), ("walker2d", "expert"): (50, 5.0),
    ("pen", "human"): (20, 1000.0), ("pen", "cloned"): (20, 10.0),
}


def dataset_defaults(env_name: str, quality: str) -> dict:
    if env_name == "hopper":
        num_critics, eta = 50, 1.0
    elif env_name in ("door", "hammer", "relocate"):
        num_critics, eta = 50, 200.0
    else:
        num_critics, eta = EDAC_ENSEMBLES.get((env_name, quality), (10, 1.0))
    if env_name in ADROIT_ENVS:
        return dict(num_critics=num_critics, eta=eta, total_steps=300_000, pretrain_steps=200_000)
    total = {"halfcheetah": 100_000, "hopper": 500_000, "walker2d": 500_000}.get(env_name, 1_000_000)
    pretrain = 100_000 if env_name == "walker2d" else 20_000
    return dict(num_critics=num_critics, eta=eta, total_steps=total, pretrain_steps=pretrain)


# ------------------------------------------------------------------------------------- networks
def hidden_layers(in_dim: int, hidden_dim: int, depth: int, layernorm: bool) -> list:
    layers = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim)]
        layers += [nn.LayerNorm(hidden_dim, elementwise_affine=False)] if layernorm else []
        layers += [nn.ReLU()]
    return layers


def edac_init(layers, last: nn.Module) -> None:
    """EDAC's initialisation: hidden biases 0.1, last layer uniform in +-3e-3 (small initial outputs)."""
    for layer in layers:
        if isinstance(layer, (nn.Linear, VectorizedLinear)):
            nn.init.constant_(layer.bias, 0.1)
    nn.init.uniform_(last.weight, -3e-3, 3e-3)
    nn.init.uniform_(last.bias, -3e-3, 3e-3)


class VectorizedLinear(nn.Module):
    """N independent linear layers applied in one batched matmul: x [N, B, in] -> [N, B, out]."""

    def __init__(self, in_dim, out_dim, ensemble_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_dim))
        bound = 1 / math.sqrt(in_dim)  # the distribution of nn.Linear's default initialisation
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class Actor(nn.Module):
    """Tanh-Gaussian policy with 3 hidden layers and separate mean and log-std heads."""

    def __init__(self, obs_dim, act_dim, max_action, hidden_dim, layernorm):
        super().__init__()
        self.trunk = nn.Sequential(*hidden_layers(obs_dim, hidden_dim, 3, layernorm))
        self.mean = nn.Linear(hidden_dim, act_dim)
        self.log_std = nn.Linear(hidden_dim, act_dim)
        edac_init(self.trunk, self.mean)
        edac_init([], self.log_std)
        self.max_action = max_action

    def distribution(self, obs):
        h = self.trunk(obs)
        return self.mean(h), self.log_std(h).clamp(-5.0, 2.0)

    def forward(self, obs, noise):
        """Reparameterised sample a = max_action * tanh(mean + std * noise) and its log-probability."""
        mean, log_std = self.distribution(obs)
        pre_tanh = mean + log_std.exp() * noise
        return self.max_action * torch.tanh(pre_tanh), self.log_prob_pre_tanh(mean, log_std, pre_tanh)

    def log_prob_pre_tanh(self, mean, log_std, pre_tanh):
        gaussian = (-0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # Change of variables: log|d a / d u| = log(max_action) + log(1 - tanh(u)^2), written stably.
        log_det = (2 * (math.log(2) - pre_tanh - F.softplus(-2 * pre_tanh)) + math.log(self.max_action)).sum(-1)
        return gaussian - log_det

    def log_prob(self, obs, action):
        """log pi(a|s) of given (dataset) actions, through atanh of the clipped action."""
        mean, log_std = self.distribution(obs)
        pre_tanh = torch.atanh((action / self.max_action).clamp(-1 + 1e-6, 1 - 1e-6))
        return self.log_prob_pre_tanh(mean, log_std, pre_tanh)

    def deterministic(self, obs):
        return self.max_action * torch.tanh(self.distribution(obs)[0])


class Critic(nn.Module):
    """N critics with 3 hidden layers as one vectorised ensemble: Q(s, a) -> [N, B].
    The action may be given per member, [N, B, A], to take each member's gradient with respect to it."""

    def __init__(self, obs_dim, act_dim, hidden_dim, layernorm, num_critics):
        super().__init__()
        layers = []
        for i in range(3):
            layers += [VectorizedLinear(obs_dim + act_dim if i == 0 else hidden_dim, hidden_dim, num_critics)]
            layers += [nn.LayerNorm(hidden_dim, elementwise_affine=False)] if layernorm else []
            layers += [nn.ReLU()]
        last = VectorizedLinear(hidden_dim, 1, num_critics)
        edac_init(layers, last)
        self.net = nn.Sequential(*layers, last)
        self.num_critics = num_critics

    def forward(self, obs, action):
        obs = obs.expand(self.num_critics, *obs.shape[-2:])
        action = action.expand(self.num_critics, *action.shape[-2:])
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


# ------------------------------------------------------------------------------------- data
D4RL_NAME = re.compile(r"^(?P<env>[a-z0-9]+)-(?P<quality>[a-z-]+?)-v\d+$")
MINARI_MUJOCO = ("halfcheetah", "hopper", "walker2d", "ant")


def resolve_dataset(env_id: str) -> list:
    """D4RL-style name -> list of Minari dataset ids (medium-expert combines two); Minari ids pass through."""
    if "/" in env_id:
        return [env_id]
    match = D4RL_NAME.match(env_id)
    if match is None:
        raise SystemExit(f"error: '{env_id}' is neither a D4RL name like hopper-medium-v2 nor a Minari dataset id "
                         "like mujoco/hopper/medium-v0. Pass one of those to --env-id.")
    env_name, quality = match["env"], match["quality"]
    if env_name in ADROIT_ENVS and quality in ("human", "cloned", "expert"):
        return [f"D4RL/{env_name}/{quality}-v2"]
    if env_name in MINARI_MUJOCO and quality in ("medium", "expert"):
        return [f"mujoco/{env_name}/{quality}-v0"]
    if env_name in MINARI_MUJOCO and quality == "medium-expert":
        return [f"mujoco/{env_name}/medium-v0", f"mujoco/{env_name}/expert-v0"]
    hosted = ", ".join(f"mujoco/{env_name}/{q}-v0" for q in ("simple", "medium", "expert")) if env_name in MINARI_MUJOCO else \
        "mujoco/<env>/{simple,medium,expert}-v0, D4RL/{pen,door,hammer,relocate}/{human,cloned,expert}-v2"
    raise SystemExit(f"error: Minari does not host the D4RL dataset '{env_id}'. Available: {hosted}. "
                     f"For medium-replay and other kinds, make one locally with `python common/make_dataset.py` "
                     f"and pass its id (e.g. local/{env_name}/medium-replay-v0).")


def dataset_name_parts(dataset_id: str) -> tuple:
    """'mujoco/hopper/medium-v0' -> ('hopper', 'medium')."""
    parts = dataset_id.split("/")
    return parts[-2].lower() if len(parts) > 1 else "", re.sub(r"-v\d+$", "", parts[-1])


def load_minari(dataset_id: str):
    if dataset_id in minari.list_local_datasets():
        return minari.load_dataset(dataset_id)
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as e:  # network errors, unknown remote ids, incompatible versions
        raise SystemExit(
            f"error: dataset '{dataset_id}' is not on this machine (MINARI_DATASETS_PATH="
            f"{os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}) and could not be downloaded "
            f"({type(e).__name__}: {str(e)[:200]}). Download it where there is internet with `minari download "
            f"{dataset_id}` and copy it here, or make a local dataset with `python common/make_dataset.py` "
            "and pass its id, e.g. --env-id local/hopper/medium-v0.")


def flatten_episodes(datasets) -> dict:
    """Episodes -> flat arrays of transitions (obs, action, reward, next_obs, terminated, truncated)."""
    columns = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminations", "truncations")}
    for dataset in datasets:
        for episode in dataset.iterate_episodes():
            if not isinstance(episode.observations, np.ndarray):
                raise SystemExit(f"error: {dataset.spec.dataset_id} has structured (dict) observations; "
                                 "this script needs flat Box observations.")
            columns["observations"].append(episode.observations[:-1])
            columns["next_observations"].append(episode.observations[1:])
            columns["actions"].append(episode.actions)
            columns["rewards"].append(episode.rewards)
            columns["terminations"].append(episode.terminations)
            columns["truncations"].append(episode.truncations)
    if not columns["rewards"] or sum(len(r) for r in columns["rewards"]) == 0:
        raise SystemExit("error: the dataset holds no transitions.")
    data = {k: np.concatenate(v) for k, v in columns.items()}
    data["terminations"], data["truncations"] = data["terminations"].astype(bool), data["truncations"].astype(bool)
    return data


def check_data(data: dict, action_space) -> None:
    """Refuse data that would silently poison training, with a message saying what is wrong."""
    n = len(data["rewards"])
    for key in ("observations", "actions", "next_observations", "terminations", "truncations"):
        if len(data[key]) != n:
            raise SystemExit(f"error: the dataset's {key} hold {len(data[key])} entries for {n} rewards; "
                             "every transition needs one of each.")
    for key in ("observations", "actions", "rewards", "next_observations"):
        bad = ~np.isfinite(data[key].reshape(n, -1)).all(axis=1)
        if bad.any():
            raise SystemExit(f"error: the dataset's {key} contain NaN or infinite values at {bad.sum()} transitions "
                             f"(first at index {np.argmax(bad)}). Clean or drop those episodes.")
    low, high = action_space.low, action_space.high
    outside = ((data["actions"] < low - 1e-4) | (data["actions"] > high + 1e-4)).any(axis=1)
    if outside.any():
        raise SystemExit(f"error: {outside.sum()} dataset actions lie outside the action space [{low.min()}, "
                         f"{high.max()}] (first at index {np.argmax(outside)}); a tanh actor cannot imitate them.")


# ------------------------------------------------------------------------------------- pre-training and EDAC
def polyak_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    # One fused call over all tensors instead of a Python loop per parameter.
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def critic_loss_with_diversity(critic, obs, actions, target, eta):
    """Regression of all N critics onto `target`, plus EDAC's diversity term, from ONE forward pass:
    each member gets its own copy of the actions, so one backward gives every member's action gradient.
    Diversity = mean over the batch of sum_{i != j} <g_i, g_j> / (N - 1), g_i = grad_a Q_i / |grad_a Q_i|."""
    actions = actions.expand(critic.num_critics, -1, -1).clone().requires_grad_(True)
    q = critic(obs, actions)
    regression = (q - target).pow(2).mean(1).sum()
    grads = torch.autograd.grad(q.sum(), actions, create_graph=True)[0]
    grads = grads / (grads.norm(dim=-1, keepdim=True) + 1e-10)
    # sum_{i != j} <g_i, g_j> = |sum_i g_i|^2 - sum_i |g_i|^2
    cosine_sum = grads.sum(0).pow(2).sum(-1) - grads.pow(2).sum((0, 2))
    diversity = cosine_sum.mean() / (critic.num_critics - 1)
    return regression + eta * diversity, regression, diversity


def soft_bc_step(batch, noise, actor, log_alpha, actor_opt, alpha_opt, target_entropy):
    """Soft behaviour cloning: maximise log pi(a|s) of dataset actions plus the entropy bonus."""
    alpha = log_alpha.exp().detach()
    # One pass through the trunk serves both the sampled action and the dataset action.
    mean, log_std = actor.distribution(batch["observations"])
    log_prob = actor.log_prob_pre_tanh(mean, log_std, mean + log_std.exp() * noise)
    dataset_pre_tanh = torch.atanh((batch["actions"] / actor.max_action).clamp(-1 + 1e-6, 1 - 1e-6))
    actor_loss = (alpha * log_prob - actor.log_prob_pre_tanh(mean, log_std, dataset_pre_tanh)).mean()
    actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_opt.step()
    alpha_loss = (-log_alpha * (log_prob.detach() + target_entropy)).mean()
    alpha_opt.zero_grad(set_to_none=True)
    alpha_loss.backward()
    alpha_opt.step()
    return {"pretrain_actor": actor_loss, "alpha": alpha_loss}


def critic_pretrain_step(batch, returns_to_go, critic, critic_opt, args):
    loss, regression, diversity = critic_loss_with_diversity(critic, batch["observations"], batch["actions"], returns_to_go, args.eta)
    critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    critic_opt.step()
    return {"pretrain_critic": regression, "diversity": diversity}


@torch.no_grad()
def dataset_entropies(data, actor, sampler, samples, chunk=65536):
    """H(s') = -log pi(a~|s'), a~ ~ pi(.|s'), averaged over a few samples, for every next state."""
    entropies = []
    for start in range(0, len(data["rewards"]), chunk):
        next_obs = data["next_observations"][start:start + chunk]
        total = 0.0
        for _ in range(samples):
            noise = torch.randn(next_obs.shape[0], data["actions"].shape[1], device=next_obs.device, generator=sampler)
            total = total - actor(next_obs, noise)[1]
        entropies.append(total / samples)
    return torch.cat(entropies)


@torch.no_grad()
def dataset_soft_lambda_returns(data, next_entropies, actor, target_critic, alpha, sampler, args, chunk=65536):
    """Soft lambda-returns. The soft reward r + gamma*alpha*(1-term)*H(s') already holds the entropy part
    of V(s') = min_i Q'_i(s', a~') - alpha*log pi(a~'|s'), so the bootstrap value is min_i Q'_i(s', a~')."""
    next_values = []
    for start in range(0, len(data["rewards"]), chunk):
        next_obs = data["next_observations"][start:start + chunk]
        noise = torch.randn(next_obs.shape[0], data["actions"].shape[1], device=next_obs.device, generator=sampler)
        next_values.append(target_critic(next_obs, actor(next_obs, noise)[0]).min(0).values)
    next_values = torch.cat(next_values).double().cpu().numpy()
    terminations = data["terminations"].cpu().numpy().astype(bool)
    soft_rewards = data["rewards"].double().cpu().numpy() + args.gamma * alpha * (~terminations) * next_entropies.double().cpu().numpy()
    returns = lambda_returns(soft_rewards, next_values, terminations, data["truncations"].cpu().numpy(),
                             args.gamma, args.lam, args.bootstrap_truncated)
    return torch.as_tensor(returns, dtype=torch.float32, device=data["rewards"].device)


def edac_step(batch, noise, next_noise, actor, critic, target_critic, log_alpha, actor_opt, critic_opt, alpha_opt, target_entropy, args):
    """One EDAC update: temperature, actor (against the ensemble's minimum), critics with diversity."""
    action, log_prob = actor(batch["observations"], noise)
    alpha_loss = (-log_alpha * (log_prob.detach() + target_entropy)).mean()
    alpha_opt.zero_grad(set_to_none=True)
    alpha_loss.backward()
    alpha_opt.step()
    alpha = log_alpha.exp().detach()

    critic.requires_grad_(False)  # the actor's loss needs dQ/da, not gradients for the critics' weights
    q_pi = critic(batch["observations"], action).min(0).values
    critic.requires_grad_(True)
    actor_loss = (alpha * log_prob - q_pi).mean()
    actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_opt.step()

    with torch.no_grad():
        next_action, next_log_prob = actor(batch["next_observations"], next_noise)
        next_v = target_critic(batch["next_observations"], next_action).min(0).values - alpha * next_log_prob
        # Bootstrap through truncations (time limits), never through true terminals.
        td_target = batch["rewards"] + args.gamma * (1.0 - batch["terminations"]) * next_v
    critic_loss, regression, diversity = critic_loss_with_diversity(critic, batch["observations"], batch["actions"], td_target, args.eta)
    critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    critic_opt.step()
    return {"critic": regression, "diversity": diversity, "actor": actor_loss, "alpha": alpha_loss}


class LossLog:
    """Keeps each step's losses on the device (no host sync per step). `check` stops the run, naming the
    loss and the exact step, if any became NaN or infinite; `flush` also returns the window's means."""

    def __init__(self, names, interval, device, start_step):
        self.names, self.interval, self.start = list(names), interval, start_step
        self.values = torch.zeros(interval, len(self.names), device=device)
        self.counts = [0] * len(self.names)

    def add(self, step, losses):
        for name, value in losses.items():
            self.values[step % self.interval, self.names.index(name)] = value.detach()
            self.counts[self.names.index(name)] += 1

    def check(self):
        bad = ~torch.isfinite(self.values)
        if bad.any():
            rows, cols = bad.nonzero(as_tuple=True)
            steps = self.start + (rows - self.start) % self.interval  # the window's steps, in order
            first = int(steps.argmin())
            value = self.values[rows[first], cols[first]].item()
            raise FloatingPointError(f"the {self.names[cols[first]]} loss became {value} at step {int(steps[first]) + 1}")

    def flush(self, step):
        self.check()
        sums = self.values.sum(0).tolist()
        means = {n: total / c for n, total, c in zip(self.names, sums, self.counts) if c}
        self.values.zero_()
        self.counts, self.start = [0] * len(self.names), step
        return means


# ------------------------------------------------------------------------------------- evaluation
def make_eval_envs(dataset, num_envs):
    try:
        return [dataset.recover_environment(eval_env=True) for _ in range(num_envs)]
    except Exception as e:
        raise SystemExit(f"error: could not recover the evaluation environment of {dataset.spec.dataset_id} "
                         f"({type(e).__name__}: {str(e)[:200]}). Install its environment package, or train "
                         "without evaluation with --eval-episodes 0.")


@torch.no_grad()
def evaluate(actor, envs, obs_mean, obs_std, seed, ignore_terminated_until, device):
    """Run one episode in each env at once, one batched actor call per step; returns undiscounted returns.
    (A hand-stepped batch rather than gym.vector: finished episodes stop costing simulation time, and the
    Adroit protocol needs to ignore `terminated` early, which auto-resetting vector envs cannot.)"""
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns, done, steps = np.zeros(len(envs)), np.zeros(len(envs), dtype=bool), 0
    while not done.all():
        steps += 1
        obs_t = (torch.as_tensor(obs, dtype=torch.float32, device=device) - obs_mean) / obs_std
        actions = actor.deterministic(obs_t).cpu().numpy()
        for i in np.flatnonzero(~done):
            obs[i], reward, terminated, truncated, _ = envs[i].step(actions[i])
            returns[i] += reward
            done[i] = truncated or (terminated and steps >= ignore_terminated_until)
    return returns


def normalized_score(dataset, returns):
    """Score x 100 from the dataset's reference returns (0 random, 100 expert); raw return without them."""
    if dataset.storage.metadata.get("ref_min_score") is None or dataset.storage.metadata.get("ref_max_score") is None:
        return float(np.mean(returns))
    return float(np.mean(minari.get_normalized_score(dataset, returns))) * 100


# ------------------------------------------------------------------------------------- checkpoints
def save_atomic(obj, path):
    """Write to a temporary file, then rename: an interruption never leaves a half-written file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def rng_states(sampler):
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "sampler": sampler.get_state()}


def set_rng_states(states, sampler):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    sampler.set_state(states["sampler"])


# ------------------------------------------------------------------------------------- main
def check_args(args: Args) -> None:
    problems = []
    if not 0.0 <= args.lam <= 1.0:
        problems.append(f"--lam must lie in [0, 1] (0 is Monte-Carlo, 1 is one-step TD), got {args.lam}")
    for name in ("total_steps", "batch_size", "hidden_dim", "eval_interval", "log_interval", "entropy_samples", "lambda_refresh_interval"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("pretrain_steps", "eval_episodes", "checkpoint_interval"):
        value = getattr(args, name)
        if value is not None and value < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if args.pretrain_steps is not None and args.total_steps is not None and args.pretrain_steps > args.total_steps:
        problems.append(f"--pretrain-steps ({args.pretrain_steps}) cannot exceed --total-steps ({args.total_steps}): "
                        "pre-training counts inside the total budget")
    if args.num_critics is not None and args.num_critics < 2:
        problems.append(f"--num-critics must be at least 2 (EDAC's diversity term compares critics), got {args.num_critics}")
    if args.eta is not None and args.eta < 0:
        problems.append(f"--eta must not be negative, got {args.eta}")
    if not 0.0 <= args.actor_pretrain_fraction <= 1.0:
        problems.append(f"--actor-pretrain-fraction must lie in [0, 1], got {args.actor_pretrain_fraction}")
    if not 0.0 < args.tau <= 1.0 or not 0.0 <= args.gamma < 1.0 or args.learning_rate <= 0:
        problems.append("--tau must lie in (0, 1], --gamma in [0, 1) and --learning-rate be positive")
    if problems:
        raise SystemExit("error: " + "; ".join(problems) + ".")


def main(args: Args) -> None:
    resume_dir = args.resume
    if resume_dir is not None:
        checkpoint_path = os.path.join(resume_dir, "checkpoint.pt")
        if not os.path.exists(checkpoint_path):
            raise SystemExit(f"error: no checkpoint.pt in '{resume_dir}' to resume from; pass the run directory "
                             "of a run started with --checkpoint-interval > 0.")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)  # any device may resume
        args = Args(**{**checkpoint["args"], "resume": resume_dir})
    check_args(args)

    dataset_ids = resolve_dataset(args.env_id)
    env_name, quality = dataset_name_parts(dataset_ids[0])
    defaults = dataset_defaults(env_name, quality)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pretrain == "none":
        args.pretrain_steps = 0
    check_args(args)  # again, now that per-dataset defaults have filled the gaps

    datasets = [load_minari(dataset_id) for dataset_id in dataset_ids]
    data = flatten_episodes(datasets)
    action_space = datasets[0].action_space
    check_data(data, action_space)
    envs = make_eval_envs(datasets[0], args.eval_episodes) if args.eval_episodes > 0 else []
    ignore_terminated_until = ADROIT_ENVS.get(env_name, 0) if args.eval_protocol == "adroit" else 0

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if resume_dir is None:
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
    sampler = torch.Generator(device=device)
    sampler.manual_seed(args.seed)

    # States normalised by the dataset's statistics; soft returns come after the actor's pre-training.
    obs_mean = data["observations"].mean(0)
    obs_std = data["observations"].std(0) + 1e-3
    data["observations"] = (data["observations"] - obs_mean) / obs_std
    data["next_observations"] = (data["next_observations"] - obs_mean) / obs_std
    # The whole dataset lives on the training device; batches are sampled there.
    data = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in data.items()}
    returns_to_go = next_entropies = None
    obs_mean_t = torch.as_tensor(obs_mean, dtype=torch.float32, device=device)
    obs_std_t = torch.as_tensor(obs_std, dtype=torch.float32, device=device)
    num_transitions = len(data["rewards"])

    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    max_action = float(action_space.high[0])
    actor = Actor(obs_dim, act_dim, max_action, args.hidden_dim, args.actor_layernorm).to(device)
    critic = Critic(obs_dim, act_dim, args.hidden_dim, args.critic_layernorm, args.num_critics).to(device)
    target_critic = Critic(obs_dim, act_dim, args.hidden_dim, args.critic_layernorm, args.num_critics).to(device)
    target_critic.load_state_dict(critic.state_dict())
    log_alpha = torch.zeros((), device=device, requires_grad=True)
    target_entropy = -float(act_dim)
    # Fused Adam: one kernel updates all of a network's parameters (CPU and GPU alike).
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, fused=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.learning_rate, fused=True)

    # Pre-training phases inside the budget: soft BC of the actor on [0, actor_end), the critics on
    # [actor_end, pretrain_end); EDAC after. An ablation that skips a phase skips its steps.
    actor_share = round(args.pretrain_steps * args.actor_pretrain_fraction)
    actor_end = actor_share if args.pretrain in ("actor-critic", "actor") else 0
    pretrain_end = actor_end + (args.pretrain_steps - actor_share if args.pretrain in ("actor-critic", "critic") else 0)
    phase_name = lambda step: "soft BC" if step < actor_end else "critic pre-training" if step < pretrain_end else "EDAC"

    start_step = 0
    run_name = args.run_name or f"{args.env_id.replace('/', '_')}__{Path(__file__).stem}__{args.seed}__{int(time.time())}"
    run_dir = resume_dir or os.path.join("runs", run_name)
    if resume_dir is not None:
        for module, key in ((actor, "actor"), (critic, "critic"), (target_critic, "target_critic"),
                            (actor_opt, "actor_opt"), (critic_opt, "critic_opt"), (alpha_opt, "alpha_opt")):
            module.load_state_dict(checkpoint[key])
        with torch.no_grad():
            log_alpha.copy_(checkpoint["log_alpha"])
        if checkpoint["next_entropies"] is not None:
            returns_to_go, next_entropies = checkpoint["returns_to_go"].to(device), checkpoint["next_entropies"].to(device)
        set_rng_states(checkpoint["rng"], sampler)
        start_step = checkpoint["step"]
        print(f"resuming {run_dir} at step {start_step} ({checkpoint['phase']})")
    os.makedirs(run_dir, exist_ok=True)
    # purge_step drops events logged after the checkpoint, so a resumed run has no duplicated steps.
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if resume_dir else None)
    if resume_dir is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
        writer.add_text("eval/protocol", args.eval_protocol)

    def save_checkpoint(step):
        save_atomic({
            "actor": actor.state_dict(), "critic": critic.state_dict(), "target_critic": target_critic.state_dict(),
            "actor_opt": actor_opt.state_dict(), "critic_opt": critic_opt.state_dict(), "alpha_opt": alpha_opt.state_dict(),
            "log_alpha": log_alpha.detach(), "returns_to_go": returns_to_go, "next_entropies": next_entropies,
            "step": step, "phase": phase_name(step), "rng": rng_states(sampler),
            "obs_mean": obs_mean, "obs_std": obs_std, "args": asdict(args),
        }, os.path.join(run_dir, "checkpoint.pt"))

    loss_log = LossLog(["pretrain_actor", "pretrain_critic", "critic", "diversity", "actor", "alpha"], args.log_interval, device, start_step)
    progress = tqdm(total=args.total_steps, initial=start_step, desc=run_name if resume_dir is None else run_dir, unit="step")
    last_time, last_step, score = time.time(), start_step, None
    for step in range(start_step, args.total_steps):
        idx = torch.randint(num_transitions, (args.batch_size,), device=device, generator=sampler)
        batch = {k: v[idx] for k, v in data.items()}
        noise, next_noise = torch.randn(2, args.batch_size, act_dim, device=device, generator=sampler)
        if step < actor_end:
            losses = soft_bc_step(batch, noise, actor, log_alpha, actor_opt, alpha_opt, target_entropy)
        elif step < pretrain_end:
            if next_entropies is None:  # first critic step: actor and alpha stay frozen until EDAC starts
                next_entropies = dataset_entropies(data, actor, sampler, args.entropy_samples)
                returns_to_go = torch.as_tensor(soft_returns(
                    data["rewards"].cpu().numpy(), next_entropies.double().cpu().numpy(), data["terminations"].cpu().numpy(),
                    data["truncations"].cpu().numpy(), args.gamma, log_alpha.exp().item(), args.bootstrap_truncated),
                    dtype=torch.float32, device=device)
            if args.lam > 0 and (step - actor_end) % args.lambda_refresh_interval == 0:
                returns_to_go = dataset_soft_lambda_returns(data, next_entropies, actor, target_critic, log_alpha.exp().item(), sampler, args)
            losses = critic_pretrain_step(batch, returns_to_go[idx], critic, critic_opt, args)
            polyak_update(critic, target_critic, args.tau)
        else:
            losses = edac_step(batch, noise, next_noise, actor, critic, target_critic, log_alpha, actor_opt,
                               critic_opt, alpha_opt, target_entropy, args)
            polyak_update(critic, target_critic, args.tau)
        loss_log.add(step, losses)

        done_steps = step + 1
        try:
            if done_steps % args.log_interval == 0 or done_steps == args.total_steps:
                for name, value in loss_log.flush(done_steps).items():
                    writer.add_scalar(f"losses/{name}", value, done_steps)
                writer.add_scalar("charts/SPS", (done_steps - last_step) / (time.time() - last_time), done_steps)
                last_time, last_step = time.time(), done_steps
            if args.checkpoint_interval and done_steps % args.checkpoint_interval == 0:
                loss_log.check()  # never checkpoint a diverged model
        except FloatingPointError as e:
            raise SystemExit(f"error: {e}; stopping. The last good checkpoint in {run_dir} is intact; "
                             "lower --learning-rate or check the data.")
        if envs and (done_steps % args.eval_interval == 0 or done_steps == args.total_steps):
            eval_start = time.time()
            returns = evaluate(actor, envs, obs_mean_t, obs_std_t, args.seed * 100_000 + done_steps, ignore_terminated_until, device)
            score = normalized_score(datasets[0], returns)
            writer.add_scalar("eval/normalized_score", score, done_steps)
            writer.add_scalar("eval/return", float(np.mean(returns)), done_steps)
            writer.add_scalar("charts/eval_seconds", time.time() - eval_start, done_steps)
            progress.set_postfix(score=f"{score:.1f}")
            last_time += time.time() - eval_start  # keep evaluation out of the SPS figure
        if args.checkpoint_interval and done_steps % args.checkpoint_interval == 0:
            save_checkpoint(done_steps)  # after this step's logs and evaluation, which resuming keeps
        progress.update(1)
    progress.close()

    torch.save({"actor": actor.state_dict(), "critic": critic.state_dict(), "log_alpha": log_alpha.detach(),
                "obs_mean": obs_mean, "obs_std": obs_std, "args": asdict(args)}, os.path.join(run_dir, "model.pt"))
    writer.close()
    print(f"saved {os.path.join(run_dir, 'model.pt')}" + (f"; final normalised score {score:.1f}" if score is not None else ""))


if __name__ == "__main__":
    main(tyro.cli(Args))
