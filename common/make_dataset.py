"""Make D4RL-style offline datasets locally, in Minari format, for any continuous-control Gymnasium env.

For users without internet access to Minari's servers, or with an environment of their own. It
  1. trains a behaviour policy online with Augmented Random Search (ARS V2-t, Mania et al., 2018:
     linear policies on normalised observations, needing only environment rollouts, fast on a CPU),
     checkpointing the policy every time its return climbs another `--level-every`;
  2. writes Minari datasets under `<namespace>/<env>/`:
       random-v0         uniformly random actions,
       medium-replay-v0  rollouts the learner collected until it reached the medium level,
       medium-v0         the medium-level policy with Gaussian action noise (stochastic, like D4RL),
       expert-v0         the same for the expert level, when `--stop-at expert` and the learner gets there;
  3. stores in each its D4RL reference scores, the checkpoint it came from, these arguments and a
     description, through Minari's own `create_dataset_from_buffers`;
  4. resumes from its checkpoints when re-run with the same `--work-dir` after an interruption.

How these differ from D4RL: Gymnasium MuJoCo v5 rather than mujoco-py v2/v3 environments; a linear
ARS policy with Gaussian action noise rather than a SAC policy's own stochasticity; medium-replay
holds the learner's perturbed-policy rollouts rather than a SAC replay buffer.

Usage:
    python common/make_dataset.py --env-id Hopper-v5
    MINARI_DATASETS_PATH=~/my_datasets python common/make_dataset.py --env-id Walker2d-v5 --medium-return 3000
"""

import dataclasses
import json
import os
import pickle
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import gymnasium as gym
import minari
import numpy as np
import tyro
from minari.data_collector import EpisodeBuffer
from tqdm import tqdm

# D4RL's reference returns (random policy / expert policy) for normalised scores.
D4RL_REFERENCE_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
# Per environment: medium and expert return levels (about a third of, and near, D4RL's expert level),
# ARS settings from Mania et al. (2018, V2-t) and the survival bonus ARS subtracts while training.
ENV_DEFAULTS = {
    "hopper": dict(medium_return=1600.0, expert_return=3000.0, directions=8, top_directions=4, step_size=0.01, exploration_noise=0.025, reward_shift=1.0),
    "halfcheetah": dict(medium_return=4700.0, expert_return=6000.0, directions=32, top_directions=4, step_size=0.02, exploration_noise=0.03, reward_shift=0.0),
    "walker2d": dict(medium_return=3000.0, expert_return=4300.0, directions=40, top_directions=30, step_size=0.025, exploration_noise=0.01, reward_shift=1.0),
}
FALLBACK_DEFAULTS = dict(medium_return=None, expert_return=None, directions=16, top_directions=8, step_size=0.02, exploration_noise=0.03, reward_shift=0.0)


