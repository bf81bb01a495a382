"""common/make_dataset.py on a tiny budget, with both learners: loadable Minari datasets, episodes that
replay exactly in the environment (same rewards, same termination and truncation flags), reference
scores set, SAC's medium-replay equal to everything it collected, and an algos script that trains on
them. SAC's action log-density is checked against torch.distributions."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

from common.make_dataset import SACActor
from conftest import REPO, run_script


def make(namespace, work_dir, *flags):
    command = [sys.executable, str(REPO / "common" / "make_dataset.py"), "--env-id", "Hopper-v5",
               "--namespace", namespace, "--medium-size", "3000", "--random-size", "1000", "--eval-episodes", "2",
               "--work-dir", str(work_dir), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return command, result


def assert_replays_exactly(dataset_id, episodes):
    """Reset with each episode's stored seed and replay its actions: observations, rewards and flags must match."""
    dataset = minari.load_dataset(dataset_id)
    env = gym.make("Hopper-v5")
    seeds = [m["seed"] for m in dataset.storage.get_episode_metadata(episodes)]
    for seed, episode in zip(seeds, dataset.iterate_episodes(episodes)):
        obs, _ = env.reset(seed=seed)
        np.testing.assert_array_equal(obs, episode.observations[0])
        for t, action in enumerate(episode.actions):
            obs, reward, terminated, truncated, _ = env.step(action)
            assert reward == episode.rewards[t]
            assert (terminated, truncated) == (episode.terminations[t], episode.truncations[t])
            np.testing.assert_array_equal(obs, episode.observations[t + 1])


@pytest.fixture(scope="module")
def made(minari_path, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("make_dataset")
    command, result = make("mk", work_dir, "--learner", "ars", "--medium-return", "30", "--max-iterations", "10",
                           "--eval-every", "2")
    return work_dir, command, result


def test_logs_stay_quiet(made):
    """Into a log file: no metadata warnings from Minari, and progress bars that redraw every 30 s, not 10 times
    a second (three datasets made here)."""
    _, _, result = made
    assert "UserWarning" not in result.stderr
    assert len(result.stderr) < 3000, result.stderr[-3000:]


@pytest.fixture(scope="module")
def made_by_sac(minari_path, tmp_path_factory):
    """SAC for 1,500 steps (300 random, then one update each), evaluated every 400; medium is any return >= 0."""
    work_dir = tmp_path_factory.mktemp("make_dataset_sac")
    command, result = make("mksac", work_dir, "--learner", "sac", "--medium-return", "0", "--sac-random-steps", "300",
                           "--sac-eval-every", "400", "--sac-max-steps", "1500", "--sac-hidden", "32",
                           "--sac-batch-size", "32")
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
    assert_replays_exactly("mk/hopper/medium-v0", range(3))


def test_sac_medium_replay_is_everything_collected_until_the_medium_level(made_by_sac):
    work_dir, _, result = made_by_sac
    saved = np.load(work_dir / "hopper" / "policy_medium.npz")
    replay = minari.load_dataset("mksac/hopper/medium-replay-v0")
    # The first evaluation comes at the first episode end after 400 steps and reaches "medium" (>= 0).
    assert int(saved["env_steps"]) >= 400 and replay.total_steps == int(saved["env_steps"])
    assert replay.storage.metadata["algorithm_name"] == "SAC"
    assert_replays_exactly("mksac/hopper/medium-replay-v0", range(replay.total_episodes))
    medium = minari.load_dataset("mksac/hopper/medium-v0")
    assert medium.total_steps >= 3000 and "SAC policy" in medium.storage.metadata["algorithm_name"]
    assert_replays_exactly("mksac/hopper/medium-v0", range(2))


def test_sac_rerun_resumes_and_skips_existing_datasets(made_by_sac):
    _, command, _ = made_by_sac
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0
    assert "resuming the behaviour-policy learner" in result.stdout
    assert "mksac/hopper/medium-replay-v0 exists; skipping" in result.stdout


def test_sac_log_density_matches_torch_distributions():
    """log pi(a|s) of the tanh-squashed Gaussian == torch's Normal + TanhTransform (change of variables)."""
    torch.manual_seed(0)
    actor = SACActor(obs_dim=5, act_dim=3, hidden=16)
    obs = torch.randn(64, 5)
    torch.manual_seed(1)
    action, log_prob = actor(obs)
    h = actor.trunk(obs)
    mean, std = actor.mean(h), actor.log_std(h).clamp(-5, 2).exp()
    reference = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, std), [torch.distributions.TanhTransform(cache_size=1)])
    z = torch.atanh(action.clamp(-1 + 1e-6, 1 - 1e-6))
    expected = reference.log_prob(torch.tanh(z)).sum(-1)
    mask = action.abs().max(-1).values < 0.999  # atanh is ill-conditioned next to +/-1
    assert mask.sum() > 32
    torch.testing.assert_close(log_prob[mask], expected[mask], rtol=1e-3, atol=1e-3)


def test_saved_sac_policy_acts_like_the_actor_mean():
    torch.manual_seed(0)
    actor = SACActor(obs_dim=5, act_dim=3, hidden=16)
    low, high = np.array([-1.0, -2.0, 0.0]), np.array([1.0, 2.0, 4.0])
    obs = np.random.default_rng(0).standard_normal((10, 5)).astype(np.float32)
    with torch.no_grad():
        squashed = torch.tanh(actor.mean(actor.trunk(torch.from_numpy(obs)))).numpy()
    expected = low + (squashed + 1) * (high - low) / 2
    np.testing.assert_allclose(actor.mean_policy(low, high)(obs), expected, rtol=1e-5, atol=1e-6)


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
