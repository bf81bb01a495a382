"""TD3+BC+CQL with actor-critic pre-training: first imitate, then improve, on little data.

Implements "Efficient Offline Reinforcement Learning: First Imitate, then Improve" (Jelley, McInroe,
Devlin and Storkey, 2024, arXiv 2406.13376) on top of TD3+BC (Fujimoto and Gu, 2021):
  1. compute the Monte-Carlo return-to-go of every transition in the dataset;
  2. pre-train the actor by behaviour cloning and both critics by regression onto those returns,
     jointly on the same batches, so actor and critic start as a consistent pair that already values
     the behaviour policy;
  3. continue with TD3+BC from those networks, target networks and optimiser states.

By default LayerNorm follows every hidden linear layer of actor and critic. For small or stochastic data,
--lam > 0 makes the critics regress onto lambda-returns (0 is pure Monte-Carlo, 1 one-step TD): they
first fit the Monte-Carlo returns for one --lambda-refresh-interval, and only then are the lambda-returns
computed from them, and recomputed every interval after that.
For data-limited tasks (Adroit) the critics also carry the CQL regulariser (Kumar et al., 2020), in
pre-training and in TD3+BC, so that they do not overvalue actions the data never shows:
  R = sum_j [ mean_s logsumexp_k Q_j(s, u_k) - mean Q_j(s, a) ],  u_k ~ U[-1, 1]^|A|,
  critic loss = L / |sg(L)| + cql_weight * R / |sg(R)|  (each term scaled to unit size).

Usage:
    python algos/td3bc_cql_pretrain.py --env-id pen-human-v1 --eval-protocol adroit
    python algos/td3bc_cql_pretrain.py --env-id local/hopper/medium-v0 --total-steps 100000
    python algos/td3bc_cql_pretrain.py --resume runs/<run-name>    # continue an interrupted run exactly
"""

import copy
import difflib
import hashlib
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# common/returns.py sits beside this script's folder; this lets the script run from any directory. A copy
# of the script elsewhere finds returns.py beside it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    from common.returns import lambda_returns, mc_returns  # noqa: E402
except ModuleNotFoundError:
    try:
        from returns import lambda_returns, mc_returns  # noqa: E402
    except ImportError:
        raise SystemExit("error: this script needs returns.py beside it (common/returns.py of the project it comes "
                         "from): copy that file next to the script.")


@dataclass
class Args:
    env_id: str = "hopper-medium-v2"
    """a D4RL name (hopper-medium-v2, pen-human-v1, ...) mapped to Minari's id, or any Minari dataset id
    used verbatim (mujoco/hopper/medium-v0, local/hopper/medium-v0)"""
    seed: int = 0
    """seed for network initialisation, batch sampling and evaluation episodes"""
    total_steps: Optional[int] = None
    """gradient steps in all, pre-training included (None: the authors' budget for the dataset, halfcheetah
    100k, hopper and walker2d 500k, Adroit 300k, else 1M)"""
    pretrain_steps: Optional[int] = None
    """gradient steps of pre-training at the start of the budget (None: per dataset, 10k, walker2d 20k,
    Adroit 200k)"""
    pretrain: Literal["actor-critic", "actor", "critic", "none"] = "actor-critic"
    """what to pre-train: both (the method), actor only or critic only (the paper's ablations), or none
    (TD3+BC from scratch)"""
    lam: float = 0.0
    """lambda of the critics' pre-training targets: 0 is pure Monte-Carlo, 1 is one-step TD"""
    lambda_refresh_interval: int = 10000
    """with --lam > 0: the critics fit the Monte-Carlo returns for this many steps before the first
    lambda-returns are computed from the target networks, and these are recomputed every this many steps.
    Lambda-returns take the level of the critics they bootstrap from, which --critic-init paper critics reach
    in about 10k steps, mean-target ones in 2k-5k"""
    critic_init: Literal["paper", "mean-target"] = "paper"
    """paper: the usual initialisation; mean-target: each critic's output bias starts at the mean of its
    pre-training targets (the Monte-Carlo returns), so pre-training fits the shape of Q, not its level (when
    the critics are pre-trained)"""
    alpha: Optional[float] = None
    """TD3+BC's weight on Q in the actor loss (None: per dataset, halfcheetah 20, hopper 10, walker2d 5
    for medium data, 2.5 for random/expert/medium-expert, Adroit 1)"""
    batch_size: int = 256
    """transitions per gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate of actor and critics"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target networks"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise (times max action)"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise (times max action)"""
    policy_freq: int = 2
    """TD3 updates the actor and the targets once per this many critic updates"""
    cql_weight: float = 1.0
    """weight of the CQL regulariser against the critics' regression or TD loss, both scaled to unit size"""
    cql_num_actions: int = 10
    """uniformly random actions per state in the CQL logsumexp"""
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
    """adroit: ignore `terminated` until the longest human demonstration (pen 100, door 300, hammer 624,
    relocate 527 steps), as in the paper"""
    log_interval: int = 1000
    """write losses and speed to tensorboard every this many steps"""
    checkpoint_interval: int = 50_000
    """save a resumable checkpoint every this many steps (0: only when interrupted and at the end)"""
    resume: Optional[str] = None
    """continue the run saved in this run directory (or its checkpoint.pt) with its own settings (None: start a
    new run). Only --total-steps (to extend it), --eval-interval, --eval-episodes, the logging, checkpoint and
    tracking flags, and --threads, --device and --compile may change (these three change the last bits of the
    arithmetic, so the run is then no longer exact)"""
    run_name: Optional[str] = None
    """name of the run directory under runs/ (None: <dataset>__<script>__<seed>__<time>)"""
    device: str = "auto"
    """torch device: auto picks cuda when available"""
    threads: Optional[int] = None
    """torch CPU threads (None: one per core); give each of several runs on one machine its share"""
    compile: bool = False
    """replay each update step as one CUDA graph on GPUs (small updates are bound by kernel launches);
    torch.compile the networks on CPUs"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: the hidden layers' matmuls in bf16, everything else in fp32 (faster on CPUs with bf16 units)"""
    track: bool = False
    """mirror the tensorboard logs to Weights & Biases (pip install wandb)"""
    wandb_project_name: str = "first-imitate-then-improve"
    """W&B project, with --track"""
    wandb_entity: Optional[str] = None
    """W&B team or user, with --track (None: your W&B default)"""


# Per-dataset settings of the paper's authors: TD3+BC's alpha, budgets, pre-training steps.
ADROIT_DEMO_LENGTHS = {"pen": 100, "door": 300, "hammer": 624, "relocate": 527}  # steps, the longest human one


def dataset_defaults(env_name: str, quality: str) -> dict:
    if env_name in ADROIT_DEMO_LENGTHS:
        return dict(alpha=1.0, total_steps=300_000, pretrain_steps=200_000)
    medium_like = any(q in quality for q in ("medium", "replay")) and "expert" not in quality
    alpha = {"halfcheetah": 20.0, "hopper": 10.0, "walker2d": 5.0}.get(env_name, 2.5) if medium_like else 2.5
    total = {"halfcheetah": 100_000, "hopper": 500_000, "walker2d": 500_000}.get(env_name, 1_000_000)
    pretrain = 20_000 if env_name == "walker2d" else 10_000
    return dict(alpha=alpha, total_steps=total, pretrain_steps=pretrain)


