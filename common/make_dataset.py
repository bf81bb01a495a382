"""Make D4RL-style offline datasets locally, in Minari format, for any continuous-control Gymnasium env.

For users without access to Minari's servers, or with an environment of their own. It follows the protocol
D4RL used for the datasets of the paper (`--protocol sampled`, the default):
  1. trains a behaviour policy online with Soft Actor-Critic (Haarnoja et al., 2018; two hidden layers of
     256, as D4RL's rlkit SAC), saving the whole stochastic policy (its tanh-Gaussian: trunk, mean and
     log-std heads) at every evaluation, with its average return measured with sampled actions;
  2. writes Minari datasets under `<namespace>/<env>/`:
       random-v0         uniformly random actions,
       medium-replay-v0  SAC's whole replay buffer up to the medium checkpoint,
       medium-v0         1M transitions of actions sampled from the first checkpoint whose average return
                         reaches the medium level (no added noise, no clipping),
       expert-v0         the same for the expert level, with `--stop-at expert`,
       medium-expert-v0  medium-v0 and expert-v0 together, when both exist;
  3. stores in each its D4RL reference scores, the protocol, the checkpoint and its return, the behaviour
     policy's action spread and these arguments, through Minari's own `create_dataset_from_buffers`;
  4. resumes from its saved learner state when re-run with the same `--work-dir` after an interruption.

`--protocol mean-plus-noise` keeps the earlier protocol of this project (the policy's deterministic action
plus N(0, --action-noise^2) noise, clipped to the bounds; namespace `local-noise`), so that datasets made
with it can be rebuilt from their saved policies; `--learner ars` (linear policies, Mania et al., 2018)
needs it. How the default differs from D4RL: Gymnasium MuJoCo v5 rather than mujoco-py environments, and
"medium" is a return level (default per environment, at D4RL's medium level) rather than a hand-picked
checkpoint.

Usage:
    python common/make_dataset.py --env-id Hopper-v5
    python common/make_dataset.py --env-id Hopper-v5 --medium-policy hopper_medium.npz   # no training
    MINARI_DATASETS_PATH=~/my_datasets python common/make_dataset.py --env-id Walker2d-v5 --medium-return 2500
"""

import dataclasses
import json
import os
import pickle
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from minari.data_collector import EpisodeBuffer
from tqdm import tqdm

# Progress bars redraw twice a second on a terminal, but only every 30 s into a log file.
REFRESH = 0.5 if sys.stderr.isatty() else 30
# Minari asks for optional metadata (author, code permalink, ...) on every dataset it writes.
warnings.filterwarnings("ignore", category=UserWarning, module="minari")

# D4RL's reference returns (random policy / expert policy) for normalised scores.
D4RL_REFERENCE_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
# Per environment: the medium return level at D4RL's medium datasets (about 44, 41 and 63 normalised for
# hopper, halfcheetah and walker2d) and an expert level near D4RL's expert reference, and ARS settings from
# Mania et al. (2018, V2-t) with the survival bonus ARS subtracts while training.
ENV_DEFAULTS = {
    "hopper": dict(medium_return=1400.0, expert_return=3200.0, directions=8, top_directions=4, step_size=0.01,
                   exploration_noise=0.025, reward_shift=1.0),
    "halfcheetah": dict(medium_return=4800.0, expert_return=10000.0, directions=32, top_directions=4,
                        step_size=0.02, exploration_noise=0.03, reward_shift=0.0),
    "walker2d": dict(medium_return=2900.0, expert_return=4500.0, directions=40, top_directions=30,
                     step_size=0.025, exploration_noise=0.01, reward_shift=1.0),
}
FALLBACK_DEFAULTS = dict(medium_return=None, expert_return=None, directions=16, top_directions=8, step_size=0.02,
                         exploration_noise=0.03, reward_shift=0.0)
NAMESPACES = {"sampled": "local", "mean-plus-noise": "local-noise"}


