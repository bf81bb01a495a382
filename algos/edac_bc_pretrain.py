"""EDAC+BC with actor-critic pre-training: first imitate, then improve, on little data.

Implements "Efficient Offline Reinforcement Learning: First Imitate, then Improve" (Jelley, McInroe,
Devlin and Storkey, 2024, arXiv 2406.13376) on top of EDAC (An et al., 2021: SAC with N critics and a
term that diversifies their action gradients). Pre-training is sequential, because the critics of an
entropy-regularised agent value the actor's entropy too:
  1. soft behaviour cloning: the actor maximises the likelihood of dataset actions plus an entropy
     bonus, with the temperature alpha tuned towards the target entropy -|A|;
  2. actor and alpha frozen, the entropy of the actor at every next state is estimated once and the
     "soft" Monte-Carlo return (rewards plus discounted entropy bonuses) computed for every transition;
     all N critics regress onto it, with EDAC's diversity term on;
  3. EDAC continues from those networks, target networks and optimiser states (after --critic-warmup-steps
     of EDAC's critic update alone, if given: the critics learn EDAC's targets before the actor moves).

By default LayerNorm follows every hidden linear layer of actor and critics. With --lam > 0 the critics regress
onto soft lambda-returns (lam = 0 is pure Monte-Carlo, lam = 1 one-step TD): they first fit the soft
Monte-Carlo returns for one --lambda-refresh-interval, and only then are the lambda-returns computed
from them, and recomputed every interval after that.
For data-limited tasks (Adroit) the actor keeps a behaviour-cloning term during EDAC, so that it does
not drift to actions the data never shows:
  actor loss = L_SAC / |sg(L_SAC)| + bc_weight * MSE(a~, a) / sg(MSE),  a~ ~ pi(.|s)  (each at unit size).

Usage:
    python algos/edac_bc_pretrain.py --env-id pen-human-v1 --eval-protocol adroit
    python algos/edac_bc_pretrain.py --env-id local/halfcheetah/medium-v0    # N = 10 critics (hopper's default: 50)
    python algos/edac_bc_pretrain.py --resume runs/<run-name>    # continue an interrupted run exactly
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
    from common.returns import lambda_returns, soft_returns  # noqa: E402
except ModuleNotFoundError:
    try:
        from returns import lambda_returns, soft_returns  # noqa: E402
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
    """gradient steps of pre-training at the start of the budget, actor then critics (None: per dataset,
    as the authors: 20k, walker2d 100k, Adroit 200k)"""
    actor_pretrain_fraction: float = 0.5
    """share of --pretrain-steps spent on soft behaviour cloning of the actor; the rest trains the critics"""
    pretrain: Literal["actor-critic", "actor", "critic", "none"] = "actor-critic"
    """what to pre-train: both (the method), actor only or critic only (the paper's ablations), or none
    (EDAC from scratch)"""
    lam: float = 0.0
    """lambda of the critics' pre-training targets: 0 is pure Monte-Carlo, 1 is one-step TD"""
    lambda_refresh_interval: int = 10000
    """with --lam > 0: the critics fit the Monte-Carlo returns for this many steps before the first
    lambda-returns are computed from the target networks, and these are recomputed every this many steps.
    Lambda-returns take the level of the critics they bootstrap from, which --critic-init paper critics reach
    in about 10k steps, mean-target ones in 2k-5k"""
    critic_init: Literal["paper", "mean-target"] = "paper"
    """paper: the usual initialisation; mean-target: each critic's output bias starts at the mean of its
    pre-training targets (the soft returns), so pre-training fits the shape of Q, not its level (when the
    critics are pre-trained)"""
    critic_bootstrap: bool = False
    """pre-train each critic on a bootstrap resample of its own (Poisson(1) weights per transition), so that
    critics fit to the same returns still disagree where the data say little, as EDAC's pessimism needs"""
    num_critics: Optional[int] = None
    """size of the critic ensemble N (None: per dataset from the authors' table, else 10)"""
    eta: Optional[float] = None
    """weight of EDAC's gradient-diversity term (None: per dataset from the authors' table, else 1)"""
    pretrain_eta: Optional[float] = None
    """weight of the diversity term while the critics pre-train (None: --eta); a larger one pushes their action
    gradients further apart"""
    critic_warmup_steps: int = 0
    """critic warm-up: steps after pre-training (inside --total-steps) in which only the critics learn, on EDAC's
    own targets, while actor and temperature stay as pre-training left them (with --pretrain none: as initialised)"""
    bc_weight: float = 1.0
    """weight of the behaviour-cloning term against the SAC actor loss, both scaled to unit size"""
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
    action_saturation: float = 0.999
    """soft BC: a dataset action coordinate at or beyond this fraction of the bound counts as saturated
    (clipped), and its likelihood is the probability the policy puts beyond that point rather than a
    density there (1 keeps the density everywhere, as the authors do)"""
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


# Per-dataset settings of the paper's authors: ensemble size N, eta, budgets, pre-training steps.
ADROIT_DEMO_LENGTHS = {"pen": 100, "door": 300, "hammer": 624, "relocate": 527}  # steps, the longest human one
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
    if env_name in ADROIT_DEMO_LENGTHS:
        return dict(num_critics=num_critics, eta=eta, total_steps=300_000, pretrain_steps=200_000)
    total = {"halfcheetah": 100_000, "hopper": 500_000, "walker2d": 500_000}.get(env_name, 1_000_000)
    pretrain = 100_000 if env_name == "walker2d" else 20_000
    return dict(num_critics=num_critics, eta=eta, total_steps=total, pretrain_steps=pretrain)


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


def edac_init(layers, heads, bound) -> None:
    """EDAC's initialisation (An et al., 2021, as CORL and the paper's authors): hidden biases 0.1, output
    layers uniform in +-bound (1e-3 for the actor's mean and log-std, 3e-3 for the critics), so that the
    first outputs are small."""
    for layer in layers:
        if isinstance(layer, (nn.Linear, VectorizedLinear)):
            nn.init.constant_(layer.bias, 0.1)
    for head in heads:
        nn.init.uniform_(head.weight, -bound, bound)
        nn.init.uniform_(head.bias, -bound, bound)


class Actor(nn.Module):
    """Tanh-Gaussian policy with 3 hidden layers and separate mean and log-std heads."""

    def __init__(self, obs_dim, act_dim, max_action, hidden_dim, layernorm, bf16=False):
        super().__init__()
        self.trunk = nn.Sequential(*hidden_layers(obs_dim, hidden_dim, 3, layernorm))
        self.mean = nn.Linear(hidden_dim, act_dim)
        self.log_std = nn.Linear(hidden_dim, act_dim)
        edac_init(self.trunk, [self.mean, self.log_std], bound=1e-3)
        self.max_action, self.bf16 = max_action, bf16

    def distribution(self, obs):
        with low_precision(obs, self.bf16):
            hidden = self.trunk(obs)
        hidden = hidden.float()
        return self.mean(hidden), self.log_std(hidden).clamp(-5.0, 2.0)

    def forward(self, obs, noise):
        """Reparameterised sample a = max_action * tanh(mean + std * noise) and its log-probability."""
        mean, log_std = self.distribution(obs)
        pre_tanh = mean + log_std.exp() * noise
        return self.max_action * torch.tanh(pre_tanh), self.log_prob_pre_tanh(mean, log_std, pre_tanh)

    def log_prob_pre_tanh(self, mean, log_std, pre_tanh):
        return self.coordinate_log_density(mean, log_std, pre_tanh).sum(-1)

    def coordinate_log_density(self, mean, log_std, pre_tanh):
        gaussian = -0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        # Change of variables: log|d a / d u| = log(max_action) + log(1 - tanh(u)^2), written stably.
        log_det = 2 * (math.log(2) - pre_tanh - F.softplus(-2 * pre_tanh)) + math.log(self.max_action)
        return gaussian - log_det

    def data_log_prob(self, mean, log_std, action, saturation):
        """Log-likelihood of dataset actions. A coordinate at or beyond `saturation` x max_action counts as
        saturated, i.e. clipped by whatever produced the data (censored): its likelihood is the mass the
        policy puts beyond that point, log P(+-u >= atanh(saturation)) = log Phi((+-mean - atanh(saturation))
        / std). A density there instead asks for pre-tanh values near atanh(1 - 1e-6) = 7.25: its negative
        log grows without bound as the action nears the bound (thousands of nats for a narrow policy that
        does not reach it), and such coordinates dominate the loss.
        saturation = 1 keeps the density everywhere, through atanh of the action clipped to +-(1 - 1e-6)."""
        a = action / self.max_action
        if saturation >= 1:
            return self.log_prob_pre_tanh(mean, log_std, torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6)))
        density = self.coordinate_log_density(mean, log_std, torch.atanh(a.clamp(-saturation, saturation)))
        side = torch.sign(a)
        mass = torch.special.log_ndtr((side * mean - math.atanh(saturation)) / log_std.exp())
        return torch.where(a.abs() >= saturation, mass, density).sum(-1)

    def deterministic(self, obs):
        return self.max_action * torch.tanh(self.distribution(obs)[0])