# ================================================================================================ networks
def hidden_layers(in_dim: int, hidden_dim: int, depth: int, layernorm: bool, linear=nn.Linear) -> list:
    """depth x (linear layer, LayerNorm without affine parameters, ReLU)."""
    layers = []
    for i in range(depth):
        layers += [linear(in_dim if i == 0 else hidden_dim, hidden_dim)]
        layers += [nn.LayerNorm(hidden_dim, elementwise_affine=False)] if layernorm else []
        layers += [nn.ReLU()]
    return layers


def low_precision(x, enabled):
    """With --precision bf16, the hidden layers' matmuls run in bf16; weights, optimiser states and the output
    layers stay fp32, since a Q of 300 in bf16 has a resolution of 2, as large as a reward. LayerNorm computes
    its statistics in fp32 either way."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


class Actor(nn.Module):
    """Deterministic tanh policy with 3 hidden layers (the authors' final architecture)."""

    def __init__(self, obs_dim, act_dim, max_action, hidden_dim, layernorm, bf16=False):
        super().__init__()
        self.trunk = nn.Sequential(*hidden_layers(obs_dim, hidden_dim, 3, layernorm))
        self.head = nn.Linear(hidden_dim, act_dim)
        self.max_action, self.bf16 = max_action, bf16

    def forward(self, obs):
        with low_precision(obs, self.bf16):
            hidden = self.trunk(obs)
        return self.max_action * torch.tanh(self.head(hidden.float()))


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


class Critic(nn.Module):
    """TD3's twin critics as one 2-member ensemble, 2 hidden layers each: Q(s, a) -> [2, B]."""

    def __init__(self, obs_dim, act_dim, hidden_dim, layernorm, num_critics=2, bf16=False):
        super().__init__()
        members = partial(VectorizedLinear, ensemble_size=num_critics)
        self.trunk = nn.Sequential(*hidden_layers(obs_dim + act_dim, hidden_dim, 2, layernorm, members))
        self.head = VectorizedLinear(hidden_dim, 1, num_critics)
        self.num_critics, self.bf16 = num_critics, bf16

    def forward(self, obs, action):
        x = torch.cat([obs, action], dim=-1).expand(self.num_critics, -1, -1)
        with low_precision(x, self.bf16):
            hidden = self.trunk(x)
        return self.head(hidden.float()).squeeze(-1)


@dataclass
class Learner:
    """What the updates change: the networks, their target copies and their optimisers."""

    actor: Actor
    critic: Critic
    target_actor: Actor
    target_critic: Critic
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer


def make_learner(obs_dim, act_dim, max_action, args, device) -> Learner:
    bf16 = args.precision == "bf16"
    actor = Actor(obs_dim, act_dim, max_action, args.hidden_dim, args.actor_layernorm, bf16=bf16).to(device)
    critic = Critic(obs_dim, act_dim, args.hidden_dim, args.critic_layernorm, bf16=bf16).to(device)
    target_actor, target_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    # Fused Adam: one kernel updates all of a network's parameters (CPU and GPU alike).
    # (capturable: the optimisers' step counts stay on the GPU, so that a CUDA graph can replay their steps.)
    capturable = args.compile and device.type == "cuda"
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=True, capturable=capturable)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, fused=True, capturable=capturable)
    return Learner(actor, critic, target_actor, target_critic, actor_opt, critic_opt)


def polyak_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    # One fused call over all tensors instead of a Python loop per parameter.
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


# ================================================================================================ pre-training
@torch.no_grad()
def dataset_lambda_returns(data, learner, args, chunk=65536):
    """Lambda-returns for the whole dataset, with V(s') = min_j Q'_j(s', pi'(s')) from the target networks."""
    next_values = []
    for start in progress_over(range(0, len(data["rewards"]), chunk), "lambda-returns"):
        next_obs = data["next_observations"][start:start + chunk]
        next_values.append(learner.target_critic(next_obs, learner.target_actor(next_obs)).min(0).values)
    next_values = torch.cat(next_values).double().cpu().numpy()
    returns = lambda_returns(data["rewards"].cpu().numpy(), next_values, data["terminations"].cpu().numpy(),
                             data["truncations"].cpu().numpy(), args.gamma, args.lam, args.bootstrap_truncated)
    return torch.as_tensor(returns, dtype=torch.float32, device=data["rewards"].device)


def start_critics_at_mean_target(learner, returns_to_go) -> None:
    """--critic-init mean-target: every critic's output bias (its target copy's too) starts at the mean
    pre-training target, b_j = mean_i G_i, so that pre-training spends its steps on the shape of Q rather than
    on first growing its level. The output layer reads LayerNorm-ed features, so Adam moves Q by only about
    lr x (width / 2) ~ 0.04 per step: reaching returns of ~250 from ~0 alone takes thousands of steps."""
    with torch.no_grad():
        for critic in (learner.critic, learner.target_critic):
            critic.head.bias.fill_(returns_to_go.mean())


def cql_regulariser(critic, obs, q_data, random_actions):
    """sum_j [ mean_s logsumexp_k Q_j(s, u_k) - mean Q_j(s, a) ] for random actions u [K, B, A]."""
    num_actions, batch_size, act_dim = random_actions.shape
    q_random = critic(obs.repeat(num_actions, 1), random_actions.reshape(-1, act_dim))
    q_random = q_random.reshape(critic.num_critics, num_actions, batch_size)
    return (torch.logsumexp(q_random, dim=1).mean(1) - q_data.mean(1)).sum()


def unit_scaled(loss):
    # Divide by the ABSOLUTE detached value: dividing by a signed one flips the gradient when loss < 0.
    return loss / loss.detach().abs().clamp_min(1e-8)


def pretrain_step(learner, batch, returns_to_go, args):
    """Joint pre-training: behaviour cloning for the actor, regression onto returns for both critics.
    Returns the step's metrics (losses and mean values), as tensors left on the device."""
    metrics = {}
    pi = learner.actor(batch["observations"])
    if args.pretrain in ("actor-critic", "actor"):
        actor_loss = F.mse_loss(pi, batch["actions"])
        learner.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        learner.actor_opt.step()
        metrics["losses/pretrain_actor"] = actor_loss
    q = learner.critic(batch["observations"], batch["actions"])
    if args.pretrain in ("actor-critic", "critic"):
        critic_loss = (q - returns_to_go).pow(2).mean(1).sum()
        cql = cql_regulariser(learner.critic, batch["observations"], q, batch["random_actions"])
        learner.critic_opt.zero_grad(set_to_none=True)
        (unit_scaled(critic_loss) + args.cql_weight * unit_scaled(cql)).backward()
        learner.critic_opt.step()
        metrics["losses/pretrain_critic"], metrics["losses/cql"] = critic_loss, cql
    with torch.no_grad():
        q_policy = learner.critic(batch["observations"], pi.detach())
    metrics |= {"values/q_data": q.mean(), "values/q_policy": q_policy.mean(), "values/target": returns_to_go.mean()}
    # The target networks follow from the start, so that TD3+BC inherits targets consistent with its networks.
    polyak_update(learner.actor, learner.target_actor, args.tau)
    polyak_update(learner.critic, learner.target_critic, args.tau)
    return metrics


