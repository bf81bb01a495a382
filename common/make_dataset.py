"""Make D4RL-style offline datasets locally, in Minari format, for any continuous-control Gymnasium env.

For users without internet access to Minari's servers, or with an environment of their own. It
  1. trains a behaviour policy online, checkpointing it every time its return climbs another
     `--level-every`, with one of two learners (`--learner`, default per environment):
       ars  Augmented Random Search (ARS V2-t, Mania et al., 2018): linear policies on normalised
            observations, only environment rollouts, minutes on a CPU for Hopper;
       sac  Soft Actor-Critic (Haarnoja et al., 2018), as D4RL used: needed where ARS is slow or
            unstable (HalfCheetah, Walker2d), about half an hour on one CPU core;
  2. writes Minari datasets under `<namespace>/<env>/`:
       random-v0         uniformly random actions,
       medium-replay-v0  everything the learner collected until it reached the medium level,
       medium-v0         the medium-level policy with Gaussian action noise (stochastic, like D4RL),
       expert-v0         the same for the expert level, when `--stop-at expert` and the learner gets there;
  3. stores in each its D4RL reference scores, the checkpoint it came from, these arguments and a
     description, through Minari's own `create_dataset_from_buffers`;
  4. resumes from its checkpoints when re-run with the same `--work-dir` after an interruption.

How these differ from D4RL: Gymnasium MuJoCo v5 rather than mujoco-py v2/v3 environments; the
policy's deterministic action plus Gaussian noise rather than a SAC policy's own stochasticity; with
ARS, medium-replay holds the learner's perturbed-policy rollouts rather than a SAC replay buffer.

Usage:
    python common/make_dataset.py --env-id Hopper-v5
    python common/make_dataset.py --env-id HalfCheetah-v5 --learner sac
    MINARI_DATASETS_PATH=~/my_datasets python common/make_dataset.py --env-id Walker2d-v5 --medium-return 3000
"""

import dataclasses
import json
import os
import pickle
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
# Per environment: medium and expert return levels (about a third of, and near, D4RL's expert level),
# the learner, and ARS settings from Mania et al. (2018, V2-t) with the survival bonus ARS subtracts
# while training. ARS with the paper's settings peaked at 2,652 on HalfCheetah and then fell back, and
# needed millions of steps on Walker2d, hence SAC for those two.
ENV_DEFAULTS = {
    "hopper": dict(medium_return=1600.0, expert_return=3000.0, learner="ars", directions=8, top_directions=4,
                   step_size=0.01, exploration_noise=0.025, reward_shift=1.0),
    "halfcheetah": dict(medium_return=4700.0, expert_return=6000.0, learner="sac", directions=32, top_directions=4,
                        step_size=0.02, exploration_noise=0.03, reward_shift=0.0),
    "walker2d": dict(medium_return=3000.0, expert_return=4300.0, learner="sac", directions=40, top_directions=30,
                     step_size=0.025, exploration_noise=0.01, reward_shift=1.0),
}
FALLBACK_DEFAULTS = dict(medium_return=None, expert_return=None, learner="sac", directions=16, top_directions=8,
                         step_size=0.02, exploration_noise=0.03, reward_shift=0.0)