class Critic(nn.Module):
    """N critics with 3 hidden layers as one vectorised ensemble: Q(s, a) -> [N, B].
    The action may be given per member, [N, B, A], to take each member's gradient with respect to it."""

    def __init__(self, obs_dim, act_dim, hidden_dim, layernorm, num_critics, bf16=False):
        super().__init__()
        members = partial(VectorizedLinear, ensemble_size=num_critics)
        self.trunk = nn.Sequential(*hidden_layers(obs_dim + act_dim, hidden_dim, 3, layernorm, members))
        self.head = VectorizedLinear(hidden_dim, 1, num_critics)
        edac_init(self.trunk, [self.head], bound=3e-3)
        self.num_critics, self.bf16 = num_critics, bf16

    def forward(self, obs, action):
        obs = obs.expand(self.num_critics, *obs.shape[-2:])
        action = action.expand(self.num_critics, *action.shape[-2:])
        x = torch.cat([obs, action], dim=-1)
        with low_precision(x, self.bf16):
            hidden = self.trunk(x)
        return self.head(hidden.float()).squeeze(-1)


@dataclass
class Learner:
    """What the updates change: the networks, the target critics, the temperature and the optimisers."""

    actor: Actor
    critic: Critic
    target_critic: Critic
    log_alpha: torch.Tensor
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    alpha_opt: torch.optim.Optimizer


