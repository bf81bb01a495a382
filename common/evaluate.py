"""Evaluate (and film) a policy trained by any of the scripts in algos/, from its run directory.

Loads RUN_DIR/model.pt (with torch.load(..., weights_only=True): tensors and plain Python values only),
rebuilds the deterministic actor without importing the training script, runs the dataset's evaluation
environment and prints the mean and spread of the return and of the normalised score. A training run of
--seed K evaluated at step S starts its episodes from seed K * 10**8 + S: pass that as --seed, with the same
--episodes, and the returns are that evaluation's exactly (the final one of a seed-0 run of 100k steps: --seed 100000).

    python common/evaluate.py runs/<run-name>                       # 10 episodes, seed 0
    python common/evaluate.py runs/<run-name> --episodes 50 --seed 1
    MUJOCO_GL=egl python common/evaluate.py runs/<run-name> --capture-video   # MP4s in runs/<run-name>/videos

In your own code:

    from common.evaluate import load_policy
    policy = load_policy("runs/<run-name>")        # numpy observations [B, obs_dim] -> actions [B, act_dim]
    action = policy(obs[None])[0]
"""

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent  # the project: algos/ and common/


@dataclass
class Args:
    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """a run directory written by one of the scripts in algos/ (it holds model.pt)"""
    episodes: int = 10
    """evaluation episodes"""
    seed: int = 0
    """episode i starts from env.reset(seed=seed + i) (a training run's evaluation at step S: seed * 10**8 + S)"""
    capture_video: bool = False
    """write an MP4 of each episode to RUN_DIR/videos (headless machines: MUJOCO_GL=egl; without a GPU it
    renders in software, minutes per 1000-step episode: film one or two --episodes)"""
    device: str = "cpu"
    """torch device for the actor"""
    threads: int = 1
    """torch CPU threads: the actor sees one state per episode at a time, too few to share among cores, and more
    threads would only compete with training runs on the same machine"""


