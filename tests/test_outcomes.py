"""What runs leave on the paths users take: lambda-returns that wait for fitted critics, scores on datasets
without reference returns, the diagnostics that explain a run, soft BC on actions at the bound."""

import dataclasses

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from torch.distributions import Normal

from common.make_dataset import rollout
from conftest import TIME_LIMIT, load_script, run_script, scalars

SMALL = ["--hidden-dim", 64, "--log-interval", 50, "--eval-episodes", 0]


def final_weights(run_dir):
    model = torch.load(run_dir / "model.pt", weights_only=True)
    return {f"{net}.{name}": tensor for net in ("actor", "critic") for name, tensor in model[net].items()}


def text_tag(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


# ---------------------------------------------------------------------------------------- lambda-returns
@pytest.mark.parametrize("script, extra", [("td3bc_pretrain.py", []), ("edac_pretrain.py", ["--num-critics", 3])])
def test_lambda_returns_wait_one_refresh_interval_for_fitted_critics(script, extra, tiny_dataset, tmp_path):
    """Pre-training shorter than one --lambda-refresh-interval never computes a lambda-return, so it trains
    bit for bit as with --lam 0; a longer one does compute them."""
    flags = ["--env-id", tiny_dataset, "--total-steps", 300, "--pretrain-steps", 200, *SMALL, *extra]
    output = {}
    for name, lam, interval in (("mc", 0.0, 250), ("short", 0.5, 250), ("long", 0.5, 50)):
        result = run_script(script, *flags, "--lam", lam, "--lambda-refresh-interval", interval, "--run-name", name,
                            cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        output[name] = result.stdout + result.stderr
    assert "--lam 0.5 takes no effect" in output["short"]  # and the start-up summary says so
    assert "lambda 0.5: lambda-returns from critic step 50, recomputed every 50 steps" in output["long"]
    # TD3+BC pre-trains its critics for 200 steps, EDAC for half of them: both fewer than 250, more than 50.
    mc, short, long = (final_weights(tmp_path / "runs" / name) for name in ("mc", "short", "long"))
    assert all(torch.equal(mc[k], short[k]) for k in mc)
    assert not all(torch.equal(mc[k], long[k]) for k in mc)


# ---------------------------------------------------------------------------------------- scores
def make_dataset_without_references(dataset_id, env_id, num_episodes=6):
    env = gym.make(env_id, max_episode_steps=TIME_LIMIT)
    rng = np.random.default_rng(0)
    act = lambda obs: np.clip(0.3 * rng.standard_normal(env.action_space.shape), -1, 1).astype(np.float32)
    episodes = [dataclasses.replace(rollout(env, act, seed=i, record=True)[2], id=i) for i in range(num_episodes)]
    minari.create_dataset_from_buffers(dataset_id, episodes, env=env)  # no ref_min_score / ref_max_score


def test_dataset_without_references_is_scored_with_d4rl_references(minari_path, tmp_path):
    make_dataset_without_references("test/hopper/noref-v0", "Hopper-v5")
    result = run_script("td3bc_pretrain.py", "--env-id", "test/hopper/noref-v0", "--total-steps", 100,
                        "--pretrain-steps", 50, "--eval-interval", 100, "--eval-episodes", 2, "--run-name", "noref",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "normalised with D4RL's hopper reference returns" in result.stdout
    run_dir = tmp_path / "runs" / "noref"
    logged = scalars(run_dir)
    (_, score), (_, ret) = logged["eval/normalized_score"][0], logged["eval/return"][0]
    assert score == pytest.approx(100 * (ret + 20.272305) / (3234.3 + 20.272305), rel=1e-5)
    assert "D4RL's hopper reference returns" in text_tag(run_dir, "eval/score_reference")


def test_task_without_any_references_logs_returns_not_scores(minari_path, tmp_path):
    make_dataset_without_references("test/invertedpendulum/noref-v0", "InvertedPendulum-v5")
    result = run_script("edac_pretrain.py", "--env-id", "test/invertedpendulum/noref-v0", "--num-critics", 2,
                        "--total-steps", 60, "--pretrain-steps", 40, "--eval-interval", 60, "--eval-episodes", 2,
                        "--hidden-dim", 32, "--run-name", "none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logged = scalars(tmp_path / "runs" / "none")
    assert "eval/normalized_score" not in logged and "eval/return" in logged
    assert f"final return {logged['eval/return'][-1][1]:.1f}" in result.stdout
    assert "no reference returns for 'invertedpendulum'" in result.stdout


# ---------------------------------------------------------------------------------------- diagnostics
@pytest.mark.parametrize("script, extra, tags", [
    ("td3bc_pretrain.py", [], ["losses/bc_mse", "charts/q_weight"]),
    ("td3bc_cql_pretrain.py", [], ["losses/bc_mse", "charts/q_weight", "losses/cql"]),
    ("edac_pretrain.py", ["--num-critics", 3], ["charts/alpha", "charts/entropy", "losses/diversity"]),
    ("edac_bc_pretrain.py", ["--num-critics", 3], ["charts/alpha", "charts/entropy", "losses/bc"]),
])
def test_diagnostics_are_logged_and_finite(script, extra, tags, tiny_dataset, tmp_path):
    result = run_script(script, "--env-id", tiny_dataset, "--total-steps", 300, "--pretrain-steps", 200, *SMALL,
                        *extra, "--run-name", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logged = scalars(tmp_path / "runs" / "run")
    for tag in ["values/q_data", "values/q_policy", "values/target", *tags]:
        assert [s for s, _ in logged[tag]][-1] == 300, tag  # present in the RL phase
        assert all(np.isfinite(v) for _, v in logged[tag]), tag
    for tag in ("values/q_data", "values/target"):
        assert logged[tag][0][0] <= 200, tag  # and in the critics' pre-training
    for tag in ("pretrain/critic_explained_variance", "pretrain/bc_mse", "pretrain/q_mean", "pretrain/target_mean"):
        assert [s for s, _ in logged[tag]] == [200], tag
        assert np.isfinite(logged[tag][0][1])
    assert "pre-training done at step 200: the critics explain" in result.stdout + result.stderr
    if script.startswith("edac"):  # the temperature and entropy that the soft returns carried into EDAC
        assert logged["pretrain/alpha"][0][0] == 200 and logged["pretrain/alpha"][0][1] > 0
        assert [s for s, _ in logged["pretrain/entropy"]] == [200] and np.isfinite(logged["pretrain/entropy"][0][1])
        assert f"temperature {logged['pretrain/alpha'][0][1]:.3f}" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------- soft BC at the bound
def test_saturated_coordinates_count_by_their_probability_mass_beyond_the_bound():
    edac = load_script("edac_pretrain.py")
    torch.manual_seed(0)
    actor = edac.Actor(4, 3, max_action=2.0, hidden_dim=16, layernorm=True)
    obs = torch.randn(5, 4)
    mean, log_std = actor.distribution(obs)
    action = torch.tensor([[2.0, 0.3, -2.0]] * 5)  # first and last coordinates on the bound
    normal = Normal(mean.double(), log_std.exp().double())
    bound = np.arctanh(0.99)
    u = torch.tensor(np.arctanh(0.15), dtype=torch.float64)  # the interior coordinate: a density of a = 2 tanh(u)
    interior = normal.log_prob(u)[:, 1] - torch.log(2 * (1 - torch.tanh(u) ** 2))
    expected = torch.log(1 - normal.cdf(torch.tensor(bound)))[:, 0] + torch.log(normal.cdf(torch.tensor(-bound)))[:, 2]
    expected = expected + interior
    torch.testing.assert_close(actor.data_log_prob(mean, log_std, action, 0.99).double(), expected, rtol=1e-4,
                               atol=1e-4)
    # saturation = 1 is the authors' likelihood: the density at the action clipped to +-(1 - 1e-6).
    clipped = torch.atanh((action / 2.0).clamp(-1 + 1e-6, 1 - 1e-6))
    torch.testing.assert_close(actor.data_log_prob(mean, log_std, action, 1.0),
                               actor.log_prob_pre_tanh(mean, log_std, clipped))


def make_saturated_dataset(dataset_id, num_episodes=30):
    """A noisy linear policy whose actions are clipped at the bound in about a third of all coordinates."""
    env = gym.make("Hopper-v5", max_episode_steps=TIME_LIMIT)
    rng = np.random.default_rng(1)
    weights = rng.normal(scale=0.5, size=(3, 11))
    act = lambda obs: np.clip(1.3 * np.tanh(weights @ obs) + 0.1 * rng.standard_normal(3), -1, 1).astype(np.float32)
    episodes = [dataclasses.replace(rollout(env, act, seed=i, record=True)[2], id=i) for i in range(num_episodes)]
    return minari.create_dataset_from_buffers(dataset_id, episodes, env=env)


def test_soft_bc_on_clipped_actions_keeps_a_sensible_policy(minari_path, tmp_path):
    """With many actions on the bound, the authors' likelihood (a density at atanh(1 - 1e-6)) lets those
    coordinates dominate soft BC; the censored likelihood does not: the policy keeps a reasonable entropy and
    imitates at least as well."""
    dataset = make_saturated_dataset("test/hopper/saturated-v0")
    actions = np.concatenate([e.actions for e in dataset.iterate_episodes()])
    assert 0.2 < (np.abs(actions) >= 1).mean() < 0.5
    fit = {}
    for name, saturation in (("authors", 1.0), ("censored", 0.999)):
        result = run_script("edac_pretrain.py", "--env-id", "test/hopper/saturated-v0", "--num-critics", 2,
                            "--total-steps", 600, "--pretrain-steps", 600, "--actor-pretrain-fraction", 1.0,
                            "--action-saturation", saturation, "--hidden-dim", 64, "--log-interval", 100,
                            "--eval-episodes", 0, "--run-name", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        logged = scalars(tmp_path / "runs" / name)
        fit[name] = {tag: logged[tag][-1][1] for tag in ("charts/entropy", "pretrain/bc_mse")}
    assert fit["censored"]["charts/entropy"] > fit["authors"]["charts/entropy"] + 0.25, fit
    assert fit["censored"]["pretrain/bc_mse"] <= 1.1 * fit["authors"]["pretrain/bc_mse"], fit


# ---------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("script", ["td3bc_pretrain.py", "edac_pretrain.py"])
def test_batch_sampler_does_not_replay_the_weight_initialisation_stream(script):
    module = load_script(script)
    sampler = module.make_sampler(7, "cpu")
    same_seed = torch.Generator().manual_seed(7)
    assert not torch.equal(torch.rand(100, generator=sampler), torch.rand(100, generator=same_seed))
    again = module.make_sampler(7, "cpu")
    assert torch.equal(torch.rand(100, generator=again), torch.rand(100, generator=module.make_sampler(7, "cpu")))


# ---------------------------------------------------------------------------------------- --critic-init
def make_dataset_with_large_returns(dataset_id):
    """The tiny dataset's episodes with rewards x 50: Monte-Carlo returns in the hundreds, as in D4RL's MuJoCo."""
    from minari.data_collector import EpisodeBuffer

    source = minari.load_dataset("test/hopper/medium-v0")
    episodes = [EpisodeBuffer(id=e.id, observations=e.observations, actions=e.actions, rewards=e.rewards * 50,
                              terminations=e.terminations, truncations=e.truncations)
                for e in source.iterate_episodes()]
    minari.create_dataset_from_buffers(dataset_id, episodes, env=gym.make("Hopper-v5", max_episode_steps=TIME_LIMIT))


@pytest.mark.parametrize("script, extra", [("td3bc_pretrain.py", []), ("edac_pretrain.py", ["--num-critics", 3])])
def test_critic_init_starts_the_critics_at_the_scale_of_their_targets(script, extra, tiny_dataset, tmp_path):
    if "test/hopper/large-returns-v0" not in minari.list_local_datasets():
        make_dataset_with_large_returns("test/hopper/large-returns-v0")
    fit = {}
    for init in ("paper", "mean-target"):
        result = run_script(script, "--env-id", "test/hopper/large-returns-v0", "--total-steps", 600,
                            "--pretrain-steps", 600, *SMALL, *extra, "--critic-init", init, "--run-name", init,
                            cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        logged = scalars(tmp_path / "runs" / init)
        fit[init] = logged["pretrain/q_mean"][-1][1], logged["pretrain/target_mean"][-1][1]
    q, target = fit["mean-target"]
    assert target > 100 and abs(q - target) < 0.1 * target, fit  # a few hundred critic steps in: at the scale
    q, target = fit["paper"]
    assert q < 0.5 * target, fit  # without it, still far below


# ---------------------------------------------------------------------------------------- data checks
def test_an_episode_that_just_stops_ends_there(tiny_dataset):
    """Episodes whose last step carries neither flag (the data stops) must not run into the next one."""
    from minari.data_collector import EpisodeBuffer

    module = load_script("td3bc_pretrain.py")
    source = list(minari.load_dataset(tiny_dataset).iterate_episodes())[:3]
    episodes = [EpisodeBuffer(id=i, observations=e.observations, actions=e.actions, rewards=e.rewards,
                              terminations=np.zeros_like(e.terminations), truncations=np.zeros_like(e.truncations))
                for i, e in enumerate(source)]
    if "test/hopper/unflagged-v0" not in minari.list_local_datasets():
        minari.create_dataset_from_buffers("test/hopper/unflagged-v0", episodes,
                                           env=gym.make("Hopper-v5", max_episode_steps=TIME_LIMIT))
    data = module.flatten_episodes([minari.load_dataset("test/hopper/unflagged-v0")])
    ends = np.cumsum([len(e.rewards) for e in source]) - 1
    assert np.flatnonzero(data["truncations"]).tolist() == ends.tolist()
    assert not data["terminations"].any()


def test_actions_must_share_one_symmetric_bound():
    module = load_script("td3bc_pretrain.py")
    data = {"observations": np.zeros((2, 3)), "actions": np.zeros((2, 2)), "rewards": np.zeros(2),
            "next_observations": np.zeros((2, 3)), "terminations": np.zeros(2, bool), "truncations": np.ones(2, bool)}
    module.check_data(data, gym.spaces.Box(-2.0, 2.0, (2,)))  # fine
    with pytest.raises(SystemExit, match="not the same symmetric interval"):
        module.check_data(data, gym.spaces.Box(np.array([-1.0, 0.0]), np.array([1.0, 2.0])))