def make_learner(obs_dim, act_dim, max_action, args, device) -> Learner:
    bf16 = args.precision == "bf16"
    actor = Actor(obs_dim, act_dim, max_action, args.hidden_dim, args.actor_layernorm, bf16=bf16).to(device)
    critic = Critic(obs_dim, act_dim, args.hidden_dim, args.critic_layernorm, args.num_critics, bf16=bf16).to(device)
    target_critic = copy.deepcopy(critic)
    log_alpha = torch.zeros((), device=device, requires_grad=True)
    # Fused Adam: one kernel updates all of a network's parameters (CPU and GPU alike).
    # (capturable: the optimisers' step counts stay on the GPU, so that a CUDA graph can replay their steps.)
    capturable = args.compile and device.type == "cuda"
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=True, capturable=capturable)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, fused=True, capturable=capturable)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.learning_rate, fused=True, capturable=capturable)
    return Learner(actor, critic, target_critic, log_alpha, actor_opt, critic_opt, alpha_opt)


def polyak_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    # One fused call over all tensors instead of a Python loop per parameter.
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def critic_loss_with_diversity(critic, obs, actions, target, eta, weights=None):
    """Regression of all N critics onto `target` (each transition weighted per critic by `weights` [N, B], if
    given), plus EDAC's diversity term, from ONE forward pass: each member gets its own copy of the actions, so
    one backward gives every member's action gradient.
    Diversity = mean over the batch of sum_{i != j} <g_i, g_j> / (N - 1), g_i = grad_a Q_i / |grad_a Q_i|.
    Returns the loss and its parts (regression, diversity, mean Q of the given actions)."""
    actions = actions.expand(critic.num_critics, -1, -1).clone().requires_grad_(True)
    q = critic(obs, actions)
    squared_errors = (q - target).pow(2) if weights is None else (q - target).pow(2) * weights
    regression = squared_errors.mean(1).sum()
    grads = torch.autograd.grad(q.sum(), actions, create_graph=True)[0]
    grads = grads / (grads.norm(dim=-1, keepdim=True) + 1e-10)
    # sum_{i != j} <g_i, g_j> = |sum_i g_i|^2 - sum_i |g_i|^2
    cosine_sum = grads.sum(0).pow(2).sum(-1) - grads.pow(2).sum((0, 2))
    diversity = cosine_sum.mean() / (critic.num_critics - 1)
    return regression + eta * diversity, {"regression": regression, "diversity": diversity, "q_data": q.mean()}