@dataclass
class Args:
    env_id: str = "Hopper-v5"
    """Gymnasium environment id with a continuous (Box) action space"""
    protocol: Literal["sampled", "mean-plus-noise"] = "sampled"
    """sampled: actions sampled from the SAC policy's tanh-Gaussian, as D4RL; mean-plus-noise: the policy's
    deterministic action plus Gaussian noise, clipped to the bounds (this project's earlier protocol)"""
    namespace: Optional[str] = None
    """Minari namespace: datasets are written as <namespace>/<env>/<kind>-v0 (None: local for sampled,
    local-noise for mean-plus-noise)"""
    seed: int = 0
    """seed for the learner, environment resets and the actions' randomness"""
    learner: Literal["sac", "ars"] = "sac"
    """behaviour-policy learner: sac (as D4RL), or ars (linear deterministic policies; needs
    --protocol mean-plus-noise)"""
    stop_at: Literal["medium", "expert"] = "medium"
    """train until the medium level only, or go on to the expert level"""
    medium_return: Optional[float] = None
    """average return (of the protocol's actions) that counts as medium (None: per env, at D4RL's medium
    level: hopper 1400, halfcheetah 4800, walker2d 2900)"""
    expert_return: Optional[float] = None
    """average return that counts as expert (None: per env, hopper 3200, halfcheetah 10000,
    walker2d 4500)"""
    medium_size: int = 1_000_000
    """transitions in medium-v0 (and expert-v0), in whole episodes: the last one that reaches the size ends it"""
    random_size: int = 100_000
    """transitions in random-v0, in whole episodes as above (0 skips it)"""
    action_noise: float = 0.1
    """mean-plus-noise: std of the Gaussian noise added to the policy's deterministic action"""
    eval_episodes: int = 10
    """episodes per evaluation of a checkpoint"""
    medium_policy: Optional[str] = None
    """write medium-v0 from this saved policy instead of training, and skip medium-replay-v0: a
    <work-dir>/<env>/policy_step<N>.npz of an earlier run, the one its medium-v0 metadata name, or one of
    benchmark_results/behaviour_policies/ (None: train the policy)"""
    expert_policy: Optional[str] = None
    """with --medium-policy: also write expert-v0 and medium-expert-v0 from this saved policy (None: neither)"""
    sac_max_steps: int = 1_000_000
    """SAC: give up training after this many environment steps"""
    sac_eval_every: int = 10_000
    """SAC: evaluate and save the policy at the first episode end after every this many environment steps"""
    sac_random_steps: int = 5_000
    """SAC: uniformly random actions for this many first steps, before any update"""
    sac_hidden: int = 256
    """SAC: width of the two hidden layers of actor and critics"""
    sac_batch_size: int = 256
    """SAC: minibatch size (one update per environment step)"""
    max_iterations: int = 2000
    """ARS: give up training after this many iterations"""
    eval_every: int = 5
    """ARS: evaluate the (noisy) central policy every this many iterations"""
    replay_episodes_per_iteration: int = 2
    """ARS: learner rollouts kept per iteration for medium-replay-v0 (the first +/- direction pair)"""
    directions: Optional[int] = None
    """ARS: random directions per iteration (None: per env)"""
    top_directions: Optional[int] = None
    """ARS: best directions used in the update (None: per env)"""
    step_size: Optional[float] = None
    """ARS: step size (None: per env)"""
    exploration_noise: Optional[float] = None
    """ARS: std of the parameter perturbations (None: per env)"""
    reward_shift: Optional[float] = None
    """ARS: subtracted from every training reward to remove a survival bonus (None: per env)"""
    threads: int = 1
    """torch CPU threads for SAC (one update is too small to gain from more)"""
    work_dir: str = "runs/make_dataset"
    """policy checkpoints and the resumable learner state go to <work_dir>/<env>/"""
    overwrite: bool = False
    """rewrite datasets that already exist instead of skipping them"""


def env_short_name(env_id: str) -> str:
    """'HalfCheetah-v5' -> 'halfcheetah'."""
    return env_id.split("/")[-1].split("-v")[0].lower()


# ------------------------------------------------------------------------------- policies and rollouts
def mlp(layers, x):
    """ReLU network in NumPy from [(W, b), ...]; no activation after the last layer."""
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def inside_bounds(action, low, high):
    """float32 actions, strictly inside the box. A tanh value within float32's resolution of the bound would
    round onto it (tanh(z) rounds to 1 for z > 9); it is stored as the nearest float32 inside instead, so that
    every action keeps a finite likelihood under the policy. This moves no action by more than 6e-8."""
    action = action.astype(np.float32)
    low, high = low.astype(np.float32), high.astype(np.float32)
    return np.clip(action, np.nextafter(low, high), np.nextafter(high, low))


class TanhGaussianPolicy:
    """SAC's policy in NumPy, so that collecting data needs no torch: z ~ N(mu(s), sigma(s)^2) and
    a = low + (tanh(z) + 1) (high - low) / 2, with mu and log sigma (clipped to [-5, 2]) two linear heads on a
    ReLU trunk over raw observations (SAC normalises nothing)."""

    kind = "tanh-gaussian"

    def __init__(self, trunk, mean_head, log_std_head, low, high):
        self.trunk, self.mean_head, self.log_std_head, self.low, self.high = trunk, mean_head, log_std_head, low, high

    def distribution(self, obs):
        """mu(s) and log sigma(s) of the pre-tanh Gaussian."""
        h = np.maximum(mlp(self.trunk, obs), 0.0)
        return mlp([self.mean_head], h), np.clip(mlp([self.log_std_head], h), -5.0, 2.0)

    def to_box(self, unit_action):
        return self.low + (unit_action + 1.0) * (self.high - self.low) / 2

    def __call__(self, obs):
        """The deterministic (mean) action."""
        return self.to_box(np.tanh(self.distribution(obs)[0]))

    def sample(self, obs, rng):
        mean, log_std = self.distribution(obs)
        z = mean + np.exp(log_std) * rng.standard_normal(mean.shape)
        return inside_bounds(self.to_box(np.tanh(z)), self.low, self.high)

    def save(self, path, **extra):
        layers = {f"trunk_w{i}": w for i, (w, _) in enumerate(self.trunk)}
        layers |= {f"trunk_b{i}": b for i, (_, b) in enumerate(self.trunk)}
        np.savez(path, kind=self.kind, mean_w=self.mean_head[0], mean_b=self.mean_head[1],
                 log_std_w=self.log_std_head[0], log_std_b=self.log_std_head[1], low=self.low, high=self.high,
                 **layers, **extra)