@dataclass
class Args:
    env_id: str = "Hopper-v5"
    """Gymnasium environment id with a continuous (Box) action space"""
    namespace: str = "local"
    """Minari namespace: datasets are written as <namespace>/<env>/<kind>-v0"""
    seed: int = 0
    """seed for the learner, environment resets and action noise"""
    learner: Optional[Literal["ars", "sac"]] = None
    """behaviour-policy learner (default per env: ars for hopper, sac for halfcheetah, walker2d and others)"""
    stop_at: Literal["medium", "expert"] = "medium"
    """train until the medium level only, or go on to the expert level"""
    medium_return: Optional[float] = None
    """average return (with action noise) that counts as medium; default per env (hopper 1600, halfcheetah 4700,
    walker2d 3000)"""
    expert_return: Optional[float] = None
    """average return that counts as expert; default per env"""
    medium_size: int = 1_000_000
    """transitions in medium-v0 (and expert-v0)"""
    random_size: int = 100_000
    """transitions in random-v0 (0 skips it)"""
    action_noise: float = 0.1
    """std of the Gaussian noise added to the policy's actions in medium-v0 and expert-v0"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    level_every: float = 250.0
    """save a policy checkpoint each time the evaluated return passes another multiple of this"""
    max_iterations: int = 2000
    """ARS: give up training after this many iterations"""
    eval_every: int = 5
    """ARS: evaluate the (noisy) central policy every this many iterations"""
    replay_episodes_per_iteration: int = 2
    """ARS: learner rollouts kept per iteration for medium-replay-v0 (the first +/- direction pair)"""
    directions: Optional[int] = None
    """ARS: random directions per iteration (default per env)"""
    top_directions: Optional[int] = None
    """ARS: best directions used in the update (default per env)"""
    step_size: Optional[float] = None
    """ARS: step size (default per env)"""
    exploration_noise: Optional[float] = None
    """ARS: std of the parameter perturbations (default per env)"""
    reward_shift: Optional[float] = None
    """ARS: subtracted from every training reward to remove a survival bonus (default per env)"""
    sac_max_steps: int = 1_000_000
    """SAC: give up training after this many environment steps"""
    sac_eval_every: int = 10_000
    """SAC: evaluate the (noisy) policy at the first episode end after every this many environment steps"""
    sac_random_steps: int = 5_000
    """SAC: uniformly random actions for this many first steps, before any update"""
    sac_hidden: int = 128
    """SAC: width of the two hidden layers of actor and critics (128, not the usual 256: 2x faster on a CPU)"""
    sac_batch_size: int = 128
    """SAC: minibatch size (one update per environment step)"""
    medium_policy: Optional[str] = None
    """write medium-v0 from this saved policy (.npz, e.g. benchmark_results/behaviour_policies/hopper_medium.npz)
    instead of training; skips medium-replay-v0"""
    threads: int = 1
    """torch CPU threads for SAC (one update is too small to gain from more)"""
    work_dir: str = "runs/make_dataset"
    """checkpoints and resumable learner state go to <work_dir>/<env>/"""
    overwrite: bool = False
    """rewrite datasets that already exist instead of skipping them"""


def env_short_name(env_id: str) -> str:
    """'HalfCheetah-v5' -> 'halfcheetah'."""
    return env_id.split("/")[-1].split("-v")[0].lower()


# ------------------------------------------------------------------------------- policy and rollouts
class LinearPolicy:
    """a = clip(W (s - mean) / std): ARS's linear policy on running-normalised observations."""

    def __init__(self, weights, obs_mean, obs_std, low, high):
        self.weights, self.obs_mean, self.obs_std, self.low, self.high = weights, obs_mean, obs_std, low, high

    def __call__(self, obs, weights=None):
        w = self.weights if weights is None else weights
        return np.clip(w @ ((obs - self.obs_mean) / self.obs_std), self.low, self.high)

    def save(self, path, **extra):
        np.savez(path, kind="linear", weights=self.weights, obs_mean=self.obs_mean, obs_std=self.obs_std, low=self.low,
                 high=self.high, **extra)


class MLPPolicy:
    """a = low + (tanh(mu(s)) + 1) (high - low) / 2: the mean action of a SAC actor, in NumPy, so that
    collecting data needs no torch."""

    def __init__(self, layers, low, high):
        self.layers, self.low, self.high = layers, low, high  # [(W, b), ...], ReLU between them

    def __call__(self, obs):
        h = obs
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return self.low + (np.tanh(h) + 1.0) * (self.high - self.low) / 2

    def save(self, path, **extra):
        weights = {f"w{i}": w for i, (w, _) in enumerate(self.layers)}
        weights |= {f"b{i}": b for i, (_, b) in enumerate(self.layers)}
        np.savez(path, kind="mlp", low=self.low, high=self.high, **weights, **extra)


def load_policy(path):
    """A policy saved by LinearPolicy.save or MLPPolicy.save (files without `kind` are linear)."""
    f = np.load(path)
    if "kind" in f and str(f["kind"]) == "mlp":
        layers = [(f[f"w{i}"], f[f"b{i}"]) for i in range(sum(k.startswith("w") for k in f.files))]
        return MLPPolicy(layers, f["low"], f["high"])
    return LinearPolicy(f["weights"], f["obs_mean"], f["obs_std"], f["low"], f["high"])


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


def noisy(policy, rng, noise_std):
    low, high = policy.low, policy.high
    return lambda obs: np.clip(policy(obs) + noise_std * rng.standard_normal(low.shape), low, high).astype(np.float32)


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
    """ARS until the target level; returns the replay episodes and {level name: checkpoint path}."""
    state_path = os.path.join(work_dir, "learner_state.pkl")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    state = load_state(state_path)
    if state is None:
        state = dict(
            iteration=0, weights=np.zeros((act_dim, obs_dim)), stats=RunningStats(obs_dim),
            rng=np.random.default_rng(args.seed), replay=[], replay_done=False, best_level=-np.inf,
            checkpoints={}, history=[], env_steps=0,
        )
    rng = state["rng"]
    progress = tqdm(total=args.max_iterations, initial=state["iteration"], desc=f"ARS {args.env_id}", unit="it",
                    mininterval=REFRESH)
    while state["iteration"] < args.max_iterations and args.stop_at not in state["checkpoints"]:
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
    warn_if_unreached(args, settings, state, "--max-iterations")
    return state["replay"], state["checkpoints"]