# ================================================================================================ TD3+BC
def td3bc_step(learner, batch, noise, update_actor, args):
    """One TD3+BC+CQL update: clipped double-Q critics with CQL; every policy_freq steps, the actor and the
    targets."""
    actor, critic = learner.actor, learner.critic
    with torch.no_grad():
        smoothing = (noise * args.policy_noise).clamp(-args.noise_clip, args.noise_clip) * actor.max_action
        next_action = learner.target_actor(batch["next_observations"]) + smoothing
        next_action = next_action.clamp(-actor.max_action, actor.max_action)
        next_q = learner.target_critic(batch["next_observations"], next_action).min(0).values
        # Bootstrap through truncations (time limits), never through true terminals.
        td_target = batch["rewards"] + args.gamma * (1.0 - batch["terminations"]) * next_q
    q = critic(batch["observations"], batch["actions"])
    critic_loss = (q - td_target).pow(2).mean(1).sum()
    cql = cql_regulariser(critic, batch["observations"], q, batch["random_actions"])
    learner.critic_opt.zero_grad(set_to_none=True)
    (unit_scaled(critic_loss) + args.cql_weight * unit_scaled(cql)).backward()
    learner.critic_opt.step()
    metrics = {"losses/critic": critic_loss, "losses/cql": cql,
               "values/q_data": q.mean(), "values/target": td_target.mean()}
    if update_actor:
        pi = actor(batch["observations"])
        critic.requires_grad_(False)  # the actor's loss needs dQ/da, not gradients for the critics' weights
        q_pi = critic(batch["observations"], pi)[0]  # TD3's actor follows Q_1 alone
        critic.requires_grad_(True)
        q_weight = args.alpha / q_pi.abs().mean().detach()  # TD3+BC: scale Q to the size of the BC term
        bc_mse = F.mse_loss(pi, batch["actions"])
        actor_loss = -q_weight * q_pi.mean() + bc_mse
        learner.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        learner.actor_opt.step()
        metrics |= {"losses/actor": actor_loss, "losses/bc_mse": bc_mse, "values/q_policy": q_pi.mean(),
                    "charts/q_weight": q_weight}
        polyak_update(actor, learner.target_actor, args.tau)
        polyak_update(critic, learner.target_critic, args.tau)
    return metrics


# ================================================================================================ training loop
def schedule(args) -> str:
    pretrained = {"actor-critic": "actor and critics", "actor": "the actor only", "critic": "the critics only"}
    first = (f"pre-training of {pretrained[args.pretrain]} ({args.pretrain_steps:,} steps), then "
             if args.pretrain_steps else "")
    critic_steps = args.pretrain_steps if args.pretrain in ("actor-critic", "critic") else 0
    return f"{args.total_steps:,} gradient steps: {first}TD3+BC with alpha {args.alpha:g}" + lambda_schedule(
        args, critic_steps)


