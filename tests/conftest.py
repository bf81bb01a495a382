"""Tiny Minari datasets made in the test session from a real Gymnasium MuJoCo environment, written with
Minari's own create_dataset_from_buffers into a temporary MINARI_DATASETS_PATH, so that the scripts'
real loading code runs."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest

from common.make_dataset import rollout

REPO = Path(__file__).resolve().parent.parent
TIME_LIMIT = 60  # short episodes: some end by falling (terminated), the rest by the time limit (truncated)


def make_tiny_dataset(dataset_id, num_episodes=40, seed=0, env_id="Hopper-v5"):
    """A fixed, noisy linear policy on Hopper: structured enough for behaviour cloning to learn."""
    env = gym.make(env_id, max_episode_steps=TIME_LIMIT)
    rng = np.random.default_rng(seed)
    weights = rng.normal(scale=0.3, size=(env.action_space.shape[0], env.observation_space.shape[0]))
    noise = lambda: 0.1 * rng.standard_normal(weights.shape[0])
    act = lambda obs: np.clip(np.tanh(weights @ obs) + noise(), -1, 1).astype(np.float32)
    episodes = [dataclasses.replace(rollout(env, act, seed=seed * 1000 + i, record=True)[2], id=i)
                for i in range(num_episodes)]
    return minari.create_dataset_from_buffers(
        dataset_id, episodes, env=env, ref_min_score=-20.27, ref_max_score=3234.3,
        algorithm_name="noisy linear policy", description="tiny test dataset",
    )


@pytest.fixture(scope="session")
def minari_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("minari")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dataset(minari_path):
    make_tiny_dataset("test/hopper/medium-v0")
    return "test/hopper/medium-v0"


def run_script(script, *flags, cwd, timeout=600):
    """Run an algos script as a user would, from the given working directory."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "algos" / script), *map(str, flags)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def load_script(script):
    """Import an algos script as a module, to reuse its network classes when checking its outputs."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / "algos" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scalars(run_dir):
    """tag -> [(step, value)] from a run's tensorboard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def pytest_configure(config):
    # Minari nags about optional metadata (author, eval_env) of the tiny datasets made here.
    config.addinivalue_line("filterwarnings", "ignore::UserWarning:minari")