class Policy(nn.Module):
    """The trained actor's deterministic action, max_action * tanh(head(trunk(s))), built from model.pt
    alone: linear layers, each followed by LayerNorm (if the run used it) and ReLU, then the action head
    (TD3+BC's `head`, EDAC's `mean`)."""

    def __init__(self, model: dict, device="cpu"):
        super().__init__()
        weights, args = model["actor"], model["args"]
        head = "mean" if "mean.weight" in weights else "head"
        trunk_ids = sorted({int(k.split(".")[1]) for k in weights if k.startswith("trunk.")})
        self.linears = nn.ModuleList(nn.Linear(*weights[f"trunk.{i}.weight"].T.shape) for i in trunk_ids)
        self.head = nn.Linear(*weights[f"{head}.weight"].T.shape)
        for linear, i in zip(self.linears, trunk_ids):
            linear.load_state_dict({"weight": weights[f"trunk.{i}.weight"], "bias": weights[f"trunk.{i}.bias"]})
        self.head.load_state_dict({"weight": weights[f"{head}.weight"], "bias": weights[f"{head}.bias"]})
        self.layernorm, self.bf16 = args["actor_layernorm"], args.get("precision") == "bf16"
        self.max_action = model["max_action"]
        self.register_buffer("obs_mean", model["obs_mean"].float())
        self.register_buffer("obs_std", model["obs_std"].float())
        self.to(device)

    @torch.no_grad()
    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs - self.obs_mean) / self.obs_std
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            for linear in self.linears:  # the same operations, in the same order, as the training script's
                x = linear(x)
                x = F.relu(F.layer_norm(x, x.shape[-1:]) if self.layernorm else x)
        return self.max_action * torch.tanh(self.head(x.float()))

    def __call__(self, obs):
        """numpy observations [B, obs_dim] -> numpy actions [B, act_dim] (tensors in, tensors out)."""
        if isinstance(obs, torch.Tensor):
            return super().__call__(obs)
        device = self.obs_mean.device
        return super().__call__(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()


def load_model(run_dir: str) -> dict:
    path = Path(run_dir) / "model.pt" if Path(run_dir).is_dir() else Path(run_dir)
    if not Path(run_dir).exists():
        raise SystemExit(f"error: there is no '{run_dir}': pass the directory of a finished run (runs/<run-name>).")
    if not path.exists():
        raise SystemExit(f"error: no model.pt in '{run_dir}': pass the directory of a finished run (runs/<run-name>)"
                         f".{unfinished_run(Path(run_dir))}")
    try:
        model = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut short, or not a file the scripts wrote
        raise SystemExit(f"error: could not read {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "it is not a model.pt as the scripts in algos/ write it, or it was cut short.")
    if not isinstance(model, dict) or "max_action" not in model:
        raise SystemExit(f"error: {path} was written by an older version of the scripts; retrain, or load it with "
                         "the training script's own Actor class.")
    return model


def unfinished_run(run_dir: Path) -> str:
    """' This run stopped at step N: ...' when run_dir holds a checkpoint but no model.pt, else ''."""
    try:  # the run's own file, which resuming it loads the same way
        checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        step, name = checkpoint["step"], f"{checkpoint['script']}.py"
    except Exception:  # no checkpoint, or not one the scripts wrote
        return ""
    # the script in this project's algos/, or (evaluate.py copied beside a copy of it) the one beside this file
    script = next((p for p in (ROOT / "algos" / name, Path(__file__).with_name(name)) if p.exists()), Path(name))
    return (f" This run stopped at step {step}, before writing model.pt: finish it with the {name} that made it, "
            f"`python {os.path.relpath(script)} --resume {run_dir}`; its evaluations so far are in its tensorboard "
            f"log (tensorboard --logdir {run_dir}).")


def load_policy(run_dir: str, device="cpu") -> Policy:
    """The deterministic policy of a trained run: a callable from observations to actions."""
    return Policy(load_model(run_dir), device)


def evaluate(policy, envs, seed, ignore_terminated_until=0, progress=None):
    """One episode in each env at once, one batched policy call per step; undiscounted returns. `progress`, a
    tqdm bar over the episodes, hears of every step and every finished episode."""
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns, done, steps = np.zeros(len(envs)), np.zeros(len(envs), dtype=bool), 0
    while not done.all():
        steps += 1
        actions = policy(obs)
        for i in np.flatnonzero(~done):
            obs[i], reward, terminated, truncated, _ = envs[i].step(actions[i])
            returns[i] += reward
            done[i] = truncated or (terminated and steps >= ignore_terminated_until)
        if progress is not None:
            progress.set_postfix_str(f"step {steps}", refresh=False)
            progress.update(int(done.sum()) - progress.n)
    return returns


def main(args: Args) -> None:
    import gymnasium as gym
    import minari

    for name in ("episodes", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1, got {getattr(args, name)}.")
    torch.set_num_threads(args.threads)
    if args.capture_video and sys.platform.startswith("linux") and not any(
            os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "MUJOCO_GL")):
        raise SystemExit("error: --capture-video renders with OpenGL, and this machine has no display: set "
                         "MUJOCO_GL=egl (or osmesa), e.g. MUJOCO_GL=egl python common/evaluate.py ... --capture-video.")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}, but this torch sees no CUDA GPU here; use --device cpu.")
    model = load_model(args.run_dir)
    policy = Policy(model, device)
    try:  # the evaluation environment and its settings are the dataset's
        dataset = minari.load_dataset(model["dataset_ids"][0])
    except FileNotFoundError:
        raise SystemExit(f"error: evaluating needs the run's dataset {model['dataset_ids'][0]}, for its environment, "
                         "and it is not on this machine (MINARI_DATASETS_PATH="
                         f"{os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}): copy it there from the "
                         "machine that trained the run, or set MINARI_DATASETS_PATH to where it is.")
    render = {"render_mode": "rgb_array"} if args.capture_video else {}
    envs = [dataset.recover_environment(eval_env=True, **render) for _ in range(args.episodes)]
    if args.capture_video:
        video_dir = os.path.join(args.run_dir, "videos")
        # Every recorder writes to the one folder; all but the first would warn that it exists.
        warnings.filterwarnings("ignore", message=".*Overwriting existing videos.*")
        envs = [gym.wrappers.RecordVideo(env, video_dir, name_prefix=f"seed{args.seed + i}",
                                         episode_trigger=lambda _: True, disable_logger=True)
                for i, env in enumerate(envs)]
    what = "episodes, filmed" if args.capture_video else "episodes"
    with tqdm(total=args.episodes, desc=what, unit="episode", mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        returns = evaluate(policy, envs, args.seed, model["ignore_terminated_until"], bar)
    for env in envs:
        env.close()
    print(f"{model['script']} on {model['dataset_ids'][0]}, {args.episodes} episode{'s' * (args.episodes > 1)} from "
          f"seed {args.seed}: return {returns.mean():.1f} ± {returns.std():.1f} (min {returns.min():.1f}, "
          f"max {returns.max():.1f})")
    if model["reference"] is not None:
        low, high = model["reference"][:2]
        scores = 100 * (returns - low) / (high - low)
        print(f"normalised score {scores.mean():.1f} ± {scores.std():.1f} ({model['reference'][2]})")
    if args.capture_video:
        print(f"videos in {os.path.join(args.run_dir, 'videos')}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