def lambda_schedule(args, critic_steps) -> str:
    """When the lambda-returns come in: a refresh falls on every multiple of the interval inside pre-training."""
    if not args.lam:
        return ""
    if (max(critic_steps - 1, 0) // args.lambda_refresh_interval) == 0:
        return (f"; --lam {args.lam:g} takes no effect: the critics pre-train for {critic_steps:,} steps, no more "
                f"than one --lambda-refresh-interval ({args.lambda_refresh_interval:,}), so they fit Monte-Carlo "
                "returns throughout (pre-train longer, or shorten the interval with --critic-init mean-target)")
    return (f"; lambda {args.lam:g}: lambda-returns from critic step {args.lambda_refresh_interval:,}, recomputed "
            f"every {args.lambda_refresh_interval:,} steps")


def states_normalised_on_device(data, device):
    """States normalised by the dataset's statistics (here and at evaluation), then the whole dataset as float32
    tensors on the training device, where batches are sampled. Returns the data and the states' (mean, std)."""
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    data["observations"] = (data["observations"] - obs_mean) / obs_std
    data["next_observations"] = (data["next_observations"] - obs_mean) / obs_std
    return {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in data.items()}, (obs_mean, obs_std)


def main(args: Args) -> None:
    args, checkpoint = prepare_args(args)  # a resumed run's own settings, per-dataset defaults, checks
    device = setup_device(args)  # first: a device that cannot work is refused before the data load
    datasets, data = load_data(args.env_id)  # every transition as flat NumPy arrays, checked
    torch.manual_seed(args.seed)  # network initialisation
    sampler = make_sampler(args.seed, device)  # every later random draw: batch indices and noise

    # 1. Monte-Carlo returns-to-go of the raw rewards: the critics' pre-training targets.
    returns_to_go = mc_returns(data["rewards"], data["terminations"], data["truncations"], args.gamma,
                               args.bootstrap_truncated)
    data, obs_stats = states_normalised_on_device(data, device)
    returns_to_go = torch.as_tensor(returns_to_go, dtype=torch.float32, device=device)
    (num_transitions, obs_dim), act_dim = data["observations"].shape, data["actions"].shape[1]
    learner = make_learner(obs_dim, act_dim, float(datasets[0].action_space.high[0]), args, device)
    if args.critic_init == "mean-target" and args.pretrain in ("actor-critic", "critic"):
        start_critics_at_mean_target(learner, returns_to_go)
    pretrain_update, rl_update = speed_up([pretrain_step, td3bc_step], learner, device, args)  # with --compile

    run = Run(args, datasets, obs_stats, device, checkpoint, schedule(args))  # logs, evaluation, signals
    if checkpoint is not None:
        restore(learner, sampler, checkpoint, args)
        returns_to_go = checkpoint["returns_to_go"].to(device)
    for step in range(run.start_step, args.total_steps):
        idx = torch.randint(num_transitions, (args.batch_size,), device=device, generator=sampler)
        batch = {k: v[idx] for k, v in data.items()}
        random_actions = torch.rand(args.cql_num_actions, args.batch_size, act_dim, device=device, generator=sampler)
        batch["random_actions"] = (2 * random_actions - 1) * learner.actor.max_action  # the u_k of CQL
        if step < args.pretrain_steps:  # 2. pre-train actor and critics together
            # lambda-returns bootstrap from the critics, so they come once the critics fit the MC returns.
            if args.lam > 0 and step > 0 and step % args.lambda_refresh_interval == 0 and args.pretrain != "actor":
                returns_to_go = dataset_lambda_returns(data, learner, args)
            metrics = pretrain_update(learner, batch, returns_to_go[idx], args)
        else:  # 3. TD3+BC from the pre-trained networks
            noise = torch.randn(batch["actions"].shape, device=device, generator=sampler)
            update_actor = (step - args.pretrain_steps) % args.policy_freq == 0
            metrics = rl_update(learner, batch, noise, update_actor, args)

        done = step + 1
        run.log(done, metrics, phase="pre-training" if done < args.pretrain_steps else "TD3+BC")
        if done == args.pretrain_steps or (done < args.pretrain_steps and done % args.eval_interval == 0):
            run.log_fit(done, pretraining_fit(learner, data, returns_to_go, args), done == args.pretrain_steps)
        if done % args.eval_interval == 0 or done == args.total_steps:
            run.evaluate(done, learner.actor)
        if run.stop_signal or done == args.total_steps or (args.checkpoint_interval
                                                           and done % args.checkpoint_interval == 0):
            run.save_checkpoint(done, learner, sampler, returns_to_go=returns_to_go)
        if run.stop_signal and done < args.total_steps:  # at the last step, finishing beats interrupting
            run.interrupt(done)
    run.finish(learner)


# ================================================================================================ evaluation
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
        actions = actor(obs_t).cpu().numpy()
        for i in np.flatnonzero(~done):
            obs[i], reward, terminated, truncated, _ = envs[i].step(actions[i])
            returns[i] += reward
            done[i] = truncated or (terminated and steps >= ignore_terminated_until)
    return returns


# D4RL's reference returns (random policy, expert policy), for datasets that carry none of their own,
# such as Minari's mujoco/*-v0 (Minari issue #323).
D4RL_REFERENCE_RETURNS = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
                          "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7)}


def score_reference(dataset):
    """(random return, expert return, where they come from) for normalised scores, or None: the dataset's
    own reference returns if it has them, else D4RL's for its task, else none."""
    metadata = dataset.storage.metadata
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        return float(metadata["ref_min_score"]), float(metadata["ref_max_score"]), "the dataset's reference returns"
    env_name = resolve_dataset(dataset.spec.dataset_id)[1]
    if env_name in D4RL_REFERENCE_RETURNS:
        return (*D4RL_REFERENCE_RETURNS[env_name], f"D4RL's {env_name} reference returns (the dataset has none)")
    return None


def normalized_score(returns, reference):
    """100 * (return - random return) / (expert return - random return), averaged over episodes."""
    return float(100 * (np.mean(returns) - reference[0]) / (reference[1] - reference[0]))


@torch.no_grad()
def pretraining_fit(learner, data, returns_to_go, args, sample_size=10_000):
    """How well pre-training fit, on a fixed sample of the data (evenly spaced transitions): the critics'
    explained variance of their targets, 1 - Var(G - Q_j) / Var(G) averaged over the critics, their mean
    prediction beside the mean target, and the actor's behaviour-cloning error."""
    n = len(data["rewards"])
    idx = torch.linspace(0, n - 1, min(sample_size, n), device=data["rewards"].device).long()
    obs, actions = data["observations"][idx], data["actions"][idx]
    fit = {"pretrain/bc_mse": F.mse_loss(learner.actor(obs), actions)}
    if args.pretrain in ("actor-critic", "critic"):
        target, q = returns_to_go[idx], learner.critic(obs, actions)
        explained = 1 - (target - q).var(dim=1) / target.var().clamp_min(1e-8)
        fit |= {"pretrain/critic_explained_variance": explained.mean(), "pretrain/q_mean": q.mean(),
                "pretrain/target_mean": target.mean()}
    return fit


# ================================================================================================ plumbing
# Everything below serves the algorithm above without being part of it: arguments and resuming, the device,
# the dataset, and the run's bookkeeping (logs, evaluation, checkpoints, signals). The text is the same in all
# four scripts of algos/, but for check_args and speed_up.

# Flags a resumed run may change (to extend it, or to run it elsewhere); any other stays as the run began.
RESUMABLE = ("total_steps", "eval_interval", "eval_episodes", "checkpoint_interval", "log_interval", "threads",
             "device", "compile", "track", "wandb_project_name", "wandb_entity")


def parse_args() -> Args:
    """The command line. With --resume, the saved run's arguments are the defaults: a flag given changes only
    itself."""
    args = tyro.cli(Args, description=__doc__)
    if args.resume is None:
        return args
    resumed = Path(args.resume)  # the run's directory, or the checkpoint.pt in it
    run_dir = str(resumed.parent if resumed.name == "checkpoint.pt" and resumed.is_file() else resumed)
    saved = Args(**{**load_checkpoint(run_dir)["args"], "resume": run_dir})
    return replace(tyro.cli(Args, description=__doc__, default=saved), resume=run_dir)


def load_checkpoint(run_dir: str) -> dict:
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        nearby = next((d for d in (os.path.join("runs", run_dir), os.path.dirname(run_dir))
                       if d and os.path.exists(os.path.join(d, "checkpoint.pt"))), None)
        raise SystemExit(f"error: no checkpoint.pt in '{run_dir}' to resume from: pass the directory of a run that "
                         "was interrupted or saved a periodic checkpoint (runs/<run-name>)"
                         + (f". Did you mean --resume {nearby}?" if nearby else "."))
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # any device may resume it
    script = checkpoint.get("script", Path(__file__).stem)  # older checkpoints do not say
    if script != Path(__file__).stem:
        other = os.path.relpath(Path(__file__).with_name(f"{script}.py"))
        raise SystemExit(f"error: {run_dir} is a run of {script}.py, whose settings and networks this script does "
                         f"not share; resume it with that script: python {other} --resume {run_dir}")
    return checkpoint


def prepare_args(args: Args):
    """The run's arguments with the dataset's defaults filled in and checked, and its checkpoint when resuming."""
    checkpoint = load_checkpoint(args.resume) if args.resume is not None else None
    if checkpoint is not None:
        saved, defaults, step = checkpoint["args"], asdict(Args()), checkpoint["step"]
        if args.pretrain_steps is None:  # main(Args(...)) from Python: the flags that differ from a default are given
            args = Args(**{**saved, **{k: v for k, v in asdict(args).items() if v != defaults[k]}})
        changed = [f"--{key.replace('_', '-')} cannot change when resuming (the run has "
                   f"{saved.get(key, defaults[key])!r}, given {value!r})" for key, value in asdict(args).items()
                   if key not in (*RESUMABLE, "resume") and value != saved.get(key, defaults[key])]
        if changed:
            resumable = ", ".join("--" + key.replace("_", "-") for key in RESUMABLE)
            raise SystemExit(f"error: {'; '.join(changed)}; only {resumable} can; start a new run for other settings.")
        if args.total_steps <= step:
            raise SystemExit(f"error: the run in {args.resume} has finished its {step} steps; pass a larger "
                             "--total-steps to continue it." if args.total_steps == step else f"error: the run is at "
                             f"step {step}; --total-steps {args.total_steps} would end it before that.")
    if args.pretrain == "none" and args.pretrain_steps:
        print(f"note: --pretrain none trains from scratch; --pretrain-steps {args.pretrain_steps} is ignored")
    _, env_name, quality = resolve_dataset(args.env_id)
    filled = {k: v for k, v in dataset_defaults(env_name, quality).items() if getattr(args, k) is None}
    args = replace(args, **{**filled, **({"pretrain_steps": 0} if args.pretrain == "none" else {})})
    check_args(args, defaulted=set(filled))
    return args, checkpoint


def check_args(args: Args, defaulted) -> None:
    """Refuse bad flags before anything runs, saying what to pass instead; `defaulted` names the settings that
    came from the dataset's defaults rather than from the command line."""
    problems = [f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}" for name in (
        "total_steps", "cql_num_actions", "batch_size", "hidden_dim", "eval_interval", "log_interval", "policy_freq",
        "lambda_refresh_interval") if getattr(args, name) <= 0]
    problems += [f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}" for name in (
        "pretrain_steps", "cql_weight", "eval_episodes", "checkpoint_interval")
        if (getattr(args, name) or 0) < 0]
    problems += [rule for rule, holds in {
        f"--lam must lie in [0, 1] (0 is Monte-Carlo, 1 is one-step TD), got {args.lam}": 0 <= args.lam <= 1,
        f"--tau must lie in (0, 1], got {args.tau}": 0 < args.tau <= 1,
        f"--gamma must lie in [0, 1), got {args.gamma}": 0 <= args.gamma < 1,
        f"--learning-rate must be positive, got {args.learning_rate}": args.learning_rate > 0,
        f"--alpha must not be negative (0 is behaviour cloning alone), got {args.alpha}": args.alpha >= 0,
        f"--threads must be positive (omit it for one per core), got {args.threads}":
            args.threads is None or args.threads > 0,
    }.items() if not holds]
    if args.pretrain_steps > args.total_steps > 0:  # (a non-positive total is reported above)
        source = {key: ", this dataset's default" if key in defaulted else "" for key in ("pretrain_steps",
                                                                                         "total_steps")}
        problems.append(f"--pretrain-steps ({args.pretrain_steps}{source['pretrain_steps']}) cannot exceed "
                        f"--total-steps ({args.total_steps}{source['total_steps']}): pre-training counts inside the "
                        "total budget; " + (f"pass --pretrain-steps {args.total_steps // 2} (say), or a larger "
                        "--total-steps" if args.resume is None else "a resumed run keeps its pre-training: pass a "
                        f"--total-steps of at least {args.pretrain_steps}, or start a new run"))
    if problems:
        raise SystemExit("error: " + "; ".join(problems) + ".")


