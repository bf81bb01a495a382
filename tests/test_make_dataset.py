"""common/make_dataset.py on a tiny budget, with both learners and both protocols: loadable Minari datasets,
episodes that replay exactly in the environment (same rewards, same termination and truncation flags),
reference scores set, SAC's medium-replay equal to everything it collected, medium actions that are samples
of the saved policy, bitwise rebuilds from a saved policy, refusals of bad input, and an algos script that
trains on them. SAC's action log-density is checked against torch.distributions."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

from common.make_dataset import SACActor, average_return, read_policy
from conftest import REPO, run_script

OLD_POLICIES = REPO / "benchmark_results" / "behaviour_policies" / "mean_plus_noise"


def make(namespace, work_dir, *flags, check=True):
    command = [sys.executable, str(REPO / "common" / "make_dataset.py"), "--env-id", "Hopper-v5",
               "--namespace", namespace, "--medium-size", "3000", "--random-size", "1000", "--eval-episodes", "2",
               "--work-dir", str(work_dir), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 or not check, result.stderr[-3000:]
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
    command, result = make("mk", work_dir, "--learner", "ars", "--protocol", "mean-plus-noise", "--medium-return", "30",
                           "--max-iterations", "10", "--eval-every", "2")
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
    assert medium["data_protocol"] == "mean-plus-noise" and os.path.exists(medium["policy_checkpoint"])
    assert medium["policy_return"] >= 30


def test_episodes_replay_exactly_in_the_environment(made):
    assert_replays_exactly("mk/hopper/medium-v0", range(3))


def test_sac_medium_replay_is_everything_collected_until_the_medium_level(made_by_sac):
    work_dir, _, result = made_by_sac
    saved = np.load(minari.load_dataset("mksac/hopper/medium-v0").storage.metadata["policy_checkpoint"])
    replay = minari.load_dataset("mksac/hopper/medium-replay-v0")
    # The first evaluation comes at the first episode end after 400 steps and reaches "medium" (>= 0).
    assert int(saved["env_steps"]) >= 400 and replay.total_steps == int(saved["env_steps"])
    assert replay.storage.metadata["algorithm_name"] == "SAC"
    assert_replays_exactly("mksac/hopper/medium-replay-v0", range(replay.total_episodes))
    medium = minari.load_dataset("mksac/hopper/medium-v0")
    assert medium.total_steps >= 3000 and "SAC policy" in medium.storage.metadata["algorithm_name"]
    assert medium.storage.metadata["data_protocol"] == "sampled"
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


def test_saved_sac_policy_is_the_actors_whole_distribution():
    torch.manual_seed(0)
    actor = SACActor(obs_dim=5, act_dim=3, hidden=16)
    low, high = np.array([-1.0, -2.0, 0.0]), np.array([1.0, 2.0, 4.0])
    obs = np.random.default_rng(0).standard_normal((10, 5)).astype(np.float32)
    with torch.no_grad():
        h = actor.trunk(torch.from_numpy(obs))
        mean, log_std = actor.mean(h).numpy(), actor.log_std(h).clamp(-5, 2).numpy()
    policy = actor.policy(low, high)
    np.testing.assert_allclose(policy.distribution(obs)[0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(policy.distribution(obs)[1], log_std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(policy(obs), low + (np.tanh(mean) + 1) * (high - low) / 2, rtol=1e-5, atol=1e-6)


def policy_by_hand(path, obs):
    """mu and sigma of a saved tanh-Gaussian policy, computed here from the file's arrays."""
    f = np.load(path)
    h = np.maximum(obs @ f["trunk_w0"].T + f["trunk_b0"], 0)
    h = np.maximum(h @ f["trunk_w1"].T + f["trunk_b1"], 0)
    return h @ f["mean_w"].T + f["mean_b"], np.exp(np.clip(h @ f["log_std_w"].T + f["log_std_b"], -5, 2))


