"""edac_pretrain.py, edac_bc_pretrain.py and td3bc_cql_pretrain.py: their pieces checked against
independent computations, and each script run end to end on a tiny local Minari dataset."""

import copy
import dataclasses
import math

import minari
import numpy as np
import pytest
import torch
from torch.distributions import Normal

from conftest import load_script, run_script, scalars

edac = load_script("edac_pretrain.py")


def test_vectorized_linear_equals_separate_linear_layers():
    torch.manual_seed(0)
    layer = edac.VectorizedLinear(5, 7, ensemble_size=4)
    x = torch.randn(4, 3, 5)
    out = layer(x)
    for i in range(4):
        separate = torch.nn.Linear(5, 7)
        with torch.no_grad():
            separate.weight.copy_(layer.weight[i].T)
            separate.bias.copy_(layer.bias[i, 0])
        torch.testing.assert_close(out[i], separate(x[i]))


def test_critic_ensemble_members_are_independent_networks():
    """Changing member 2's weights changes only member 2's Q-values."""
    torch.manual_seed(0)
    critic = edac.Critic(4, 2, 16, True, num_critics=3)
    obs, act = torch.randn(6, 4), torch.rand(6, 2) * 2 - 1
    before = critic(obs, act)
    with torch.no_grad():
        critic.trunk[0].weight[2] += torch.randn_like(critic.trunk[0].weight[2])
    after = critic(obs, act)
    torch.testing.assert_close(after[:2], before[:2])
    assert not torch.allclose(after[2], before[2])


def test_tanh_gaussian_log_prob_matches_numerical_change_of_variables():
    """1-D: density of a = 2 tanh(u), u ~ N(mu, sigma), as (CDF difference over a small interval) / width."""
    torch.manual_seed(0)
    actor = edac.Actor(3, 1, max_action=2.0, hidden_dim=8, layernorm=False)
    obs = torch.randn(5, 3)
    mean, log_std = actor.distribution(obs)
    normal = Normal(mean.double(), log_std.exp().double())
    for a in (-1.9, -0.5, 0.0, 0.7, 1.5):
        action = torch.full((5, 1), a)
        width = 1e-5
        lo, hi = (torch.atanh(torch.tensor((a + sign * width / 2) / 2.0, dtype=torch.float64)) for sign in (-1, 1))
        numeric = torch.log((normal.cdf(hi) - normal.cdf(lo)) / width).squeeze(-1)
        log_prob = actor.data_log_prob(*actor.distribution(obs), action, 1.0)
        torch.testing.assert_close(log_prob.double(), numeric, rtol=1e-4, atol=1e-4)
    # The sampling path gives the same log-probability as evaluating its own action.
    noise = torch.randn(5, 1)
    action, log_prob = actor(obs, noise)
    torch.testing.assert_close(log_prob, actor.data_log_prob(*actor.distribution(obs), action, 1.0), rtol=1e-4,
                               atol=1e-4)


def test_diversity_term_matches_a_loop_over_critic_pairs():
    torch.manual_seed(0)
    critic = edac.Critic(4, 3, 16, True, num_critics=4)
    obs, act = torch.randn(8, 4), torch.rand(8, 3) * 2 - 1
    target = torch.randn(8)
    loss, parts = edac.critic_loss_with_diversity(critic, obs, act, target, eta=2.0)
    regression, diversity = parts["regression"], parts["diversity"]
    grads = []
    for i in range(4):  # each member's action gradient, one at a time
        a = act.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(critic(obs, a)[i].sum(), a)[0])
    grads = [g / (g.norm(dim=-1, keepdim=True) + 1e-10) for g in grads]
    pairs = sum((grads[i] * grads[j]).sum(-1) for i in range(4) for j in range(4) if i != j)
    torch.testing.assert_close(diversity, pairs.mean() / 3)
    torch.testing.assert_close(regression, ((critic(obs, act) - target) ** 2).mean(1).sum())
    torch.testing.assert_close(loss, regression + 2.0 * diversity)


