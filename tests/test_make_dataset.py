"""common/make_dataset.py on a tiny budget: loadable Minari datasets, episodes that replay exactly in
the environment (same rewards, same termination and truncation flags), reference scores set, and an
algos script that trains on them."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest

from conftest import REPO, run_script


@pytest.fixture(scope="module")
def made(minari_path, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("make_dataset")
    command = [sys.executable, str(REPO / "common" / "make_dataset.py"), "--env-id", "Hopper-v5", "--namespace", "mk",
               "--medium-return", "30", "--max-iterations", "10", "--eval-every", "2", "--eval-episodes", "2",
               "--medium-size", "3000", "--random-size", "1000", "--work-dir", str(work_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    return work_dir, command, result


def test_datasets_are_written_with_reference_scores_and_provenance(made):
    work_dir, _, _ = made
    for kind, minimum in (("random", 1000), ("medium-replay", 1), ("medium", 3000)):
        dataset = minari.load_dataset(f"mk/hopper/{kind}-v0")
        assert dataset.total_steps >= minimum
        metadata = dataset.storage.metadata
        assert (metadata["ref_min_score"], metadata["ref_max_score"]) == pytest.approx((-20.272305, 3234.3))
        assert json.loads(metadata["generator_args"])["env_id"] == "Hopper-v5"
        for episode in dataset.iterate_episodes():
            n = len(episode.actions)
            assert episode.observations.shape == (n + 1, 11) and episode.actions.shape == (n, 3)
            assert len(episode.rewards) == len(episode.terminations) == len(episode.truncations) == n
            assert not (episode.terminations[:-1].any() or episode.truncations[:-1].any())
            assert episode.terminations[-1] or episode.truncations[-1]
    medium = minari.load_dataset("mk/hopper/medium-v0").storage.metadata
    assert medium["policy_checkpoint"].endswith("policy_medium.npz") and os.path.exists(medium["policy_checkpoint"])


def test_episodes_replay_exactly_in_the_environment(made):
    """Reset with each episode's stored seed and replay its actions: rewards and flags must match."""
    dataset = minari.load_dataset("mk/hopper/medium-v0")
    env = gym.make("Hopper-v5")
    seeds = [m["seed"] for m in dataset.storage.get_episode_metadata(range(3))]
    for seed, episode in zip(seeds, dataset.iterate_episodes(range(3))):
        obs, _ = env.reset(seed=seed)
        np.testing.assert_array_equal(obs, episode.observations[0])
        for t, action in enumerate(episode.actions):
            obs, reward, terminated, truncated, _ = env.step(action)
            assert reward == episode.rewards[t]
            assert (terminated, truncated) == (episode.terminations[t], episode.truncations[t])
        np.testing.assert_array_equal(obs, episode.observations[-1])


def test_rerun_resumes_and_skips_existing_datasets(made):
    _, command, _ = made
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0
    assert "resuming the behaviour-policy learner" in result.stdout
    assert "mk/hopper/medium-v0 exists; skipping" in result.stdout


def test_an_algos_script_trains_on_a_made_dataset(made, tmp_path):
    result = run_script("td3bc_pretrain.py", "--env-id", "mk/hopper/medium-replay-v0", "--total-steps", 200,
                        "--pretrain-steps", 100, "--eval-episodes", 1, "--eval-interval", 200, "--run-name", "made",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "made" / "model.pt").exists()