# ================================================================================================ pre-training
def training_phases(args) -> tuple:
    """Where the phases end inside the budget: soft BC of the actor on [0, actor_end), the critics on
    [actor_end, pretrain_end), the critic warm-up on [pretrain_end, warmup_end), EDAC after. An ablation that
    skips a phase skips its steps."""
    actor_share = round(args.pretrain_steps * args.actor_pretrain_fraction)
    actor_end = actor_share if args.pretrain in ("actor-critic", "actor") else 0
    pretrain_end = actor_end + (args.pretrain_steps - actor_share if args.pretrain in ("actor-critic", "critic") else 0)
    return actor_end, pretrain_end, pretrain_end + args.critic_warmup_steps


def soft_bc_step(learner, batch, noise, args):
    """Soft behaviour cloning: maximise log pi(a|s) of dataset actions plus the entropy bonus.
    Returns the step's metrics, as tensors left on the device."""
    actor, log_alpha = learner.actor, learner.log_alpha
    alpha = log_alpha.exp().detach()
    # One pass through the trunk serves both the sampled action and the dataset action.
    mean, log_std = actor.distribution(batch["observations"])
    log_prob = actor.log_prob_pre_tanh(mean, log_std, mean + log_std.exp() * noise)
    data_log_prob = actor.data_log_prob(mean, log_std, batch["actions"], args.action_saturation)
    actor_loss = (alpha * log_prob - data_log_prob).mean()
    learner.actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    learner.actor_opt.step()
    target_entropy = -float(batch["actions"].shape[-1])  # -|A|
    alpha_loss = (-log_alpha * (log_prob.detach() + target_entropy)).mean()
    learner.alpha_opt.zero_grad(set_to_none=True)
    alpha_loss.backward()
    learner.alpha_opt.step()
    return {"losses/pretrain_actor": actor_loss, "losses/alpha": alpha_loss, "charts/alpha": alpha,
            "charts/entropy": -log_prob.detach().mean(), "charts/log_std": log_std.detach().mean()}


@torch.no_grad()
def dataset_entropies(data, actor, sampler, samples, chunk=65536):
    """H(s') = -log pi(a~|s'), a~ ~ pi(.|s'), averaged over a few samples, for every next state."""
    entropies = []
    for start in progress_over(range(0, len(data["rewards"]), chunk), "entropies for the soft returns"):
        next_obs = data["next_observations"][start:start + chunk]
        total = 0.0
        for _ in range(samples):
            noise = torch.randn(next_obs.shape[0], data["actions"].shape[1], device=next_obs.device, generator=sampler)
            total = total - actor(next_obs, noise)[1]
        entropies.append(total / samples)
    return torch.cat(entropies)


def dataset_soft_returns(data, next_entropies, alpha, args):
    """Soft Monte-Carlo returns-to-go (rewards plus discounted entropy bonuses) of every transition."""
    returns = soft_returns(data["rewards"].cpu().numpy(), next_entropies.double().cpu().numpy(),
                           data["terminations"].cpu().numpy(), data["truncations"].cpu().numpy(), args.gamma, alpha,
                           args.bootstrap_truncated)
    return torch.as_tensor(returns, dtype=torch.float32, device=data["rewards"].device)