@dataclass
class Args:
    env_id: str = "Hopper-v5"
    """Gymnasium environment id with a continuous (Box) action space"""
    namespace: str = "local"
    """Minari namespace: datasets are written as <namespace>/<env>/<kind>-v0"""
    seed: int = 0
    """seed for ARS, environment resets and action noise"""
    stop_at: Literal["medium", "expert"] = "medium"
    """train until the medium level only, or go on to the expert level"""
    medium_return: Optional[float] = None
    """average return (with action noise) that counts as medium; default per env (hopper 1600, halfcheetah 4700, walker2d 3000)"""
    expert_return: Optional[float] = None
    """average return that counts as expert; default per env"""
    medium_size: int = 1_000_000
    """transitions in medium-v0 (and expert-v0)"""
    random_size: int = 100_000
    """transitions in random-v0 (0 skips it)"""
    action_noise: float = 0.1
    """std of the Gaussian noise added to the policy's actions in medium-v0 and expert-v0"""
    replay_episodes_per_iteration: int = 2
    """learner rollouts kept per ARS iteration for medium-replay-v0 (the first +/- direction pair)"""
    max_iterations: int = 2000
    """give up training after this many ARS iterations"""
    eval_every: int = 5
    """evaluate the (noisy) central policy every this many iterations"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    level_every: float = 250.0
    """save a policy checkpoint each time the evaluated return passes another multiple of this"""
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
    medium_policy: Optional[str] = None
    """write medium-v0 from this saved policy (.npz, e.g. benchmark_results/behaviour_policies/hopper_medium.npz) instead of training; skips medium-replay-v0"""
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
        np.savez(path, weights=self.weights, obs_mean=self.obs_mean, obs_std=self.obs_std, low=self.low, high=self.high, **extra)

    @classmethod
    def load(cls, path):
        f = np.load(path)
        return cls(f["weights"], f["obs_mean"], f["obs_std"], f["low"], f["high"])


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


def train_behaviour_policy(args, settings, env, work_dir):
    """ARS until the target level; returns the replay episodes and {level name: checkpoint path}."""
    state_path = os.path.join(work_dir, "learner_state.pkl")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    if os.path.exists(state_path):
        with open(state_path, "rb") as f:
            state = pickle.load(f)
        print(f"resuming the behaviour-policy learner from iteration {state['iteration']} ({state_path})")
    else:
        state = dict(
            iteration=0, weights=np.zeros((act_dim, obs_dim)), stats=RunningStats(obs_dim),
            rng=np.random.default_rng(args.seed), replay=[], replay_done=False, best_level=-np.inf,
            checkpoints={}, history=[], env_steps=0,
        )
    rng = state["rng"]
    target_name = args.stop_at
    target = settings[f"{target_name}_return"]
    progress = tqdm(total=args.max_iterations, initial=state["iteration"], desc=f"ARS {args.env_id}", unit="it")
    while state["iteration"] < args.max_iterations and target_name not in state["checkpoints"]:
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
            eval_rng = np.random.default_rng([args.seed, state["iteration"]])
            avg = np.mean([rollout(env, noisy(policy, eval_rng, args.action_noise), seed=int(eval_rng.integers(2**31)))[0] for _ in range(args.eval_episodes)])
            state["history"].append((state["iteration"], state["env_steps"], float(avg)))
            progress.set_postfix(avg_return=f"{avg:.0f}", replay_steps=sum(len(e.rewards) for e in state["replay"]))
            level = np.floor(avg / args.level_every) * args.level_every
            if level > state["best_level"]:
                state["best_level"] = level
                path = os.path.join(work_dir, f"policy_return{int(level)}.npz")
                policy.save(path, avg_return=avg, iteration=state["iteration"], env_steps=state["env_steps"])
            for name in ("medium", "expert"):
                if settings[f"{name}_return"] is not None and avg >= settings[f"{name}_return"] and name not in state["checkpoints"]:
                    path = os.path.join(work_dir, f"policy_{name}.npz")
                    policy.save(path, avg_return=avg, iteration=state["iteration"], env_steps=state["env_steps"])
                    state["checkpoints"][name] = path
                    state["replay_done"] = True  # medium-replay stops at the medium level
                    progress.write(f"{name} level reached: average return {avg:.0f} at iteration {state['iteration']}")
            # Atomic write: an interruption leaves the previous state intact.
            with open(state_path + ".tmp", "wb") as f:
                pickle.dump(state, f)
            os.replace(state_path + ".tmp", state_path)
    progress.close()
    if target_name not in state["checkpoints"]:
        best = max((h[2] for h in state["history"]), default=float("nan"))
        print(f"warning: the learner did not reach the {target_name} level ({target:.0f}) in {args.max_iterations} "
              f"iterations (best average return {best:.0f}); raise --max-iterations or lower --{target_name}-return.")
    return state["replay"], state["checkpoints"]


# ------------------------------------------------------------------------------- writing datasets
def collect(env, act, num_transitions, seed, desc):
    episodes, steps, rng = [], 0, np.random.default_rng(seed)
    with tqdm(total=num_transitions, desc=desc, unit="transition") as progress:
        while steps < num_transitions:
            _, _, episode = rollout(env, act, seed=int(rng.integers(2**31)), record=True)
            episodes.append(episode)
            steps += len(episode.rewards)
            progress.update(len(episode.rewards))
    return episodes


def write_dataset(args, name, episodes, description, checkpoint=None):
    dataset_id = f"{args.namespace}/{env_short_name(args.env_id)}/{name}-v0"
    if dataset_id in minari.list_local_datasets():
        if not args.overwrite:
            print(f"{dataset_id} exists; skipping (pass --overwrite to rewrite it)")
            return
        minari.delete_dataset(dataset_id)
    episodes = [dataclasses.replace(episode, id=i) for i, episode in enumerate(episodes)]
    ref_min, ref_max = D4RL_REFERENCE_SCORES.get(env_short_name(args.env_id), (None, None))
    dataset = minari.create_dataset_from_buffers(
        dataset_id, episodes, env=args.env_id, algorithm_name="ARS V2-t (linear policy) + Gaussian action noise",
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
        raise SystemExit(f"error: no default return levels for {args.env_id}; pass --medium-return (and --expert-return).")
    work_dir = os.path.join(args.work_dir, env_short_name(args.env_id))
    os.makedirs(work_dir, exist_ok=True)
    started = time.time()

    if args.medium_policy is not None:
        if not os.path.exists(args.medium_policy):
            raise SystemExit(f"error: no policy file '{args.medium_policy}'; pass a .npz saved by this script.")
        replay, checkpoints = None, {"medium": args.medium_policy}
    else:
        replay, checkpoints = train_behaviour_policy(args, settings, env, work_dir)
        print(f"behaviour-policy training: {time.time() - started:.0f} s")

    d4rl_note = "A D4RL-style dataset made locally by common/make_dataset.py on Gymnasium MuJoCo v5. "
    if args.random_size > 0:
        random_act = lambda obs: env.action_space.sample()
        env.action_space.seed(args.seed)
        write_dataset(args, "random", collect(env, random_act, args.random_size, args.seed + 1, "random"),
                      d4rl_note + "Uniformly random actions.")
    if "medium" in checkpoints and replay is not None:
        write_dataset(args, "medium-replay", replay,
                      d4rl_note + "Rollouts of the ARS learner's perturbed policies until it reached the medium level.",
                      checkpoints["medium"])
    for name in ("medium", "expert"):
        if name in checkpoints:
            policy = LinearPolicy.load(checkpoints[name])
            act = noisy(policy, np.random.default_rng(args.seed + 2), args.action_noise)
            episodes = collect(env, act, args.medium_size, args.seed + 3, name)
            write_dataset(args, name, episodes,
                          d4rl_note + f"The {name}-level ARS policy with N(0, {args.action_noise}^2) action noise.",
                          checkpoints[name])
    print(f"done in {time.time() - started:.0f} s; datasets under {minari.storage.get_dataset_path()}")


if __name__ == "__main__":
    main(tyro.cli(Args))