def test_medium_actions_are_samples_of_the_saved_policy(made_by_sac):
    """Standardised pre-tanh actions (atanh(a) - mu) / sigma are N(0, 1); every action has a finite
    log-likelihood under the policy, and none sits on the bound."""
    dataset = minari.load_dataset("mksac/hopper/medium-v0")
    obs = np.concatenate([e.observations[:-1] for e in dataset.iterate_episodes()])
    actions = np.concatenate([e.actions for e in dataset.iterate_episodes()]).astype(np.float64)
    assert np.abs(actions).max() < 1
    mean, std = policy_by_hand(dataset.storage.metadata["policy_checkpoint"], obs)
    z = np.arctanh(actions)
    eps = (z - mean) / std
    log_likelihood = (-0.5 * eps**2 - np.log(std) - 0.5 * np.log(2 * np.pi) - np.log(1 - actions**2)).sum(-1)
    assert np.isfinite(log_likelihood).all()
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05, (eps.mean(), eps.std())
    spread = dataset.storage.metadata["behaviour_action_std"]
    assert 0.5 * (1 - actions**2).mean() * std.mean() < spread < std.mean()  # tanh' scales sigma down


def test_saved_policy_reproduces_its_logged_return(made_by_sac):
    path = minari.load_dataset("mksac/hopper/medium-v0").storage.metadata["policy_checkpoint"]
    policy, saved = read_policy(path)
    args = type("Args", (), dict(seed=0, eval_episodes=2, protocol="sampled"))
    assert average_return(gym.make("Hopper-v5"), policy, args, int(np.load(path)["iteration"])) == saved["avg_return"]


def test_medium_policy_rebuilds_the_dataset_bitwise(made_by_sac, tmp_path):
    path = minari.load_dataset("mksac/hopper/medium-v0").storage.metadata["policy_checkpoint"]
    make("mkre", tmp_path, "--medium-policy", path, "--random-size", "0")
    rebuilt, original = minari.load_dataset("mkre/hopper/medium-v0"), minari.load_dataset("mksac/hopper/medium-v0")
    assert rebuilt.total_episodes == original.total_episodes
    for a, b in zip(rebuilt.iterate_episodes(), original.iterate_episodes()):
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert "mkre/hopper/medium-replay-v0" not in minari.list_local_datasets()
    assert list(tmp_path.iterdir()) == []  # nothing trained, so nothing in the work directory


@pytest.mark.parametrize("env_id, flags, expected", [
    ("Walker2d-v5", ("--medium-policy", "SAC"), "is a policy for Hopper-v5, not Walker2d-v5"),
    ("Hopper-v5", ("--medium-policy", str(OLD_POLICIES / "hopper_medium.npz")), "--protocol mean-plus-noise"),
    ("Walker2d-v5", ("--protocol", "mean-plus-noise", "--medium-policy", str(OLD_POLICIES / "hopper_medium.npz")),
     "does not fit Walker2d-v5"),
    ("Hopper-v5", ("--learner", "ars"), "add --protocol mean-plus-noise"),
    ("Hoper-v5", (), "error: --env-id Hoper-v5: "),  # a typo: Gymnasium's own suggestion, in one line
    ("Hopper-v5", ("--expert-policy", "SAC"), "--expert-policy needs --medium-policy"),
    ("Hopper-v5", ("--medium-return", "100000", "--sac-random-steps", "100", "--sac-max-steps", "300",
                   "--sac-eval-every", "100", "--sac-hidden", "16"), "Re-run with a larger --sac-max-steps"),
])
def test_bad_input_is_refused_with_what_to_do(env_id, flags, expected, made_by_sac, tmp_path):
    sac_policy = minari.load_dataset("mksac/hopper/medium-v0").storage.metadata["policy_checkpoint"]
    flags = [sac_policy if flag == "SAC" else flag for flag in flags]
    command = [sys.executable, str(REPO / "common" / "make_dataset.py"), "--env-id", env_id, "--namespace", "bad",
               "--medium-size", "1000", "--eval-episodes", "1", "--work-dir", str(tmp_path), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not [d for d in minari.list_local_datasets() if d.startswith("bad/")]  # nothing half-written


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


def test_a_learner_saved_with_other_settings_is_not_resumed(made_by_sac):
    work_dir, _, _ = made_by_sac
    _, result = make("mkother", work_dir, "--learner", "sac", "--seed", "1", "--sac-hidden", "32", check=False)
    assert result.returncode != 0 and "holds a learner made with other settings" in result.stderr
    assert "Traceback" not in result.stderr