def test_bootstrap_resamples_weight_each_critics_regression_on_its_own():
    torch.manual_seed(0)
    critic = edac.Critic(4, 3, 16, True, num_critics=3)
    obs, act, target = torch.randn(8, 4), torch.rand(8, 3) * 2 - 1, torch.randn(8)
    args = edac.Args(num_critics=3, seed=5)
    weights = edac.bootstrap_weights(8, args, "cpu")  # [transitions, critics]
    assert torch.equal(weights, edac.bootstrap_weights(8, args, "cpu"))  # the same resamples on every resume
    assert weights.shape == (8, 3) and (weights == weights.round()).all() and (weights >= 0).all()
    _, parts = edac.critic_loss_with_diversity(critic, obs, act, target, eta=0.0, weights=weights.T)
    q = critic(obs, act).detach()
    by_hand = sum(sum(weights[i, j] * (q[j, i] - target[i]) ** 2 for i in range(8)) / 8 for j in range(3))
    torch.testing.assert_close(parts["regression"], by_hand)
    many = edac.bootstrap_weights(100_000, edac.Args(num_critics=2), "cpu")
    assert abs(many.mean().item() - 1) < 0.01 and abs(many.var().item() - 1) < 0.02  # Poisson(1)
    assert (many[:, 0] != many[:, 1]).float().mean() > 0.5  # each critic its own resample


def regression_and_diversity_by_hand(critic, batch, target):
    """Member by member: the sum over critics of mean (Q_i - target)^2, and EDAC's diversity term, the mean over
    the batch of sum_{i != j} <g_i, g_j> / 2 for the unit action gradients g_i = dQ_i/da / |dQ_i/da|."""
    grads, regression = [], 0.0
    for i in range(critic.num_critics):
        a = batch["actions"].clone().requires_grad_(True)
        q = critic(batch["observations"], a)[i]
        regression = regression + ((q - target) ** 2).mean()
        g = torch.autograd.grad(q.sum(), a, create_graph=True)[0]
        grads.append(g / (g.norm(dim=-1, keepdim=True) + 1e-10))
    n = len(grads)
    return regression, sum((grads[i] * grads[j]).sum(-1) for i in range(n) for j in range(n) if i != j).mean() / 2