@torch.no_grad()
def dataset_soft_lambda_returns(data, next_entropies, learner, sampler, args, chunk=65536):
    """Soft lambda-returns. The soft reward r + gamma*alpha*(1-term)*H(s') already holds the entropy part
    of V(s') = min_i Q'_i(s', a~') - alpha*log pi(a~'|s'), so the bootstrap value is min_i Q'_i(s', a~')."""
    next_values = []
    for start in progress_over(range(0, len(data["rewards"]), chunk), "soft lambda-returns"):
        next_obs = data["next_observations"][start:start + chunk]
        noise = torch.randn(next_obs.shape[0], data["actions"].shape[1], device=next_obs.device, generator=sampler)
        next_values.append(learner.target_critic(next_obs, learner.actor(next_obs, noise)[0]).min(0).values)
    next_values = torch.cat(next_values).double().cpu().numpy()
    terminations = data["terminations"].cpu().numpy().astype(bool)
    alpha = learner.log_alpha.exp().item()
    soft_rewards = (data["rewards"].double().cpu().numpy()
                    + args.gamma * alpha * (~terminations) * next_entropies.double().cpu().numpy())
    returns = lambda_returns(soft_rewards, next_values, terminations, data["truncations"].cpu().numpy(),
                             args.gamma, args.lam, args.bootstrap_truncated)
    return torch.as_tensor(returns, dtype=torch.float32, device=data["rewards"].device)


def start_critics_at_mean_target(learner, returns_to_go) -> None:
    """--critic-init mean-target: every critic's output bias (its target copy's too) starts at the mean
    pre-training target, b_j = mean_i G_i, so that pre-training spends its steps on the shape of Q rather than
    on first growing its level. The output layer reads LayerNorm-ed features, so Adam moves Q by only about
    lr x (width / 2) ~ 0.04 per step: reaching returns of ~250 from ~0 alone takes thousands of steps."""
    with torch.no_grad():
        for critic in (learner.critic, learner.target_critic):
            critic.head.bias.fill_(returns_to_go.mean())


def soft_return_targets(data, learner, sampler, args):
    """The critics' pre-training targets, made once soft BC is done: the pre-trained actor's entropies H(s') and
    the soft returns they give; with --critic-init mean-target, the critics then start at the returns' mean."""
    next_entropies = dataset_entropies(data, learner.actor, sampler, args.entropy_samples)
    returns_to_go = dataset_soft_returns(data, next_entropies, learner.log_alpha.exp().item(), args)
    if args.critic_init == "mean-target":
        start_critics_at_mean_target(learner, returns_to_go)
    return next_entropies, returns_to_go