def setup_device(args: Args) -> torch.device:
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
    except RuntimeError:
        raise SystemExit(f"error: --device {args.device} is not a torch device; use cpu, cuda, cuda:<index> or auto.")
    try:
        torch.empty(1, device=device)  # mps or xpu where this torch has no such backend, a GPU index not here
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        reason = "sees no CUDA GPU here" if device.type == "cuda" and not torch.cuda.is_available() else \
            f"cannot use it here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        raise SystemExit(f"error: --device {args.device}, but this torch ({torch.__version__}) {reason}; use --device "
                         "cpu (or auto, which picks a GPU when there is one).")
    if args.threads:
        torch.set_num_threads(args.threads)
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    fast_bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else \
        capabilities.get("avx512_bf16", False) or capabilities.get("amx_bf16", False)
    if args.precision == "bf16" and not fast_bf16:
        print(f"note: this {device.type} has no fast bf16 matmuls; training in fp32")
        args.precision = "fp32"
    return device


def make_sampler(seed: int, device) -> torch.Generator:
    """The generator of batch indices and noise, on the training device, seeded from its own stream of
    `seed`: seeded with `seed` itself, its first draws would repeat those that initialised the networks."""
    sampler = torch.Generator(device=device)
    sampler.manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
    return sampler


# ------------------------------------------------------------------------------------------------ datasets
D4RL_NAME = re.compile(r"^(?P<env>[a-z0-9]+)-(?P<quality>[a-z-]+?)-v\d+$")
D4RL_QUALITIES = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay", "human", "cloned")
MINARI_HOSTS = {**{env: ("simple", "medium", "expert") for env in ("halfcheetah", "hopper", "walker2d", "ant")},
                **{env: ("human", "cloned", "expert") for env in ADROIT_DEMO_LENGTHS}}


def resolve_dataset(env_id: str):
    """--env-id -> (Minari dataset ids, environment, quality). A D4RL name maps to the datasets Minari hosts
    (medium-expert to two of them); a Minari id passes through."""
    if "/" in env_id or env_id in minari.list_local_datasets():
        *namespace, name = env_id.split("/")
        d4rl_like = D4RL_NAME.match(name) if len(namespace) < 2 else None  # myteam/hopper-expert-v0
        if d4rl_like and d4rl_like["env"] in MINARI_HOSTS and not set(namespace) & set(MINARI_HOSTS):
            return [env_id], d4rl_like["env"], d4rl_like["quality"]
        quality = re.sub(r"-v\d+$", "", name)
        return [env_id], (namespace[-1] if namespace else quality).lower(), quality
    match = D4RL_NAME.match(env_id)
    if match is None:
        raise SystemExit(f"error: '{env_id}' is neither a D4RL name like hopper-medium-v2 nor a Minari dataset id "
                         f"like mujoco/hopper/medium-v0.{did_you_mean(env_id)} Pass one of those to --env-id. "
                         f"{make_locally(env_id.split('-')[0].lower())}".rstrip())  # for a Gymnasium id: Hopper-v5
    env_name, quality = match["env"], match["quality"]
    hosted = MINARI_HOSTS.get(env_name, ())
    prefix = f"D4RL/{env_name}/{{}}-v2" if env_name in ADROIT_DEMO_LENGTHS else f"mujoco/{env_name}/{{}}-v0"
    if quality in hosted or (quality == "medium-expert" and "medium" in hosted):
        return [prefix.format(q) for q in ([quality] if quality in hosted else ["medium", "expert"])], env_name, quality
    raise SystemExit(f"error: Minari does not host the D4RL dataset '{env_id}'."
                     f"{did_you_mean(env_id) if quality not in D4RL_QUALITIES or not hosted else ''} It hosts "
                     + (", ".join(prefix.format(q) for q in hosted) if hosted else
                        "mujoco/<env>/{simple,medium,expert}-v0 and D4RL/<adroit task>/{human,cloned,expert}-v2")
                     + f". {make_locally(env_name)}".rstrip())