def test_pretrain_eta_weighs_the_diversity_term_of_critic_pretraining_only():
    """A critic pre-training step with --pretrain-eta 3 (and --eta 0.5) takes the gradient of regression + 3 x the
    diversity term, both worked out member by member; EDAC's own update is the same with or without the flag."""
    torch.manual_seed(0)
    args = edac.Args(num_critics=3, hidden_dim=16, eta=0.5, pretrain_eta=3.0, learning_rate=1e-3)
    learner = edac.make_learner(4, 2, 1.0, args, torch.device("cpu"))
    by_hand = copy.deepcopy(learner.critic)
    batch = {"observations": torch.randn(8, 4), "actions": torch.rand(8, 2) * 2 - 1,
             "next_observations": torch.randn(8, 4), "rewards": torch.randn(8), "terminations": torch.zeros(8)}
    returns, noise = torch.randn(8), torch.randn(8, 2)
    edac.critic_pretrain_step(learner, batch, returns, noise, args)

    regression, diversity = regression_and_diversity_by_hand(by_hand, batch, returns)
    (regression + 3.0 * diversity).backward()
    for mine, theirs in zip(learner.critic.parameters(), by_hand.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    assert "eta 0.5 (3 in pre-training)" in edac.schedule(dataclasses.replace(args, total_steps=10, pretrain_steps=4))

    after = []
    for pretrain_eta in (None, 3.0):
        torch.manual_seed(1)
        learner = edac.make_learner(4, 2, 1.0, args, torch.device("cpu"))
        edac.edac_step(learner, batch, noise, noise, dataclasses.replace(args, pretrain_eta=pretrain_eta))
        after.append([p.detach().clone() for p in learner.critic.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*after))


def test_critic_warmup_step_fits_the_critics_to_edacs_targets_and_holds_actor_and_temperature():
    """One --critic-warmup-steps step: the critics' gradient is that of regression onto
    r + gamma * (1 - done) * (min_i Q'_i(s', a') - alpha * log pi(a'|s')) plus eta x diversity, worked out member
    by member; the actor and the temperature do not move."""
    torch.manual_seed(0)
    args = edac.Args(num_critics=3, hidden_dim=16, eta=0.5, learning_rate=1e-3)
    learner = edac.make_learner(4, 2, 1.0, args, torch.device("cpu"))
    with torch.no_grad():
        learner.log_alpha.fill_(-1.0)
        for p in learner.target_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))  # target critics unlike the online ones
    critic, target_critic, actor = (copy.deepcopy(n) for n in (learner.critic, learner.target_critic, learner.actor))
    batch = {"observations": torch.randn(8, 4), "actions": torch.rand(8, 2) * 2 - 1,
             "next_observations": torch.randn(8, 4), "rewards": torch.randn(8),
             "terminations": torch.tensor([0.0, 1.0] * 4)}
    noise, next_noise = torch.randn(8, 2), torch.randn(8, 2)
    edac.critic_warmup_step(learner, batch, noise, next_noise, args)

    assert all(torch.equal(a, b) for a, b in zip(learner.actor.parameters(), actor.parameters()))
    assert learner.log_alpha.item() == -1.0
    with torch.no_grad():
        next_action, next_log_prob = actor(batch["next_observations"], next_noise)
        next_q = torch.stack([target_critic(batch["next_observations"], next_action)[i] for i in range(3)])
        target = batch["rewards"] + 0.99 * (1 - batch["terminations"]) * (
            next_q.min(0).values - math.exp(-1.0) * next_log_prob)
    regression, diversity = regression_and_diversity_by_hand(critic, batch, target)
    (regression + 0.5 * diversity).backward()
    for mine, theirs in zip(learner.critic.parameters(), critic.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_critic_warmup_steps_follow_pretraining_and_leave_the_actor_as_pretraining_left_it(tiny_dataset, tmp_path):
    """A run with 100 warm-up steps after 200 of pre-training ends with the same actor and temperature as the
    same run stopped at the hand-over, and with other critics."""
    common = ["--env-id", tiny_dataset, "--num-critics", 2, "--pretrain-steps", 200, "--eval-episodes", 0]
    warm = run_script("edac_pretrain.py", *common, "--total-steps", 300, "--critic-warmup-steps", 100,
                      "--run-name", "warm", cwd=tmp_path)
    assert warm.returncode == 0, warm.stderr
    assert "then a critic warm-up (100 steps), then EDAC" in warm.stdout + warm.stderr
    handover = run_script("edac_pretrain.py", *common, "--total-steps", 200, "--run-name", "handover", cwd=tmp_path)
    assert handover.returncode == 0, handover.stderr
    models = [torch.load(tmp_path / "runs" / name / "model.pt", weights_only=True) for name in ("warm", "handover")]
    assert all(torch.equal(models[0]["actor"][k], models[1]["actor"][k]) for k in models[1]["actor"])
    assert torch.equal(models[0]["log_alpha"], models[1]["log_alpha"])
    assert not all(torch.equal(models[0]["critic"][k], models[1]["critic"][k]) for k in models[1]["critic"])


def test_ensemble_spread_is_the_std_across_critics_where_the_actor_acts():
    """Critics that output constants 1, 2 and 4 everywhere disagree by std(1, 2, 4) on any action; an actor of
    fixed mean and tiny std acts near tanh(mean), whose distance from the data's actions is worked out by hand."""
    args = edac.Args(num_critics=3, hidden_dim=16)
    learner = edac.make_learner(4, 2, 1.0, args, torch.device("cpu"))
    with torch.no_grad():
        learner.critic.head.weight.zero_()
        learner.critic.head.bias.copy_(torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1))
        for head, value in ((learner.actor.mean, [0.5, -0.5]), (learner.actor.log_std, [-5.0, -5.0])):
            head.weight.zero_()
            head.bias.copy_(torch.tensor(value))
    states, actions = torch.randn(5, 4), torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.5, 0.5], [-0.2, 0.9], [0.1, 0.0]])
    spread = edac.ensemble_spread(learner, {"rewards": torch.zeros(5), "observations": states, "actions": actions})
    std = np.std([1.0, 2.0, 4.0], ddof=1)
    assert spread["ensemble/std_data_actions"].item() == pytest.approx(std, rel=1e-4)
    assert spread["ensemble/std_policy_actions"].item() == pytest.approx(std, rel=1e-4)
    policy = np.tanh([0.5, -0.5])  # the actor's samples lie within 0.01 of it (std e^-5)
    distance = np.mean([np.sqrt(np.mean((policy - a) ** 2)) for a in actions.numpy()])
    assert spread["ensemble/policy_distance"].item() == pytest.approx(distance, abs=0.01)