def bootstrap_weights(num_transitions, args, device):
    """--critic-bootstrap: how often each transition is in each critic's resample of the data, Poisson(1) (the
    online bootstrap), [transitions, N]. From a generator of its own, so that a resumed run draws the same
    resamples and the training's random stream stays as it is."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([args.seed, 3]).generate_state(1)[0]))
    return torch.poisson(torch.ones(num_transitions, args.num_critics), generator=generator).to(device)


def critic_pretrain_step(learner, batch, returns_to_go, noise, args):
    """All N critics regress onto the soft returns, with the diversity term on; actor and alpha stay frozen."""
    weights = batch["critic_weights"].T if "critic_weights" in batch else None  # with --critic-bootstrap
    eta = args.eta if args.pretrain_eta is None else args.pretrain_eta
    loss, parts = critic_loss_with_diversity(learner.critic, batch["observations"], batch["actions"], returns_to_go,
                                             eta, weights)
    learner.critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    learner.critic_opt.step()
    polyak_update(learner.critic, learner.target_critic, args.tau)
    with torch.no_grad():
        q_policy = learner.critic(batch["observations"], learner.actor(batch["observations"], noise)[0])
    return {"losses/pretrain_critic": parts["regression"], "losses/diversity": parts["diversity"],
            "values/q_data": parts["q_data"], "values/q_policy": q_policy.mean(), "values/target": returns_to_go.mean()}


# ================================================================================================ EDAC
def edac_step(learner, batch, noise, next_noise, args):
    """One EDAC+BC update: temperature, actor (against the ensemble's minimum, plus BC), critics with
    diversity.
    Returns the step's metrics, as tensors left on the device."""
    actor, critic, log_alpha = learner.actor, learner.critic, learner.log_alpha
    action, log_prob = actor(batch["observations"], noise)
    target_entropy = -float(batch["actions"].shape[-1])  # -|A|
    alpha_loss = (-log_alpha * (log_prob.detach() + target_entropy)).mean()
    learner.alpha_opt.zero_grad(set_to_none=True)
    alpha_loss.backward()
    learner.alpha_opt.step()
    alpha = log_alpha.exp().detach()

    critic.requires_grad_(False)  # the actor's loss needs dQ/da, not gradients for the critics' weights
    q_policy = critic(batch["observations"], action)
    critic.requires_grad_(True)
    actor_loss = (alpha * log_prob - q_policy.min(0).values).mean()
    bc_loss = F.mse_loss(action, batch["actions"])
    learner.actor_opt.zero_grad(set_to_none=True)
    # Divide by ABSOLUTE detached values: dividing by a signed one flips the gradient when the loss < 0.
    scaled_bc = bc_loss / bc_loss.detach().clamp_min(1e-8)
    (actor_loss / actor_loss.detach().abs().clamp_min(1e-8) + args.bc_weight * scaled_bc).backward()
    learner.actor_opt.step()
    return edac_critic_update(learner, batch, next_noise, alpha, args) | {
        "losses/actor": actor_loss, "losses/bc": bc_loss, "losses/alpha": alpha_loss,
        "values/q_policy": q_policy.detach().mean(), "charts/alpha": alpha, "charts/entropy": -log_prob.detach().mean()}


def edac_critic_update(learner, batch, next_noise, alpha, args):
    """EDAC's critic half: all N critics regress onto the soft TD target of the current actor, with diversity."""
    actor, critic = learner.actor, learner.critic
    with torch.no_grad():
        next_action, next_log_prob = actor(batch["next_observations"], next_noise)
        next_v = learner.target_critic(batch["next_observations"], next_action).min(0).values - alpha * next_log_prob
        # Bootstrap through truncations (time limits), never through true terminals.
        td_target = batch["rewards"] + args.gamma * (1.0 - batch["terminations"]) * next_v
    critic_loss, parts = critic_loss_with_diversity(critic, batch["observations"], batch["actions"], td_target,
                                                    args.eta)
    learner.critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    learner.critic_opt.step()
    polyak_update(critic, learner.target_critic, args.tau)
    return {"losses/critic": parts["regression"], "losses/diversity": parts["diversity"],
            "values/q_data": parts["q_data"], "values/target": td_target.mean()}


def critic_warmup_step(learner, batch, noise, next_noise, args):
    """--critic-warmup-steps: EDAC's critic half alone. Pre-trained critics fit the behaviour policy's soft
    returns and agree as much at the actor's actions as at the data's; these steps let them take EDAC's own
    targets, and their spread there, before the actor starts to follow their minimum."""
    with torch.no_grad():
        q_policy = learner.critic(batch["observations"], learner.actor(batch["observations"], noise)[0])
    return edac_critic_update(learner, batch, next_noise, learner.log_alpha.exp().detach(), args) | {
        "values/q_policy": q_policy.mean()}


# ================================================================================================ training loop
def schedule(args) -> str:
    actor_end, pretrain_end, _ = training_phases(args)
    phases = ([f"soft BC of the actor ({actor_end:,} steps)"] if actor_end else []) + \
        ([f"the critics on soft returns ({pretrain_end - actor_end:,} steps)"] if pretrain_end > actor_end else [])
    pretrain_eta = f" ({args.pretrain_eta:g} in pre-training)" if args.pretrain_eta is not None and \
        pretrain_end > actor_end else ""
    phases += [f"a critic warm-up ({args.critic_warmup_steps:,} steps)"] if args.critic_warmup_steps else []
    return (f"{args.total_steps:,} gradient steps: {', then '.join(phases + ['EDAC'])} with N = {args.num_critics} "
            f"critics and eta {args.eta:g}{pretrain_eta}" + lambda_schedule(args, pretrain_end - actor_end))


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
    data, obs_stats = states_normalised_on_device(data, device)
    returns_to_go = next_entropies = None  # the soft returns need the pre-trained actor: they come after soft BC
    (num_transitions, obs_dim), act_dim = data["observations"].shape, data["actions"].shape[1]
    data |= {"critic_weights": bootstrap_weights(num_transitions, args, device)} if args.critic_bootstrap else {}
    learner = make_learner(obs_dim, act_dim, float(datasets[0].action_space.high[0]), args, device)
    soft_bc_update, critic_pretrain_update, critic_warmup_update, rl_update = speed_up(
        [soft_bc_step, critic_pretrain_step, critic_warmup_step, edac_step], learner, device, args)  # with --compile
    actor_end, pretrain_end, warmup_end = training_phases(args)

    run = Run(args, datasets, obs_stats, device, checkpoint, schedule(args))  # logs, evaluation, signals
    if checkpoint is not None:
        restore(learner, sampler, checkpoint, args)
        if checkpoint["next_entropies"] is not None:
            returns_to_go, next_entropies = (checkpoint[k].to(device) for k in ("returns_to_go", "next_entropies"))
    for step in range(run.start_step, args.total_steps):
        idx = torch.randint(num_transitions, (args.batch_size,), device=device, generator=sampler)
        batch = {k: v[idx] for k, v in data.items()}
        noise, next_noise = torch.randn(2, args.batch_size, act_dim, device=device, generator=sampler)
        if step < actor_end:  # 1. soft behaviour cloning of the actor and its temperature
            metrics = soft_bc_update(learner, batch, noise, args)
        elif step < pretrain_end:  # 2. the critics, on soft returns of the frozen actor
            if next_entropies is None:
                next_entropies, returns_to_go = soft_return_targets(data, learner, sampler, args)
            # lambda-returns bootstrap from the critics, so they come once the critics fit the MC returns.
            if args.lam > 0 and step > actor_end and (step - actor_end) % args.lambda_refresh_interval == 0:
                returns_to_go = dataset_soft_lambda_returns(data, next_entropies, learner, sampler, args)
            metrics = critic_pretrain_update(learner, batch, returns_to_go[idx], noise, args)
        elif step < warmup_end:  # (--critic-warmup-steps) a critic warm-up: EDAC's critic update alone
            metrics = critic_warmup_update(learner, batch, noise, next_noise, args)
        else:  # 3. EDAC from the pre-trained networks
            metrics = rl_update(learner, batch, noise, next_noise, args)

        done = step + 1
        run.log(done, metrics, phase="soft BC" if done < actor_end else "critics" if done < pretrain_end else
                "critic warm-up" if done < warmup_end else "EDAC")
        if done % args.log_interval == 0:  # is the ensemble's pessimism there where the actor acts?
            run.write(done, ensemble_spread(learner, data))
        if done == pretrain_end or (done < pretrain_end and done % args.eval_interval == 0):
            run.log_fit(done, pretraining_fit(learner, data, returns_to_go, args), done == pretrain_end)
        if done % args.eval_interval == 0 or done == args.total_steps:
            run.evaluate(done, learner.actor)
        if run.stop_signal or done == args.total_steps or (args.checkpoint_interval
                                                           and done % args.checkpoint_interval == 0):
            run.save_checkpoint(done, learner, sampler, returns_to_go=returns_to_go, next_entropies=next_entropies)
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
        actions = actor.deterministic(obs_t).cpu().numpy()
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
    explained variance of their (soft) targets, 1 - Var(G - Q_j) / Var(G) averaged over the critics, their
    mean prediction beside the mean target, the deterministic actor's behaviour-cloning error, and the
    temperature and policy entropy that the soft returns carry into EDAC."""
    n = len(data["rewards"])
    idx = torch.linspace(0, n - 1, min(sample_size, n), device=data["rewards"].device).long()
    obs, actions = data["observations"][idx], data["actions"][idx]
    # Noise from a generator of its own, so that measuring leaves training's random stream untouched.
    generator = torch.Generator(obs.device).manual_seed(0)
    noise = torch.randn(len(idx), actions.shape[1], generator=generator, device=obs.device)
    fit = {"pretrain/bc_mse": F.mse_loss(learner.actor.deterministic(obs), actions),
           "pretrain/alpha": learner.log_alpha.exp(), "pretrain/entropy": -learner.actor(obs, noise)[1].mean()}
    if returns_to_go is not None:  # the critics were pre-trained
        target, q = returns_to_go[idx], learner.critic(obs, actions)
        explained = 1 - (target - q).var(dim=1) / target.var().clamp_min(1e-8)
        fit |= {"pretrain/critic_explained_variance": explained.mean(), "pretrain/q_mean": q.mean(),
                "pretrain/target_mean": target.mean()}
    return fit


@torch.no_grad()
def ensemble_spread(learner, data, sample_size=2048):
    """EDAC's pessimism is the spread of its N critics where the actor acts: critics regressed onto the same
    returns may agree off the data, and then their minimum holds the actor back no more than one critic would.
    On a fixed sample of the data's states: the std across the critics at the dataset's actions and at actions
    the actor samples, and how far those lie from the dataset's (root mean square over coordinates)."""
    n = len(data["rewards"])
    idx = torch.linspace(0, n - 1, min(sample_size, n), device=data["rewards"].device).long()
    obs, actions = data["observations"][idx], data["actions"][idx]
    generator = torch.Generator(obs.device).manual_seed(0)  # noise of its own: training's random stream is untouched
    policy_actions = learner.actor(obs, torch.randn(actions.shape, generator=generator, device=obs.device))[0]
    return {"ensemble/std_data_actions": learner.critic(obs, actions).std(0).mean(),
            "ensemble/std_policy_actions": learner.critic(obs, policy_actions).std(0).mean(),
            "ensemble/policy_distance": (policy_actions - actions).pow(2).mean(-1).sqrt().mean()}


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
        "total_steps", "batch_size", "hidden_dim", "eval_interval", "log_interval", "entropy_samples",
        "lambda_refresh_interval") if getattr(args, name) <= 0]
    problems += [f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}" for name in (
        "pretrain_steps", "critic_warmup_steps", "bc_weight", "eval_episodes", "checkpoint_interval")
        if (getattr(args, name) or 0) < 0]
    problems += [rule for rule, holds in {
        f"--lam must lie in [0, 1] (0 is Monte-Carlo, 1 is one-step TD), got {args.lam}": 0 <= args.lam <= 1,
        f"--tau must lie in (0, 1], got {args.tau}": 0 < args.tau <= 1,
        f"--gamma must lie in [0, 1), got {args.gamma}": 0 <= args.gamma < 1,
        f"--learning-rate must be positive, got {args.learning_rate}": args.learning_rate > 0,
        f"--threads must be positive (omit it for one per core), got {args.threads}":
            args.threads is None or args.threads > 0,
        f"--num-critics must be at least 2 (EDAC's diversity term compares critics), got {args.num_critics}":
            args.num_critics >= 2,
        f"--eta must not be negative, got {args.eta}": args.eta >= 0,
        f"--pretrain-eta must not be negative, got {args.pretrain_eta}": (args.pretrain_eta or 0) >= 0,
        f"--actor-pretrain-fraction must lie in [0, 1], got {args.actor_pretrain_fraction}":
            0 <= args.actor_pretrain_fraction <= 1,
        f"--action-saturation must lie in (0, 1], got {args.action_saturation}": 0 < args.action_saturation <= 1,
    }.items() if not holds]
    if args.pretrain_steps > args.total_steps > 0:  # (a non-positive total is reported above)
        source = {key: ", this dataset's default" if key in defaulted else "" for key in ("pretrain_steps",
                                                                                         "total_steps")}
        problems.append(f"--pretrain-steps ({args.pretrain_steps}{source['pretrain_steps']}) cannot exceed "
                        f"--total-steps ({args.total_steps}{source['total_steps']}): pre-training counts inside the "
                        "total budget; " + (f"pass --pretrain-steps {args.total_steps // 2} (say), or a larger "
                        "--total-steps" if args.resume is None else "a resumed run keeps its pre-training: pass a "
                        f"--total-steps of at least {args.pretrain_steps}, or start a new run"))
    elif training_phases(args)[2] > args.total_steps > 0:
        problems.append(f"--critic-warmup-steps ({args.critic_warmup_steps}) does not fit: pre-training ends at step "
                        f"{training_phases(args)[1]} of --total-steps {args.total_steps}; " + (
                            "pass a smaller --critic-warmup-steps or a larger --total-steps" if args.resume is None else
                            f"pass a --total-steps of at least {training_phases(args)[2]}, or start a new run"))
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
    # (Not the critics: the diversity term backpropagates through their action gradients, a double backward
    # that torch.compile does not support.)
    for network in (learner.actor, learner.target_critic):
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
