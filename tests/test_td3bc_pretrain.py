"""algos/td3bc_pretrain.py end to end on a tiny local Minari dataset: what it learns, what it leaves, how it fails."""

import dataclasses

import minari
import numpy as np
import pytest
import torch

from conftest import TIME_LIMIT, load_script, make_tiny_dataset, run_script, scalars

SCRIPT = "td3bc_pretrain.py"


def episode_mc_returns(dataset, gamma=0.99):
    """Returns-to-go written out per episode, independently of common/returns.py."""
    out = []
    for episode in dataset.iterate_episodes():
        g = episode.rewards[-1] / (1 - gamma) if episode.truncations[-1] else episode.rewards[-1]
        returns = [g]
        for r in episode.rewards[-2::-1]:
            g = r + gamma * g
            returns.append(g)
        out.extend(returns[::-1])
    return np.array(out)


def flat(dataset, key):
    column = lambda e: getattr(e, key)[:-1] if key == "observations" else getattr(e, key)
    return np.concatenate([column(e) for e in dataset.iterate_episodes()])


def test_pretraining_fits_returns_and_imitates_actions(tiny_dataset, tmp_path):
    result = run_script(SCRIPT, "--env-id", tiny_dataset, "--total-steps", 2000, "--pretrain-steps", 2000,
                        "--eval-episodes", 0, "--run-name", "pre", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = torch.load(tmp_path / "runs" / "pre" / "model.pt", weights_only=True)
    module = load_script(SCRIPT)
    dataset = minari.load_dataset(tiny_dataset)
    obs, actions = flat(dataset, "observations"), flat(dataset, "actions")
    obs_t = torch.as_tensor((obs - model["obs_mean"].numpy()) / model["obs_std"].numpy(), dtype=torch.float32)
    actions_t = torch.as_tensor(actions, dtype=torch.float32)

    critic = module.Critic(obs.shape[1], actions.shape[1], 256, True)
    critic.load_state_dict(model["critic"])
    with torch.no_grad():
        q = critic(obs_t, actions_t).numpy()
    target = episode_mc_returns(dataset)
    explained = [1 - np.var(target - member) / np.var(target) for member in q]
    assert min(explained) > 0.8, explained  # both critics explain most of the variance of the MC returns
    # The run's own hand-over diagnostic says the same (it samples every transition of this small dataset).
    logged = scalars(tmp_path / "runs" / "pre")
    assert logged["pretrain/critic_explained_variance"][0][1] == pytest.approx(np.mean(explained), abs=1e-3)
    assert logged["pretrain/target_mean"][0][1] == pytest.approx(target.mean(), rel=1e-4)

    actor = module.Actor(obs.shape[1], actions.shape[1], 1.0, 256, True)
    torch.manual_seed(123)
    untrained = module.Actor(obs.shape[1], actions.shape[1], 1.0, 256, True)
    actor.load_state_dict(model["actor"])
    with torch.no_grad():
        trained_mse = ((actor(obs_t) - actions_t) ** 2).mean().item()
        untrained_mse = ((untrained(obs_t) - actions_t) ** 2).mean().item()
    assert trained_mse < 0.3 * untrained_mse
    assert trained_mse < 0.5 * actions.var(0).mean()  # better than predicting the mean action


def test_full_run_from_another_directory_leaves_logs_and_model(tiny_dataset, tmp_path):
    result = run_script(SCRIPT, "--env-id", tiny_dataset, "--total-steps", 600, "--pretrain-steps", 300,
                        "--lam", 0.3, "--lambda-refresh-interval", 100, "--log-interval", 100,
                        "--eval-interval", 300, "--eval-episodes", 3, "--run-name", "full", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "full"
    logged = scalars(run_dir)
    for tag in ("losses/pretrain_actor", "losses/pretrain_critic", "losses/critic", "losses/actor", "charts/SPS"):
        assert tag in logged, tag
    assert [s for s, _ in logged["losses/pretrain_critic"]] == [100, 200, 300]
    assert [s for s, _ in logged["losses/critic"]] == [400, 500, 600]
    assert [s for s, _ in logged["eval/normalized_score"]] == [300, 600]
    # Normalised score = 100 * (return - ref_min) / (ref_max - ref_min), from the dataset's references.
    for (_, score), (_, ret) in zip(logged["eval/normalized_score"], logged["eval/return"]):
        assert score == pytest.approx(100 * (ret + 20.27) / (3234.3 + 20.27), rel=1e-4)
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert {"actor", "critic", "obs_mean", "obs_std", "args"} <= set(model)
    assert model["args"]["lam"] == 0.3 and model["args"]["total_steps"] == 600


def test_evaluation_returns_match_a_hand_rolled_episode(tiny_dataset):
    """evaluate() against a plain loop with one environment: same seed, same actor, same return."""
    module = load_script(SCRIPT)
    dataset = minari.load_dataset(tiny_dataset)
    torch.manual_seed(0)
    actor = module.Actor(11, 3, 1.0, 64, True)
    mean, std = torch.zeros(11), torch.ones(11)
    envs = [module.make_eval_env(dataset) for _ in range(2)]
    returns = module.evaluate(actor, envs, mean, std, seed=7, ignore_terminated_until=0, device="cpu")
    env = dataset.recover_environment(eval_env=True)
    for i in range(2):
        obs, _ = env.reset(seed=7 + i)
        total, steps = 0.0, 0
        while True:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
            obs, r, terminated, truncated, _ = env.step(action)
            total, steps = total + r, steps + 1
            if terminated or truncated:
                break
        assert returns[i] == pytest.approx(total)
        assert steps <= TIME_LIMIT


# ---------------------------------------------------------------------------------------- bad input
def main_error(capsys, **flags):
    """Run main() in-process and return the message it exits with."""
    module = load_script(SCRIPT)
    with pytest.raises(SystemExit) as exit_info:
        module.main(dataclasses.replace(module.Args(), **flags))
    return str(exit_info.value.code)


@pytest.mark.parametrize("flags, expected", [
    (dict(env_id="hopper-bogus-v2"), "Minari does not host"),
    (dict(env_id="hopper-medium-replay-v2"), "make_dataset.py"),
    (dict(env_id="not a name"), "neither a D4RL name"),
    (dict(lam=1.5), "--lam must lie in [0, 1]"),
    (dict(pretrain_steps=2000, total_steps=1000), "cannot exceed --total-steps"),
    (dict(batch_size=0), "--batch-size must be positive"),
    (dict(eval_episodes=-1), "--eval-episodes must not be negative"),
    (dict(threads=0), "--threads must be positive (omit it for one per core), got 0"),  # torch: 0 is every core
    (dict(learning_rate=float("nan")), "--learning-rate must be positive, got nan"),  # NaN fails every comparison
    (dict(gamma=1.0), "--gamma must lie in [0, 1), got 1.0"),
    (dict(device="gpu"), "--device gpu is not a torch device; use cpu, cuda"),
])
def test_bad_flags_are_refused_before_training(flags, expected, capsys, minari_path):
    assert expected in main_error(capsys, **flags)


def test_missing_dataset_says_how_to_get_one(minari_path, capsys):
    message = main_error(capsys, env_id="local/hopper/absent-v0")
    assert "on this machine" in message and "make_dataset.py" in message


@pytest.mark.parametrize("defect", ["nan_obs", "action_out_of_bounds", "nan_reward"])
def test_hostile_data_is_refused(defect, minari_path, capsys):
    dataset_id = f"test/hopper/{defect.replace('_', '')}-v0"
    if dataset_id not in minari.list_local_datasets():
        dataset = make_tiny_dataset(dataset_id, num_episodes=3)
        episodes = list(dataset.iterate_episodes())
        minari.delete_dataset(dataset_id)
        e = episodes[1]
        obs, actions, rewards = e.observations.copy(), e.actions.copy(), e.rewards.copy()
        if defect == "nan_obs":
            obs[2, 0] = np.nan
        elif defect == "action_out_of_bounds":
            actions[1, 0] = 3.0
        else:
            rewards[0] = np.inf
        from minari.data_collector import EpisodeBuffer
        import gymnasium as gym
        buffers = [EpisodeBuffer(id=i, observations=x.observations, actions=x.actions, rewards=x.rewards,
                                 terminations=x.terminations, truncations=x.truncations)
                   for i, x in enumerate(episodes)]
        buffers[1] = dataclasses.replace(buffers[1], observations=obs, actions=actions, rewards=rewards)
        minari.create_dataset_from_buffers(dataset_id, buffers, env=gym.make("Hopper-v5", max_episode_steps=TIME_LIMIT))
    message = main_error(capsys, env_id=dataset_id)
    expected = {"nan_obs": "observations contain NaN", "action_out_of_bounds": "outside the action space",
                "nan_reward": "rewards contain NaN or infinite"}[defect]
    assert expected in message


def test_error_exits_nonzero_without_traceback(tmp_path, minari_path):
    result = run_script(SCRIPT, "--env-id", "hopper-medium-replay-v2", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "error:" in result.stderr