def evaluate_and_checkpoint(args, settings, env, policy, state, work_dir, progress):
    """Average return of the noisy policy (the one the datasets use); save it at every new multiple of
    --level-every and when it first reaches the medium and expert levels."""
    eval_rng = np.random.default_rng([args.seed, state["iteration"]])
    avg = float(np.mean([rollout(env, noisy(policy, eval_rng, args.action_noise), seed=int(eval_rng.integers(2**31)))[0]
                         for _ in range(args.eval_episodes)]))
    state["history"].append((state["iteration"], state["env_steps"], avg))
    provenance = dict(avg_return=avg, iteration=state["iteration"], env_steps=state["env_steps"])
    level = np.floor(avg / args.level_every) * args.level_every
    if level > state["best_level"]:
        state["best_level"] = level
        policy.save(os.path.join(work_dir, f"policy_return{int(level)}.npz"), **provenance)
    for name in ("medium", "expert"):
        level = settings[f"{name}_return"]
        if level is not None and avg >= level and name not in state["checkpoints"]:
            state["checkpoints"][name] = os.path.join(work_dir, f"policy_{name}.npz")
            policy.save(state["checkpoints"][name], **provenance)
            state["replay_done"] = True  # medium-replay stops at the medium level
            progress.write(f"{name} level reached: average return {avg:.0f} after {state['env_steps']:,} "
                           "environment steps")


def save_state(path, state):
    """Pickle to a temporary file, then rename: an interruption leaves the previous state intact."""
    with open(path + ".tmp", "wb") as f:
        pickle.dump(state, f)
    os.replace(path + ".tmp", path)


def load_state(path):
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        state = pickle.load(f)
    print(f"resuming the behaviour-policy learner after {state['env_steps']:,} environment steps ({path})")
    return state