def make_locally(env_name: str, namespace="local") -> str:
    """How to make a MuJoCo dataset without Minari's servers, worded to hold in a copy of this script too."""
    if env_name not in ("halfcheetah", "hopper", "walker2d", "ant"):
        return ""
    env = {"halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}.get(env_name, f"{env_name.capitalize()}-v5")
    noise = namespace.startswith("local-noise")  # the earlier protocol: a policy's mean action plus noise
    flag = (" --protocol mean-plus-noise" if noise else "") + \
        (f" --namespace {namespace}" if namespace not in ("local", "local-noise") else "")
    policy = f"{'mean_plus_noise/' if noise else ''}{env_name}_medium.npz"
    shipped = (f"; with --medium-policy benchmark_results/behaviour_policies/{policy} it writes medium-v0 alone in "
               "a few minutes") if env_name != "ant" else ""
    return (f"To make data locally, use make_dataset.py from the project this script comes from: `python "
            f"common/make_dataset.py --env-id {env}{flag}` writes {namespace}/{env_name}/random-v0, medium-v0 and "
            "medium-replay-v0 after training a SAC policy (tens of minutes; with --stop-at expert also expert-v0 and "
            f"medium-expert-v0){shipped}.")


def did_you_mean(name: str) -> str:
    """' Did you mean X?' for the nearest D4RL name or local dataset id, or ''."""
    known = [f"{env}-{q}-v2" for env, qualities in MINARI_HOSTS.items() for q in (*qualities, "medium-expert")]
    close = difflib.get_close_matches(name, [*known, *minari.list_local_datasets()], n=1, cutoff=0.8)
    return f" Did you mean {close[0]}?" if close else ""


def load_data(env_id: str):
    """The Minari datasets behind --env-id, and all their transitions as flat, checked NumPy arrays."""
    dataset_ids = resolve_dataset(env_id)[0]
    datasets = [load_minari(dataset_id, dataset_ids) for dataset_id in dataset_ids]
    data = flatten_episodes(datasets)
    check_data(data, datasets[0].action_space)
    return datasets, data


def load_minari(dataset_id: str, dataset_ids):
    local, folder = minari.list_local_datasets(), os.environ.get("MINARI_DATASETS_PATH")
    where = f"MINARI_DATASETS_PATH={folder}" if folder is not None else \
        "in ~/.minari/datasets, as MINARI_DATASETS_PATH is unset"
    if dataset_id not in local and dataset_id.split("/")[0] not in ("mujoco", "D4RL"):  # no download: say what is here
        here = ", ".join(sorted(local)[:12]) + (", ..." if len(local) > 12 else "") if local else "none"
        raise SystemExit(f"error: no dataset '{dataset_id}' on this machine ({where}; it has: {here})."
                         f"{did_you_mean(dataset_id)} "
                         f"{make_locally(resolve_dataset(dataset_id)[1], dataset_id.split('/')[0])}")
    if dataset_id in local:
        return minari.load_dataset(dataset_id)
    print(f"{dataset_id} is not on this machine ({where}): downloading it with Minari", flush=True)
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as e:  # no network, unknown remote ids, incompatible versions
        raise SystemExit(f"error: dataset '{dataset_id}' is not on this machine ({where}) and "
                         f"Minari could not download it ({type(e).__name__}: {str(e)[:200]}). Download it where there "
                         f"is internet with `minari download {' '.join(d for d in dataset_ids if d not in local)}` and "
                         f"copy {'them' if len(dataset_ids) > 1 else 'it'} to that folder. "
                         f"{same_env_here(dataset_id, local) or make_locally(resolve_dataset(dataset_id)[1])}")


def same_env_here(dataset_id: str, local) -> str:
    """'This machine has X, Y (pass one to --env-id).' for the local datasets of dataset_id's environment."""
    env_name = resolve_dataset(dataset_id)[1]
    here = sorted(d for d in local if resolve_dataset(d)[1] == env_name)
    return f"This machine has {', '.join(here)} (pass {'one' if len(here) > 1 else 'it'} to --env-id)." if here else ""


def flatten_episodes(datasets) -> dict:
    """Episodes -> flat arrays of transitions (obs, action, reward, next_obs, terminated, truncated). An episode
    that just stops (neither flag at its end) ends there all the same: as a truncation."""
    episodes = [episode for dataset in datasets for episode in dataset.iterate_episodes()]
    if not all(isinstance(e.observations, np.ndarray) for e in episodes):
        raise SystemExit(f"error: {' + '.join(d.spec.dataset_id for d in datasets)} has structured (dict) "
                         "observations; this script needs flat Box ones.")
    if not any(len(e.rewards) for e in episodes):
        raise SystemExit("error: the dataset holds no transitions.")
    truncations = [np.array(e.truncations, dtype=bool) for e in episodes]
    for flags, episode in zip(truncations, episodes):
        flags[-1] |= not episode.terminations[-1]
    columns = {"observations": [e.observations[:-1] for e in episodes], "actions": [e.actions for e in episodes],
               "rewards": [e.rewards for e in episodes], "next_observations": [e.observations[1:] for e in episodes],
               "terminations": [np.asarray(e.terminations, dtype=bool) for e in episodes], "truncations": truncations}
    return {k: np.concatenate(v) for k, v in columns.items()}


def check_data(data: dict, action_space) -> None:
    """Refuse data that would silently poison training, with a message saying what is wrong."""
    n, low, high = len(data["rewards"]), action_space.low, action_space.high
    for key, values in data.items():
        if len(values) != n:
            raise SystemExit(f"error: the dataset's {key} hold {len(values)} entries for {n} rewards; every "
                             "transition needs one of each.")
        if not np.isfinite(values).all():
            bad = ~np.isfinite(values.reshape(n, -1)).all(axis=1)
            raise SystemExit(f"error: the dataset's {key} contain NaN or infinite values at {bad.sum()} transitions "
                             f"(first at index {np.argmax(bad)}). Clean or drop those episodes.")
    if not (np.allclose(low, -high) and np.allclose(high, high.flat[0])):
        raise SystemExit(f"error: the action space [{low}, {high}] is not the same symmetric interval in every "
                         "coordinate, which the tanh actor (max_action * tanh) assumes; rescale the actions to "
                         "[-1, 1] in your dataset.")
    outside = ((data["actions"] < low - 1e-4) | (data["actions"] > high + 1e-4)).any(axis=1)
    if outside.any():
        raise SystemExit(f"error: {outside.sum()} dataset actions lie outside the action space [{low.min()}, "
                         f"{high.max()}] (first at index {np.argmax(outside)}); a tanh actor cannot imitate them.")


# ------------------------------------------------------------------------------------------------ the run
REFRESH = 0.5 if sys.stderr.isatty() else 30  # seconds between progress redraws: a terminal, or a log file


def progress_over(chunks, description):
    """A bar for a pass over the whole dataset, which takes a while on a CPU. It draws over the training bar's
    line (position 0), which redraws after it: a second line would need cursor movements, garbage in a log file."""
    return tqdm(chunks, desc=description, unit="chunk", leave=False, mininterval=REFRESH, position=0)


def speed_up(steps, learner, device, args):
    """--compile: on a GPU every update step replays as a CUDA graph; elsewhere the networks are compiled
    with torch.compile, which fuses their elementwise work."""
    if not args.compile:
        return steps
    if device.type == "cuda":
        return [CUDAGraphStep(step) for step in steps]
    for network in (learner.actor, learner.critic, learner.target_actor, learner.target_critic):
        network.compile()
    return steps


class CUDAGraphStep:
    """--compile on a GPU: each call of an update step (forward and backward passes, optimiser steps, target
    updates) replays as one CUDA graph, since launching a batch-256 update's few hundred small kernels is what
    takes the time. The first calls of each kind of step (one kind per value of its plain arguments, such as
    TD3's actor-update flag) run eagerly on a side stream to set up the optimisers' state; the next is
    captured; later calls copy their tensor arguments (tensors or dicts of them) into the graph's inputs."""

    def __init__(self, step, warmup_calls=3):
        self.step, self.warmup_calls, self.calls, self.graphs = step, warmup_calls, {}, {}
        self.side_stream = torch.cuda.Stream()

    @staticmethod
    def is_tensors(arg):
        return isinstance(arg, torch.Tensor) or (isinstance(arg, dict) and all(
            isinstance(v, torch.Tensor) for v in arg.values()))

    def __call__(self, *args):
        key = tuple(None if self.is_tensors(a) else a if isinstance(a, (bool, int, float, str)) else id(a)
                    for a in args)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] <= self.warmup_calls:
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                out = self.step(*args)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return out
        if key not in self.graphs:
            static_args = [({k: v.clone() for k, v in a.items()} if isinstance(a, dict) else a.clone())
                           if self.is_tensors(a) else a for a in args]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.step(*static_args)
            self.graphs[key] = graph, static_args, static_out
        graph, static_args, static_out = self.graphs[key]
        for static, arg in zip(static_args, args):
            for name, value in (static.items() if isinstance(static, dict) else [(None, static)]):
                if isinstance(value, torch.Tensor):
                    value.copy_(arg if name is None else arg[name])
        graph.replay()
        return static_out