class LinearPolicy:
    """a = clip(W (s - mean) / std): ARS's linear policy on running-normalised observations (deterministic)."""

    kind = "linear"

    def __init__(self, weights, obs_mean, obs_std, low, high):
        self.weights, self.obs_mean, self.obs_std, self.low, self.high = weights, obs_mean, obs_std, low, high

    def __call__(self, obs, weights=None):
        w, x = self.weights if weights is None else weights, (obs - self.obs_mean) / self.obs_std
        return np.clip(w @ x if x.ndim == 1 else x @ w.T, self.low, self.high)

    def save(self, path, **extra):
        np.savez(path, kind=self.kind, weights=self.weights, obs_mean=self.obs_mean, obs_std=self.obs_std,
                 low=self.low, high=self.high, **extra)


class MeanActionPolicy:
    """The mean action of a SAC actor, the only part saved by this project's earlier versions (kind 'mlp')."""

    kind = "mlp"

    def __init__(self, layers, low, high):
        self.layers, self.low, self.high = layers, low, high

    def __call__(self, obs):
        return self.low + (np.tanh(mlp(self.layers, obs)) + 1.0) * (self.high - self.low) / 2


def read_policy(path):
    """A policy saved by this script (files without `kind` are ARS's linear ones) and its saved metadata."""
    f = np.load(path)
    kind = str(f["kind"]) if "kind" in f else "linear"
    if kind == "tanh-gaussian":
        trunk = [(f[f"trunk_w{i}"], f[f"trunk_b{i}"]) for i in range(sum(k.startswith("trunk_w") for k in f.files))]
        policy = TanhGaussianPolicy(trunk, (f["mean_w"], f["mean_b"]), (f["log_std_w"], f["log_std_b"]), f["low"],
                                    f["high"])
    elif kind == "mlp":
        policy = MeanActionPolicy([(f[f"w{i}"], f[f"b{i}"]) for i in range(sum(k.startswith("w") for k in f.files))],
                                  f["low"], f["high"])
    else:
        policy = LinearPolicy(f["weights"], f["obs_mean"], f["obs_std"], f["low"], f["high"])
    return policy, {k: f[k].item() for k in ("env_id", "avg_return", "env_steps") if k in f.files}