def warn_if_unreached(args, settings, state, budget_flag):
    target_name = args.stop_at
    if target_name not in state["checkpoints"]:
        best = max((h[2] for h in state["history"]), default=float("nan"))
        print(f"warning: the learner did not reach the {target_name} level ({settings[f'{target_name}_return']:.0f}) "
              f"within its budget (best average return {best:.0f}); raise {budget_flag} or lower "
              f"--{target_name}-return.")


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

    def mean_policy(self, low, high):
        layers = [self.trunk[0], self.trunk[2], self.mean]
        weights = [(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()) for layer in layers]
        return MLPPolicy(weights, low, high)


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
    medium-replay episodes (every transition until the medium level, like D4RL) and the checkpoints."""
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
    buffer = {k: np.zeros((args.sac_max_steps, *shape), dtype) for k, (shape, dtype) in columns.items()}
    state = load_state(state_path)
    if state is None:
        state = dict(iteration=0, env_steps=0, next_eval=args.sac_eval_every, history=[], checkpoints={},
                     best_level=-np.inf, replay_done=False, replay_end=None, episode_starts=[0], episode_seeds=[],
                     rng=np.random.default_rng(args.seed))
    else:
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
    while state["env_steps"] < args.sac_max_steps and args.stop_at not in state["checkpoints"]:
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
            evaluate_and_checkpoint(args, settings, env, actor.mean_policy(low, high), state, work_dir, progress)
            progress.set_postfix(avg_return=f"{state['history'][-1][2]:.0f}", alpha=f"{log_alpha.exp().item():.3f}")
            if state["replay_done"] and state["replay_end"] is None:
                state["replay_end"] = len(state["episode_seeds"])
            state["next_eval"] += args.sac_eval_every
            state.update(modules={name: module.state_dict() for name, module in modules.items()},
                         log_alpha=log_alpha.detach().clone(), torch_rng=torch.get_rng_state(),
                         buffer={k: column[:t] for k, column in buffer.items()})
            save_state(state_path, state)
        seed = int(rng.integers(2**31))
        obs, _ = env.reset(seed=seed)
    progress.close()
    warn_if_unreached(args, settings, state, "--sac-max-steps")

    replay = []
    starts, seeds = state["episode_starts"], state["episode_seeds"]
    for i in range(state["replay_end"] or 0):
        begin, end = starts[i], starts[i + 1]
        replay.append(EpisodeBuffer(
            seed=seeds[i],
            observations=np.concatenate([buffer["observations"][begin:end], buffer["next_observations"][end - 1:end]]),
            **{k: buffer[k][begin:end] for k in ("actions", "rewards", "terminations", "truncations")},
        ))
    return replay, state["checkpoints"]


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


def write_dataset(args, name, make_episodes, algorithm, description, checkpoint=None):
    """Write <namespace>/<env>/<name>-v0 from make_episodes(), which is called only if it is needed."""
    dataset_id = f"{args.namespace}/{env_short_name(args.env_id)}/{name}-v0"
    if dataset_id in minari.list_local_datasets():
        if not args.overwrite:
            print(f"{dataset_id} exists; skipping (pass --overwrite to rewrite it)")
            return
        minari.delete_dataset(dataset_id)
    episodes = [dataclasses.replace(episode, id=i) for i, episode in enumerate(make_episodes())]
    ref_min, ref_max = D4RL_REFERENCE_SCORES.get(env_short_name(args.env_id), (None, None))
    dataset = minari.create_dataset_from_buffers(
        dataset_id, episodes, env=args.env_id, algorithm_name=algorithm,
        ref_min_score=ref_min, ref_max_score=ref_max, description=description,
        num_episodes_average_score=10,
    )
    returns = [float(np.sum(e.rewards)) for e in episodes]
    dataset.storage.update_metadata({
        "policy_checkpoint": checkpoint or "none",
        "generator_args": json.dumps(asdict(args)),
        "average_episode_return": float(np.mean(returns)),
    })
    print(f"wrote {dataset_id}: {dataset.total_episodes} episodes, {dataset.total_steps} transitions, "
          f"average return {np.mean(returns):.1f}")


def main(args: Args) -> None:
    env = gym.make(args.env_id)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise SystemExit(f"error: {args.env_id} has a {type(env.action_space).__name__} action space; "
                         "make_dataset.py needs a continuous (Box) one.")
    settings = {**ENV_DEFAULTS.get(env_short_name(args.env_id), FALLBACK_DEFAULTS)}
    settings.update({k: getattr(args, k) for k in settings if getattr(args, k) is not None})
    if settings[f"{args.stop_at}_return"] is None:
        raise SystemExit(f"error: no default return levels for {args.env_id}; pass --medium-return (and "
                         "--expert-return).")
    work_dir = os.path.join(args.work_dir, env_short_name(args.env_id))
    os.makedirs(work_dir, exist_ok=True)
    started = time.time()

    if args.medium_policy is not None:
        if not os.path.exists(args.medium_policy):
            raise SystemExit(f"error: no policy file '{args.medium_policy}'; pass a .npz saved by this script.")
        replay, checkpoints = None, {"medium": args.medium_policy}
    else:
        train = train_ars if settings["learner"] == "ars" else train_sac
        replay, checkpoints = train(args, settings, env, work_dir)
        print(f"behaviour-policy training: {time.time() - started:.0f} s")

    d4rl_note = "A D4RL-style dataset made locally by common/make_dataset.py on Gymnasium MuJoCo v5. "
    if args.random_size > 0:
        def random_episodes():
            env.action_space.seed(args.seed)
            return collect(env, lambda obs: env.action_space.sample(), args.random_size, args.seed + 1, "random")
        write_dataset(args, "random", random_episodes, "uniformly random actions",
                      d4rl_note + "Uniformly random actions.")
    if "medium" in checkpoints and replay is not None:
        learner = "ARS V2-t" if settings["learner"] == "ars" else "SAC"
        what = "its perturbed policies' rollouts" if settings["learner"] == "ars" else "its whole replay buffer"
        write_dataset(args, "medium-replay", lambda: replay, learner,
                      d4rl_note + f"The {learner} learner's data until it reached the medium level: {what}.",
                      checkpoints["medium"])
    for name in ("medium", "expert"):
        if name in checkpoints:
            policy = load_policy(checkpoints[name])
            kind = "ARS V2-t linear policy" if isinstance(policy, LinearPolicy) else "SAC policy (mean action)"
            act = noisy(policy, np.random.default_rng(args.seed + 2), args.action_noise)
            write_dataset(args, name, lambda: collect(env, act, args.medium_size, args.seed + 3, name),
                          f"{kind} + N(0, {args.action_noise}^2) action noise",
                          d4rl_note + f"The {name}-level {kind} with N(0, {args.action_noise}^2) action noise.",
                          checkpoints[name])
    print(f"done in {time.time() - started:.0f} s; datasets under {minari.storage.get_dataset_path()}")


if __name__ == "__main__":
    main(tyro.cli(Args))