class Run:
    """The run's bookkeeping around the training loop: its directory, tensorboard (and W&B), the progress bar,
    evaluation, checkpoints and signals: SIGINT and SIGTERM wait for the current step, then the loop saves a
    checkpoint and exits."""

    def __init__(self, args, datasets, obs_stats, device, checkpoint, schedule):
        self.args, self.device, self.stop_signal, self.saving = args, device, None, False
        self.obs_mean, self.obs_std = obs_stats  # as NumPy arrays in checkpoint.pt, as tensors in model.pt
        self.obs_tensors = [torch.as_tensor(x, dtype=torch.float32, device=device) for x in obs_stats]  # evaluation
        self.previous_handlers = {signum: signal.signal(signum, self.on_signal) for signum in (signal.SIGINT,
                                                                                               signal.SIGTERM)}
        self.dataset_ids, env_name = [d.spec.dataset_id for d in datasets], resolve_dataset(args.env_id)[1]
        self.envs = [make_eval_env(datasets[0]) for _ in range(args.eval_episodes)]
        self.ignore_terminated_until = ADROIT_DEMO_LENGTHS.get(env_name, 0) if args.eval_protocol == "adroit" else 0
        self.reference, self.final = score_reference(datasets[0]), None
        run_name = args.run_name or f"{args.env_id.replace('/', '_')}__{Path(__file__).stem}__{args.seed}__" \
                                    f"{int(time.time())}"
        self.dir = args.resume or os.path.join("runs", run_name)
        if args.resume is None and os.path.isdir(self.dir) and os.listdir(self.dir):
            raise SystemExit(f"error: {self.dir} already holds a run. Continue it with --resume {self.dir}, or "
                             "choose another --run-name.")
        os.makedirs(self.dir, exist_ok=True)
        self.start_step, self.phase = (checkpoint["step"], checkpoint["phase"]) if checkpoint else (0, None)
        score_note = (f"normalised with {self.reference[2]}: random {self.reference[0]:g}, expert {self.reference[1]:g}"
                      if self.reference else f"not normalised (no reference returns for '{env_name}'): returns only")
        print(self.summary(datasets, env_name, schedule, score_note, resumed=checkpoint is not None), flush=True)
        self.wandb_id = (checkpoint or {}).get("wandb_id") or os.urandom(6).hex()
        if args.track:
            try:
                import wandb
            except ImportError:
                raise SystemExit("error: --track logs to Weights & Biases, which is not installed: pip install wandb")
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, id=self.wandb_id,
                       resume="allow", config=asdict(args), sync_tensorboard=True, dir=self.dir)
        # purge_step drops events logged after the checkpoint, so a resumed run has no duplicated steps.
        self.writer = SummaryWriter(self.dir, purge_step=self.start_step + 1 if checkpoint else None)
        # What ran, at every start: benchmark_results/plot.py refuses to mix script versions in one figure.
        table = {**asdict(args), "script_version": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]}
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                             "\n".join(f"|{k}|{v}|" for k, v in table.items()), self.start_step)
        if checkpoint is None:
            self.writer.add_text("eval/protocol", args.eval_protocol)
            self.writer.add_text("eval/score_reference", score_note)
        self.sums = {names: (totals.to(device), count) for names, (totals, count) in
                     (checkpoint or {}).get("log_sums", {}).items()}  # the steps since the last write, if resuming
        self.last_log = (time.time(), self.start_step)
        self.progress = tqdm(total=args.total_steps, initial=self.start_step, desc=self.phase, unit="step",
                             mininterval=REFRESH, miniters=1, dynamic_ncols=True)

    def summary(self, datasets, env_name, schedule, score_note, resumed) -> str:
        """What the run does, on what, and where it writes: the lines printed at its start."""
        args, device, threads = self.args, self.device, torch.get_num_threads()
        protocol = " (the paper's for Adroit: --eval-protocol adroit)" if env_name in ADROIT_DEMO_LENGTHS and \
            args.eval_protocol != "adroit" else ""
        when = f"every {args.eval_interval:,} steps and at the end" if args.eval_interval < args.total_steps else \
            "at the end"
        return ((f"resuming {self.dir} at step {self.start_step} ({self.phase})\n" if resumed else "")
                + f"{Path(__file__).name}: {' + '.join(self.dataset_ids)}, {sum(d.total_steps for d in datasets):,} "
                f"transitions in {sum(d.total_episodes for d in datasets):,} episodes\n  {schedule}\n  device {device}"
                + (f" ({threads} thread{'s' * (threads > 1)})" if device.type == "cpu" else "")
                + f", precision {args.precision}, compile {'on' if args.compile else 'off'}\n  "
                + (f"evaluation {when}, on {args.eval_episodes} episode"
                   f"{'s' * (args.eval_episodes != 1)}{protocol}; scores {score_note}" if args.eval_episodes else
                   "no evaluation (--eval-episodes 0)") + f"\n  writing to {self.dir}")

    def on_signal(self, signum, frame):
        if self.stop_signal is not None and not self.saving and signum == signal.SIGINT:
            print(f"\ninterrupted again: leaving without saving; the last checkpoint in {self.dir} is intact",
                  file=sys.stderr, flush=True)
            os._exit(130)
        self.stop_signal = signum  # acted on once the current update has finished

    def log(self, done, metrics, phase):
        """Sum each step's metrics on the device, one stacked tensor per set of metrics (no host sync per step);
        every --log-interval steps write their means, and stop the run if one became NaN or infinite."""
        names, values = tuple(metrics), torch.stack(list(metrics.values())).detach().float()
        total, count = self.sums.get(names, (None, 0))
        self.sums[names] = (values if total is None else total + values, count + 1)
        phase_ends = self.phase is not None and phase != self.phase  # so its own metrics are written at its end
        if done % self.args.log_interval == 0 or done == self.args.total_steps or phase_ends:
            means = {}  # name -> (sum, steps) over the sets of metrics it belongs to
            for names, (totals, steps) in self.checked_sums(done).items():
                for name, value in zip(names, totals):
                    name_sum, name_steps = means.get(name, (0.0, 0))
                    means[name] = (name_sum + value, name_steps + steps)
            for name, (name_sum, name_steps) in means.items():
                self.writer.add_scalar(name, name_sum / name_steps, done)
            self.writer.add_scalar("charts/SPS", (done - self.last_log[1]) / (time.time() - self.last_log[0]), done)
            self.sums, self.last_log = {}, (time.time(), done)
        self.progress.update(1)
        if phase != self.phase:
            self.phase = phase
            self.progress.set_description(phase)

    def checked_sums(self, done) -> dict:
        sums = {names: (totals.tolist(), count) for names, (totals, count) in self.sums.items()}
        for name, value in ((n, v) for names, (totals, _) in sums.items() for n, v in zip(names, totals)):
            if not math.isfinite(value):
                raise SystemExit(f"error: {name} became {value} by step {done}; stopping. The last good checkpoint "
                                 f"in {self.dir} is intact; lower --learning-rate or check the data.")
        return sums

    def write(self, done, scalars):
        """Measurements taken on the side (not means over steps), straight to tensorboard."""
        for name, value in scalars.items():
            self.writer.add_scalar(name, value.item(), done)

    def log_fit(self, done, fit, handover):
        """pretrain/*: how well pre-training fits, along pre-training and, with a line that says it, at the end."""
        self.write(done, fit)
        fit = {name: value.item() for name, value in fit.items()}
        if handover:
            parts = [f"behaviour-cloning MSE {fit['pretrain/bc_mse']:.4f}"]
            if "pretrain/q_mean" in fit:
                explained = fit["pretrain/critic_explained_variance"]
                parts.insert(0, f"the critics explain {explained:.1%} of their targets' variance (mean Q "
                                f"{fit['pretrain/q_mean']:.1f}, mean target {fit['pretrain/target_mean']:.1f})" +
                             (", so they have not fit their targets yet: pre-train longer" + (
                                 ", or pass --critic-init mean-target" if self.args.critic_init == "paper" else "")
                              if explained < 0.5 else ""))
            if "pretrain/alpha" in fit:
                parts.append(f"temperature {fit['pretrain/alpha']:.3f}, policy entropy {fit['pretrain/entropy']:.2f}")
            self.progress.write(f"pre-training done at step {done}: {'; '.join(parts)}")

    def evaluate(self, done, actor):
        if not self.envs:
            return
        self.checked_sums(done)  # never evaluate a diverged actor
        self.progress.set_postfix_str("evaluating", refresh=True)
        start = time.time()
        returns = evaluate(actor, self.envs, *self.obs_tensors, evaluation_seed(self.args.seed, done),
                           self.ignore_terminated_until, self.device)
        self.final = ("normalised score", normalized_score(returns, self.reference)) if self.reference else \
            ("return", float(np.mean(returns)))
        self.writer.add_scalar("eval/return", float(np.mean(returns)), done)
        if self.reference:
            self.writer.add_scalar("eval/normalized_score", self.final[1], done)
        self.writer.add_scalar("charts/eval_seconds", time.time() - start, done)
        self.progress.set_postfix({"score" if self.reference else "return": f"{self.final[1]:.1f}"})
        self.last_log = (self.last_log[0] + time.time() - start, self.last_log[1])  # out of the SPS figure

    def save_checkpoint(self, done, learner, sampler, **targets):
        self.checked_sums(done)  # never checkpoint a diverged model
        self.saving = True  # a second Ctrl-C now waits for the save: the file is never half-written
        state = {name: value.detach() if isinstance(value := getattr(learner, name), torch.Tensor)
                 else value.state_dict() for name in (f.name for f in fields(learner))}
        path = os.path.join(self.dir, "checkpoint.pt")
        torch.save({**state, **targets, "step": done, "phase": self.phase, "rng": {"sampler": sampler.get_state()},
                    "log_sums": self.sums, "obs_mean": self.obs_mean, "obs_std": self.obs_std,
                    "args": asdict(self.args), "wandb_id": self.wandb_id, "script": Path(__file__).stem}, path + ".tmp")
        os.replace(path + ".tmp", path)  # an interruption never leaves a half-written checkpoint
        self.saving = False

    def close(self, exit_code=0):
        if not exit_code:  # an interrupted run, its checkpoint saved, ignores signals until it exits
            for signum, handler in self.previous_handlers.items():
                signal.signal(signum, handler)
        self.progress.close()
        self.writer.close()
        if self.args.track:
            import wandb
            wandb.finish(exit_code=exit_code)

    def interrupt(self, done):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # saved: further signals have nothing left to protect
        self.close(128 + self.stop_signal)
        print(f"interrupted at step {done}; continue with: python {os.path.relpath(__file__)} --resume {self.dir}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + self.stop_signal)  # 130 for SIGINT, 143 for SIGTERM (os._exit: no teardown to interrupt)

    def finish(self, learner):
        """model.pt: the networks and what evaluating them needs, loadable with torch.load(weights_only=True)."""
        networks = {name: getattr(learner, name) for name in ("actor", "critic", "log_alpha") if hasattr(learner, name)}
        torch.save({**{name: net.detach() if isinstance(net, torch.Tensor) else net.state_dict()
                       for name, net in networks.items()},
                    "script": Path(__file__).stem, "dataset_ids": self.dataset_ids,
                    "max_action": learner.actor.max_action, "ignore_terminated_until": self.ignore_terminated_until,
                    "reference": list(self.reference) if self.reference else None,
                    "obs_mean": torch.as_tensor(self.obs_mean), "obs_std": torch.as_tensor(self.obs_std),
                    "args": asdict(self.args)}, os.path.join(self.dir, "model.pt"))
        self.close()
        final = f"; final {self.final[0]} {self.final[1]:.1f}" if self.final is not None else ""
        evaluate_py = Path(__file__).resolve().parent.parent / "common" / "evaluate.py"
        hint = f" (evaluate it: python {os.path.relpath(evaluate_py)} {self.dir})" if evaluate_py.exists() else ""
        print(f"saved {os.path.join(self.dir, 'model.pt')}{final}{hint}")


def evaluation_seed(seed: int, step: int) -> int:
    """Episode i of the evaluation at `step` starts from env.reset(seed=evaluation_seed(seed, step) + i): the
    same episodes for every run of one seed, and no seed's episodes repeat another seed's."""
    return seed * 10**8 + step


def make_eval_env(dataset):
    try:
        return dataset.recover_environment(eval_env=True)
    except Exception as e:
        raise SystemExit(f"error: could not recover the evaluation environment of {dataset.spec.dataset_id} "
                         f"({type(e).__name__}: {str(e)[:200]}). Install its environment package, or train "
                         "without evaluation with --eval-episodes 0.")


def restore(learner, sampler, checkpoint, args) -> None:
    """A checkpoint's networks, optimiser states and batch sampler, for an exact continuation."""
    for field in fields(learner):
        value = getattr(learner, field.name)
        if isinstance(value, torch.Tensor):
            with torch.no_grad():
                value.copy_(checkpoint[field.name])
            continue
        capturable = [group.get("capturable") for group in getattr(value, "param_groups", [])]
        value.load_state_dict(checkpoint[field.name])
        for group, flag_value in zip(getattr(value, "param_groups", []), capturable):
            group["capturable"] = flag_value  # this run's setting (--compile on a GPU), not the saved run's
    if checkpoint["rng"]["sampler"].numel() == sampler.get_state().numel():
        sampler.set_state(checkpoint["rng"]["sampler"])
    else:  # saved on another kind of device, whose generator state cannot be loaded here
        sampler.manual_seed(int(np.random.SeedSequence([args.seed, 2, checkpoint["step"]]).generate_state(1)[0]))
        print("note: resuming on another kind of device: batch sampling continues from a new random stream, so the "
              "run is no longer bitwise the one it would have been")


def leave_before_training(signum, frame):
    print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    for signum in (signal.SIGINT, signal.SIGTERM):  # until the training loop takes them over
        signal.signal(signum, leave_before_training)
    main(parse_args())