def load_policy(path, env, args):
    """The saved policy for --medium-policy / --expert-policy, refused with what to do when it cannot serve."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no policy file '{path}'; pass a policy_step<N>.npz saved by make_dataset.py.")
    policy, saved = read_policy(path)
    if "env_id" in saved and env_short_name(saved["env_id"]) != env_short_name(args.env_id):
        raise SystemExit(f"error: {path} is a policy for {saved['env_id']}, not {args.env_id}; pass the policy "
                         f"made with --env-id {args.env_id}, or change --env-id.")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    try:
        action = policy(np.zeros(obs_dim))
    except ValueError:
        action = None
    if action is None or action.shape != (act_dim,):
        raise SystemExit(f"error: {path} does not fit {args.env_id} (observations of size {obs_dim}, actions of "
                         f"size {act_dim}); pass a policy made with --env-id {args.env_id}.")
    if args.protocol == "sampled" and not isinstance(policy, TanhGaussianPolicy):
        raise SystemExit(f"error: {path} holds a deterministic policy (the earlier format), with no action "
                         "distribution to sample from; rebuild its data with --protocol mean-plus-noise, or pass a "
                         "tanh-Gaussian policy saved by this version of make_dataset.py.")
    return policy, saved


def protocol_actor(policy, args, rng):
    """act(obs) of the data-collecting policy: a sample of the tanh-Gaussian, or the mean action plus noise."""
    if args.protocol == "sampled":
        return lambda obs: policy.sample(obs, rng)
    low, high = policy.low, policy.high
    def act(obs):
        action = policy(obs)
        return np.clip(action + args.action_noise * rng.standard_normal(action.shape), low, high).astype(np.float32)
    return act


def rollout(env, act, seed=None, record=False):
    """Run one episode with act(obs). Returns its return, the visited observations and, if record,
    an EpisodeBuffer with the environment's own termination and truncation flags."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
    while True:
        action = act(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
        terminations.append(terminated)
        truncations.append(truncated)
        if terminated or truncated:
            break
    observations = np.asarray(observations)
    episode = None
    if record:
        episode = EpisodeBuffer(
            seed=seed,
            observations=observations,
            actions=np.asarray(actions, dtype=np.float32),
            rewards=np.asarray(rewards),
            terminations=np.asarray(terminations),
            truncations=np.asarray(truncations),
        )
    return float(np.sum(rewards)), observations, episode


def average_return(env, policy, args, seed):
    """Average return of the protocol's actions over --eval-episodes, reproducible from (args.seed, seed)."""
    rng = np.random.default_rng([args.seed, seed])
    act = protocol_actor(policy, args, rng)
    return float(np.mean([rollout(env, act, seed=int(rng.integers(2**31)))[0] for _ in range(args.eval_episodes)]))


def evaluate_and_checkpoint(args, settings, env, policy, state, work_dir, progress):
    """Save the policy with its average return (of the protocol's actions) at every evaluation; the medium
    and expert datasets come from the first checkpoints that reach their levels."""
    avg = average_return(env, policy, args, state["iteration"])
    path = os.path.join(work_dir, f"policy_step{state['env_steps']}.npz")
    policy.save(path, avg_return=avg, iteration=state["iteration"], env_steps=state["env_steps"],
                env_id=args.env_id, protocol=args.protocol)
    state["history"].append((state["iteration"], state["env_steps"], avg, path))
    for name in ("medium", "expert"):
        level = settings[f"{name}_return"]
        if level is not None and avg >= level and first_checkpoint(state, level) == path:
            state["replay_done"] = state["replay_done"] or name == "medium"  # medium-replay stops here
            progress.write(f"{name} level ({level:.0f}) reached: average return {avg:.0f} after "
                           f"{state['env_steps']:,} environment steps ({path})")


def first_checkpoint(state, level):
    """The first saved policy whose average return reaches `level`, or None."""
    return next((path for _, _, avg, path in state["history"] if avg >= level), None)


def reached(state, args, settings) -> bool:
    return first_checkpoint(state, settings[f"{args.stop_at}_return"]) is not None


# ------------------------------------------------------------------------------- ARS training
class RunningStats:
    """Observation mean and std over every state the learner has visited (ARS V2)."""

    def __init__(self, dim):
        self.count, self.total, self.total_sq = 0, np.zeros(dim), np.zeros(dim)

    def update(self, observations):
        self.count += len(observations)
        self.total += observations.sum(0)
        self.total_sq += np.square(observations).sum(0)

    @property
    def mean(self):
        return self.total / max(self.count, 1)

    @property
    def std(self):
        var = self.total_sq / max(self.count, 1) - np.square(self.mean)
        return np.sqrt(np.maximum(var, 1e-8)) if self.count > 1 else np.ones_like(self.total)


def train_ars(args, settings, env, work_dir):
    """ARS until the target level; returns the replay episodes and the learner state."""
    state_path = os.path.join(work_dir, "learner_state.pkl")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    state = load_state(state_path, args)
    if state is None:
        state = dict(
            made_by=learner_settings(args), iteration=0, weights=np.zeros((act_dim, obs_dim)),
            stats=RunningStats(obs_dim),
            rng=np.random.default_rng(args.seed), replay=[], replay_done=False, history=[], env_steps=0,
        )
    rng = state["rng"]
    progress = tqdm(total=args.max_iterations, initial=state["iteration"], desc=f"ARS {args.env_id}", unit="it",
                    mininterval=REFRESH)
    while state["iteration"] < args.max_iterations and not reached(state, args, settings):
        policy = LinearPolicy(state["weights"], state["stats"].mean, state["stats"].std, low, high)
        deltas = rng.standard_normal((settings["directions"], act_dim, obs_dim))
        returns = np.zeros((settings["directions"], 2))
        visited = []
        for k, delta in enumerate(deltas):
            for j, sign in enumerate((1.0, -1.0)):
                weights = state["weights"] + sign * settings["exploration_noise"] * delta
                record = not state["replay_done"] and k == 0 and j < args.replay_episodes_per_iteration
                seed = int(rng.integers(2**31))
                perturbed = lambda obs, w=weights: policy(obs, w)
                ret, observations, episode = rollout(env, perturbed, seed=seed, record=record)
                returns[k, j] = ret - settings["reward_shift"] * (len(observations) - 1)
                visited.append(observations[:-1])
                state["env_steps"] += len(observations) - 1
                if episode is not None:
                    state["replay"].append(episode)
        # Step along the best directions, scaled by the spread of their returns (ARS V2-t).
        best = np.argsort(-returns.max(1))[: settings["top_directions"]]
        spread = returns[best].std() + 1e-8
        step = np.tensordot(returns[best, 0] - returns[best, 1], deltas[best], axes=1)
        state["weights"] = state["weights"] + settings["step_size"] / (len(best) * spread) * step
        for observations in visited:
            state["stats"].update(observations)
        state["iteration"] += 1
        progress.update(1)

        if state["iteration"] % args.eval_every == 0:
            policy = LinearPolicy(state["weights"].copy(), state["stats"].mean, state["stats"].std, low, high)
            evaluate_and_checkpoint(args, settings, env, policy, state, work_dir, progress)
            progress.set_postfix(avg_return=f"{state['history'][-1][2]:.0f}",
                                 replay_steps=sum(len(e.rewards) for e in state["replay"]))
            save_state(state_path, state)
    progress.close()
    return state["replay"], state


# ------------------------------------------------------------------------------- SAC training
class SACActor(nn.Module):
    """Tanh-squashed Gaussian policy on raw observations; actions in [-1, 1], rescaled to the env's box."""

    def __init__(self, obs_dim, act_dim, hidden):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def forward(self, obs):
        """A sampled action and its log-density: log N(z; mu, sigma) - sum log(1 - tanh(z)^2), with
        log(1 - tanh(z)^2) = 2 (log 2 - z - softplus(-2z)) written in its numerically stable form."""
        h = self.trunk(obs)
        mean, log_std = self.mean(h), self.log_std(h).clamp(-5.0, 2.0)
        noise = torch.randn_like(mean)
        z = mean + log_std.exp() * noise
        log_prob = (-0.5 * noise.square() - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        log_prob = log_prob - (2 * (np.log(2.0) - z - F.softplus(-2 * z))).sum(-1)
        return torch.tanh(z), log_prob

    def policy(self, low, high) -> TanhGaussianPolicy:
        """The whole stochastic policy, as NumPy arrays."""
        def weights(layer):
            return layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
        return TanhGaussianPolicy([weights(self.trunk[0]), weights(self.trunk[2])], weights(self.mean),
                                  weights(self.log_std), low, high)


class TwinCritic(nn.Module):
    """Two independent Q-networks; forward returns both, stacked: [2, batch]."""

    def __init__(self, obs_dim, act_dim, hidden):
        super().__init__()
        self.q = nn.ModuleList(
            nn.Sequential(nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 1))
            for _ in range(2)
        )

    def forward(self, obs, action):
        x = torch.cat([obs, action], -1)
        return torch.stack([q(x).squeeze(-1) for q in self.q])


def train_sac(args, settings, env, work_dir, gamma=0.99, tau=0.005, lr=3e-4):
    """SAC (one update per environment step, learned temperature towards entropy -|A|) until the target
    level. Evaluates at episode ends, so the saved state never needs the environment's. Returns the
    medium-replay episodes (every transition until the medium checkpoint, like D4RL) and the learner state."""
    torch.set_num_threads(args.threads)
    state_path = os.path.join(work_dir, "sac_state.pkl")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    torch.manual_seed(args.seed)
    actor, critic = SACActor(obs_dim, act_dim, args.sac_hidden), TwinCritic(obs_dim, act_dim, args.sac_hidden)
    critic_target = TwinCritic(obs_dim, act_dim, args.sac_hidden)
    critic_target.load_state_dict(critic.state_dict())
    log_alpha = torch.zeros((), requires_grad=True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=lr, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=lr, fused=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=lr, fused=True)
    modules = dict(actor=actor, critic=critic, critic_target=critic_target, actor_opt=actor_opt, critic_opt=critic_opt,
                   alpha_opt=alpha_opt)

    # Observations and rewards kept exactly as the environment returned them, for medium-replay.
    columns = dict(observations=((obs_dim,), np.float64), next_observations=((obs_dim,), np.float64),
                   actions=((act_dim,), np.float32),
                   rewards=((), np.float64), terminations=((), bool), truncations=((), bool))
    state = load_state(state_path, args)
    if state is None:
        state = dict(made_by=learner_settings(args), iteration=0, env_steps=0, next_eval=args.sac_eval_every,
                     history=[], replay_done=False,
                     episode_starts=[0], episode_seeds=[], rng=np.random.default_rng(args.seed))
    buffer_size = max(args.sac_max_steps, state["env_steps"])
    buffer = {k: np.zeros((buffer_size, *shape), dtype) for k, (shape, dtype) in columns.items()}
    if "modules" in state:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        with torch.no_grad():
            log_alpha.copy_(state["log_alpha"])
        torch.set_rng_state(state["torch_rng"])
        for k, column in state["buffer"].items():
            buffer[k][: len(column)] = column
    rng = state["rng"]
    critic_params, target_params = list(critic.parameters()), list(critic_target.parameters())

    def to_unit(actions):  # env box -> [-1, 1]
        return 2 * (actions - low) / (high - low) - 1

    def update():
        idx = rng.integers(0, state["env_steps"], args.sac_batch_size)
        obs = torch.from_numpy(buffer["observations"][idx].astype(np.float32))
        next_obs = torch.from_numpy(buffer["next_observations"][idx].astype(np.float32))
        action = torch.from_numpy(to_unit(buffer["actions"][idx]).astype(np.float32))
        reward = torch.from_numpy(buffer["rewards"][idx].astype(np.float32))
        not_terminal = torch.from_numpy(~buffer["terminations"][idx]).float()  # truncations still bootstrap
        alpha = log_alpha.detach().exp()
        with torch.no_grad():
            next_action, next_log_prob = actor(next_obs)
            next_value = critic_target(next_obs, next_action).min(0).values - alpha * next_log_prob
            target = reward + gamma * not_terminal * next_value
        critic_loss = (critic(obs, action) - target).square().mean(1).sum()
        critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_opt.step()

        critic.requires_grad_(False)  # the actor's loss needs gradients for the actions only
        new_action, log_prob = actor(obs)
        actor_loss = (alpha * log_prob - critic(obs, new_action).min(0).values).mean()
        actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_opt.step()
        critic.requires_grad_(True)

        alpha_loss = -log_alpha * (log_prob.detach().mean() - act_dim)  # target entropy -|A|
        alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        alpha_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(target_params, critic_params, tau)

    progress = tqdm(total=args.sac_max_steps, initial=state["env_steps"], desc=f"SAC {args.env_id}", unit="step",
                    mininterval=REFRESH)
    seed = int(rng.integers(2**31))
    obs, _ = env.reset(seed=seed)
    while state["env_steps"] < args.sac_max_steps and not reached(state, args, settings):
        t = state["env_steps"]
        if t < args.sac_random_steps:
            action = rng.uniform(low, high).astype(np.float32)
        else:
            with torch.no_grad():
                unit_action, _ = actor(torch.from_numpy(obs.astype(np.float32)))
            action = (low + (unit_action.numpy() + 1) * (high - low) / 2).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for k, value in zip(columns, (obs, next_obs, action, reward, terminated, truncated)):
            buffer[k][t] = value
        state["env_steps"] = t = t + 1
        if t >= args.sac_random_steps:
            update()
        progress.update(1)
        if not (terminated or truncated):
            obs = next_obs
            continue
        state["episode_starts"].append(t)
        state["episode_seeds"].append(seed)
        if t >= state["next_eval"]:
            state["iteration"] += 1
            evaluate_and_checkpoint(args, settings, env, actor.policy(low, high), state, work_dir, progress)
            progress.set_postfix(avg_return=f"{state['history'][-1][2]:.0f}", alpha=f"{log_alpha.exp().item():.3f}")
            state["next_eval"] += args.sac_eval_every
            state.update(modules={name: module.state_dict() for name, module in modules.items()},
                         log_alpha=log_alpha.detach().clone(), torch_rng=torch.get_rng_state(),
                         buffer={k: column[:t] for k, column in buffer.items()})
            save_state(state_path, state)
        seed = int(rng.integers(2**31))
        obs, _ = env.reset(seed=seed)
    progress.close()
    return replay_until(state, buffer, settings["medium_return"]), state


def replay_until(state, buffer, level):
    """SAC's replay buffer, episode by episode, up to the first checkpoint at `level` (saved at an episode end)."""
    medium = next(((steps, path) for _, steps, avg, path in state["history"] if level is not None and avg >= level),
                  None)
    if medium is None:
        return []
    starts, seeds, replay = state["episode_starts"], state["episode_seeds"], []
    for i in range(starts.index(medium[0])):
        begin, end = starts[i], starts[i + 1]
        replay.append(EpisodeBuffer(
            seed=seeds[i],
            observations=np.concatenate([buffer["observations"][begin:end], buffer["next_observations"][end - 1:end]]),
            **{k: buffer[k][begin:end] for k in ("actions", "rewards", "terminations", "truncations")},
        ))
    return replay


def save_state(path, state):
    """Pickle to a temporary file, then rename: an interruption leaves the previous state intact."""
    with open(path + ".tmp", "wb") as f:
        pickle.dump(state, f)
    os.replace(path + ".tmp", path)


def load_state(path, args):
    """The learner state saved in --work-dir, refused if another protocol, seed or version made it."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        state = pickle.load(f)
    # (States saved before settings were recorded, but in this version's format, are taken as they come.)
    made_by = state.get("made_by") or (learner_settings(args) if all(len(h) == 4 for h in state["history"]) else {})
    if made_by != learner_settings(args):
        raise SystemExit(f"error: {path} holds a learner made with other settings "
                         f"({made_by or 'by an earlier version'}, not {learner_settings(args)}); pass another "
                         "--work-dir, or the same settings to resume it.")
    print(f"resuming the behaviour-policy learner after {state['env_steps']:,} environment steps ({path})")
    return state


def learner_settings(args) -> dict:
    """What a saved learner state must have been made with to be resumed."""
    return dict(protocol=args.protocol, seed=args.seed, learner=args.learner, format=2)


# ------------------------------------------------------------------------------- writing datasets
def collect(env, act, num_transitions, seed, desc):
    episodes, steps, rng = [], 0, np.random.default_rng(seed)
    with tqdm(total=num_transitions, desc=desc, unit="transition", mininterval=REFRESH) as progress:
        while steps < num_transitions:
            _, _, episode = rollout(env, act, seed=int(rng.integers(2**31)), record=True)
            episodes.append(episode)
            steps += len(episode.rewards)
            progress.update(len(episode.rewards))
    return episodes


def action_spread(policy, args, observations, seed, states=1000, samples=100):
    """The behaviour policy's action std at a state, averaged over action coordinates and `states` of the
    dataset's states (Monte Carlo, `samples` actions per state)."""
    rng = np.random.default_rng(seed)
    obs = observations[rng.choice(len(observations), min(states, len(observations)), replace=False)]
    act = protocol_actor(policy, args, rng)
    return float(np.std([act(obs) for _ in range(samples)], axis=0).mean())


def stored_episodes(dataset_id):
    """A written dataset's episodes as EpisodeBuffers again (for medium-expert, when medium or expert existed)."""
    dataset = minari.load_dataset(dataset_id)
    seeds = [m.get("seed") for m in dataset.storage.get_episode_metadata(range(dataset.total_episodes))]
    return [EpisodeBuffer(seed=seed, observations=e.observations, actions=e.actions, rewards=e.rewards,
                          terminations=e.terminations, truncations=e.truncations)
            for seed, e in zip(seeds, dataset.iterate_episodes())]


def write_dataset(args, name, episodes, algorithm, description, metadata):
    """Write <namespace>/<env>/<name>-v0 from episodes() (called only if the dataset is to be written); an
    interruption while writing leaves no half-written dataset behind."""
    dataset_id = f"{args.namespace}/{env_short_name(args.env_id)}/{name}-v0"
    local = minari.list_local_datasets()
    if dataset_id in local and "average_episode_return" not in local[dataset_id]:
        print(f"{dataset_id} was left unfinished by an interrupted run; writing it again")
        minari.delete_dataset(dataset_id)
    elif dataset_id in local:
        if not args.overwrite:
            print(f"{dataset_id} exists; skipping (pass --overwrite to rewrite it)")
            return dataset_id
        minari.delete_dataset(dataset_id)
    episodes = [dataclasses.replace(episode, id=i) for i, episode in enumerate(episodes())]
    path = minari.storage.get_dataset_path(dataset_id)
    shutil.rmtree(path, ignore_errors=True)  # what an earlier run left unfinished
    ref_min, ref_max = D4RL_REFERENCE_SCORES.get(env_short_name(args.env_id), (None, None))
    try:
        dataset = minari.create_dataset_from_buffers(
            dataset_id, episodes, env=args.env_id, algorithm_name=algorithm,
            ref_min_score=ref_min, ref_max_score=ref_max, description=description,
            num_episodes_average_score=10,
        )
        returns = [float(np.sum(e.rewards)) for e in episodes]
        dataset.storage.update_metadata({**metadata, "data_protocol": args.protocol,
                                         "generator_args": json.dumps(asdict(args)),
                                         "average_episode_return": float(np.mean(returns))})
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    count = f"{dataset.total_episodes} episode{'s' * (dataset.total_episodes != 1)}"
    print(f"wrote {dataset_id}: {count}, {dataset.total_steps} transitions, average return {np.mean(returns):.1f}")
    return dataset_id


def trained_policies(args, settings, env, work_dir):
    """Train the learner (or resume it) until --stop-at; the medium-replay episodes and {level: policy file}."""
    started = time.time()
    train = train_ars if args.learner == "ars" else train_sac
    replay, state = train(args, settings, env, work_dir)
    print(f"behaviour-policy training: {time.time() - started:.0f} s")
    level = settings[f"{args.stop_at}_return"]
    if not reached(state, args, settings):
        best = max((h[2] for h in state["history"]), default=float("nan"))
        budget = "--max-iterations" if args.learner == "ars" else "--sac-max-steps"
        raise SystemExit(f"error: the learner did not reach the {args.stop_at} level ({level:.0f}) within its "
                         f"budget ({state['env_steps']:,} environment steps; best average return {best:.0f}), so "
                         f"no dataset was written. Re-run with a larger {budget} to continue training from "
                         f"{work_dir}, or lower --{args.stop_at}-return.")
    return replay, {name: first_checkpoint(state, settings[f"{name}_return"]) for name in ("medium", "expert")
                    if settings[f"{name}_return"] is not None and first_checkpoint(state, settings[f"{name}_return"])}


def main(args: Args) -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up as Ctrl-C does
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:  # an id Gymnasium does not know, or an environment it cannot build here
        raise SystemExit(f"error: --env-id {args.env_id}: {e} Pass a Gymnasium id such as Hopper-v5, HalfCheetah-v5 "
                         "or Walker2d-v5.")
    if not isinstance(env.action_space, gym.spaces.Box):
        raise SystemExit(f"error: {args.env_id} has a {type(env.action_space).__name__} action space; "
                         "make_dataset.py needs a continuous (Box) one.")
    if args.learner == "ars" and args.protocol == "sampled":
        raise SystemExit("error: --learner ars learns deterministic linear policies, with no action distribution to "
                         "sample from; add --protocol mean-plus-noise, or use --learner sac.")
    args.namespace = args.namespace or NAMESPACES[args.protocol]
    settings = {**ENV_DEFAULTS.get(env_short_name(args.env_id), FALLBACK_DEFAULTS)}
    settings.update({k: getattr(args, k) for k in settings if getattr(args, k) is not None})
    if settings[f"{args.stop_at}_return"] is None and args.medium_policy is None:
        raise SystemExit(f"error: no default return levels for {args.env_id}; pass --medium-return (and "
                         "--expert-return).")
    work_dir = os.path.join(args.work_dir, env_short_name(args.env_id))
    started = time.time()
    if args.expert_policy is not None and args.medium_policy is None:
        raise SystemExit("error: --expert-policy needs --medium-policy (medium-expert-v0 holds both); pass both, or "
                         "neither to train the policies.")
    if args.medium_policy is not None:
        replay, checkpoints = None, {"medium": args.medium_policy}
        if args.expert_policy is not None:
            checkpoints["expert"] = args.expert_policy
    else:  # only training writes to the work directory
        os.makedirs(work_dir, exist_ok=True)
        replay, checkpoints = trained_policies(args, settings, env, work_dir)
    policies = {name: load_policy(path, env, args) for name, path in checkpoints.items()}

    note = f"A D4RL-style dataset made locally by common/make_dataset.py on {args.env_id} (Gymnasium MuJoCo). "
    if args.random_size > 0:
        def random_episodes():
            env.action_space.seed(args.seed)
            return collect(env, lambda obs: env.action_space.sample(), args.random_size, args.seed + 1, "random")
        write_dataset(args, "random", random_episodes, "uniformly random actions", note + "Uniformly random actions.",
                      {"policy_checkpoint": "none"})
    if replay is not None and "medium" in checkpoints:
        learner = "ARS V2-t" if args.learner == "ars" else "SAC"
        what = "its perturbed policies' rollouts" if args.learner == "ars" else "its whole replay buffer"
        write_dataset(args, "medium-replay", lambda: replay, learner,
                      note + f"The {learner} learner's data until it reached the medium level: {what}.",
                      {"policy_checkpoint": checkpoints["medium"]})
    written = {}
    for name, (policy, saved) in policies.items():
        learner = "ARS V2-t linear" if isinstance(policy, LinearPolicy) else "SAC"
        kind = "SAC policy, sampled actions" if args.protocol == "sampled" else \
            f"{learner} policy + N(0, {args.action_noise}^2) action noise"
        metadata = {"policy_checkpoint": checkpoints[name], "policy_return": saved.get("avg_return", "unknown"),
                    "policy_env_steps": saved.get("env_steps", "unknown")}

        def episodes(name=name, policy=policy, metadata=metadata):
            act = protocol_actor(policy, args, np.random.default_rng(args.seed + 2))
            episodes = collect(env, act, args.medium_size, args.seed + 3, name)
            observations = np.concatenate([e.observations[:-1] for e in episodes])
            metadata["behaviour_action_std"] = action_spread(policy, args, observations, args.seed + 4)
            return episodes
        written[name] = write_dataset(args, name, episodes, kind, note + f"The {name}-level {kind}.", metadata)
    if set(written) == {"medium", "expert"}:
        write_dataset(args, "medium-expert", lambda: stored_episodes(written["medium"]) +
                      stored_episodes(written["expert"]), "medium and expert together",
                      note + "medium-v0 and expert-v0 together.",
                      {"policy_checkpoint": f"{checkpoints['medium']} + {checkpoints['expert']}"})
    print(f"done in {time.time() - started:.0f} s; datasets under {minari.storage.get_dataset_path()}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