def flat(dataset):
    obs = np.concatenate([e.observations[:-1] for e in dataset.iterate_episodes()])
    actions = np.concatenate([e.actions for e in dataset.iterate_episodes()])
    return obs, actions


def test_soft_bc_raises_the_likelihood_of_dataset_actions(tiny_dataset, tmp_path):
    result = run_script("edac_pretrain.py", "--env-id", tiny_dataset, "--num-critics", 2, "--total-steps", 800,
                        "--pretrain-steps", 800, "--actor-pretrain-fraction", 1.0, "--eval-episodes", 0,
                        "--run-name", "softbc", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = torch.load(tmp_path / "runs" / "softbc" / "model.pt", weights_only=True)
    obs, actions = flat(minari.load_dataset(tiny_dataset))
    obs_t = torch.as_tensor((obs - model["obs_mean"].numpy()) / model["obs_std"].numpy(), dtype=torch.float32)
    actions_t = torch.as_tensor(actions)
    torch.manual_seed(0)  # the script seeds, then builds the actor first: this is its initial actor
    initial = edac.Actor(obs.shape[1], actions.shape[1], 1.0, 256, True)
    trained = edac.Actor(obs.shape[1], actions.shape[1], 1.0, 256, True)
    trained.load_state_dict(model["actor"])
    with torch.no_grad():
        before = initial.data_log_prob(*initial.distribution(obs_t), actions_t, 1.0).mean().item()
        after = trained.data_log_prob(*trained.distribution(obs_t), actions_t, 1.0).mean().item()
    assert after > before + 2.0, (before, after)
    assert model["log_alpha"].item() != 0.0  # the temperature was tuned


@pytest.mark.parametrize("script, extra_tags", [
    ("edac_pretrain.py", ["losses/diversity", "losses/alpha", "ensemble/std_policy_actions"]),
    ("edac_bc_pretrain.py", ["losses/diversity", "losses/alpha", "losses/bc", "ensemble/policy_distance"]),
    ("td3bc_cql_pretrain.py", ["losses/cql"]),
])
def test_script_runs_end_to_end(script, extra_tags, tiny_dataset, tmp_path):
    flags = (["--num-critics", 3] if script.startswith("edac") else []) + (
        ["--critic-bootstrap"] if script == "edac_bc_pretrain.py" else [])
    result = run_script(script, "--env-id", tiny_dataset, *flags, "--total-steps", 400, "--pretrain-steps", 200,
                        "--log-interval", 100, "--eval-interval", 200, "--eval-episodes", 2, "--lam", 0.2,
                        "--lambda-refresh-interval", 50, "--eval-protocol", "adroit", "--run-name", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logged = scalars(tmp_path / "runs" / "run")
    for tag in ["losses/pretrain_critic", "losses/critic", "losses/actor", "charts/SPS", *extra_tags]:
        assert tag in logged, tag
    assert [s for s, _ in logged["eval/normalized_score"]] == [200, 400]
    assert [s for s, _ in logged["losses/critic"]] == [300, 400]
    assert all(np.isfinite(v) for _, v in logged["losses/critic"])
    model = torch.load(tmp_path / "runs" / "run" / "model.pt", weights_only=True)
    assert model["args"]["eval_protocol"] == "adroit"


def test_cql_lowers_q_on_random_actions_relative_to_dataset_actions(tiny_dataset, tmp_path):
    """Same seed, same steps, with and without CQL: the gap Q(s, a_data) - Q(s, u_random) widens with CQL."""
    common = ["--env-id", tiny_dataset, "--total-steps", 600, "--pretrain-steps", 300, "--eval-episodes", 0]
    gaps = {}
    obs, actions = flat(minari.load_dataset(tiny_dataset))
    for script in ("td3bc_pretrain.py", "td3bc_cql_pretrain.py"):
        result = run_script(script, *common, "--run-name", script, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        model = torch.load(tmp_path / "runs" / script / "model.pt", weights_only=True)
        critic = load_script(script).Critic(obs.shape[1], actions.shape[1], 256, True)
        critic.load_state_dict(model["critic"])
        obs_t = torch.as_tensor((obs - model["obs_mean"].numpy()) / model["obs_std"].numpy(), dtype=torch.float32)
        random_actions = torch.rand(len(obs), actions.shape[1], generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            gaps[script] = (critic(obs_t, torch.as_tensor(actions)) - critic(obs_t, random_actions)).mean().item()
    assert gaps["td3bc_cql_pretrain.py"] > gaps["td3bc_pretrain.py"] + 1.0, gaps


@pytest.mark.parametrize("script, flags, expected", [
    ("edac_pretrain.py", dict(num_critics=0), "--num-critics must be at least 2"),
    ("edac_pretrain.py", dict(actor_pretrain_fraction=1.5), "--actor-pretrain-fraction must lie in [0, 1]"),
    ("edac_pretrain.py", dict(lam=-0.1), "--lam must lie in [0, 1]"),
    ("edac_pretrain.py", dict(pretrain_eta=-1.0), "--pretrain-eta must not be negative"),
    ("edac_bc_pretrain.py", dict(critic_warmup_steps=-1), "--critic-warmup-steps must not be negative"),
    ("edac_pretrain.py", dict(total_steps=100, pretrain_steps=50, critic_warmup_steps=51),
     "--critic-warmup-steps (51) does not fit: pre-training ends at step 50 of --total-steps 100"),
    ("edac_bc_pretrain.py", dict(bc_weight=-1.0), "--bc-weight must not be negative"),
    ("edac_bc_pretrain.py", dict(env_id="walker2d-full-replay-v2"), "Minari does not host"),
    ("td3bc_cql_pretrain.py", dict(cql_num_actions=0), "--cql-num-actions must be positive"),
    ("td3bc_cql_pretrain.py", dict(pretrain_steps=10, total_steps=5), "cannot exceed --total-steps"),
])
def test_bad_flags_are_refused(script, flags, expected, minari_path):
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(dataclasses.replace(module.Args(), **flags))
    assert expected in str(exit_info.value.code)


def test_per_dataset_defaults_follow_the_authors_table():
    assert edac.dataset_defaults("hopper", "medium")["num_critics"] == 50
    assert edac.dataset_defaults("halfcheetah", "expert")["eta"] == 5.0
    pen = edac.dataset_defaults("pen", "human")
    assert (pen["num_critics"], pen["eta"]) == (20, 1000.0)
    assert edac.dataset_defaults("walker2d", "medium")["pretrain_steps"] == 100_000
    assert math.isclose(load_script("td3bc_pretrain.py").dataset_defaults("walker2d", "medium-replay")["alpha"], 5.0)
