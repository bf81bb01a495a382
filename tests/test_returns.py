"""common/returns.py against hand-worked episodes and brute-force sums over each step's future."""

import time

import numpy as np
import pytest

from common.returns import lambda_returns, mc_returns, soft_returns


# ---------------------------------------------------------------- hand-worked, gamma = 0.5
def test_mc_terminated_episode_by_hand():
    # G_2 = 3; G_1 = 2 + 0.5 * 3 = 3.5; G_0 = 1 + 0.5 * 3.5 = 2.75
    g = mc_returns([1, 2, 3], [0, 0, 1], [0, 0, 0], gamma=0.5)
    np.testing.assert_allclose(g, [2.75, 3.5, 3.0])


def test_mc_truncated_episode_repeats_last_reward_by_hand():
    # G_2 = 3 / (1 - 0.5) = 6; G_1 = 2 + 3 = 5; G_0 = 1 + 2.5 = 3.5
    g = mc_returns([1, 2, 3], [0, 0, 0], [0, 0, 1], gamma=0.5)
    np.testing.assert_allclose(g, [3.5, 5.0, 6.0])
    g = mc_returns([1, 2, 3], [0, 0, 0], [0, 0, 1], gamma=0.5, bootstrap_truncated=False)
    np.testing.assert_allclose(g, [2.75, 3.5, 3.0])


def test_mc_end_of_data_counts_as_truncated_and_episodes_do_not_leak():
    # Episode A = [1, 2] terminated; episode B = [4, 2] with no flag at the end of the data.
    g = mc_returns([1, 2, 4, 2], [0, 1, 0, 0], [0, 0, 0, 0], gamma=0.5)
    # A: G_1 = 2, G_0 = 1 + 1 = 2.  B: G_3 = 2 / 0.5 = 4, G_2 = 4 + 2 = 6.
    np.testing.assert_allclose(g, [2.0, 2.0, 6.0, 4.0])


def test_soft_returns_by_hand():
    # gamma = 0.5, alpha = 2, next entropies H = [1, 1, 5]; terminated at the last step.
    # Soft rewards: r'_0 = 1 + 0.5*2*1 = 2, r'_1 = 2 + 0.5*2*1 = 3, r'_2 = 3 (terminal: no bonus).
    g = soft_returns([1, 2, 3], [1, 1, 5], [0, 0, 1], [0, 0, 0], gamma=0.5, alpha=2.0)
    np.testing.assert_allclose(g, [2 + 0.5 * (3 + 0.5 * 3), 3 + 0.5 * 3, 3])
    # Truncated instead: r'_2 = 3 + 0.5*2*5 = 8 repeats forever -> 16.
    g = soft_returns([1, 2, 3], [1, 1, 5], [0, 0, 0], [0, 0, 1], gamma=0.5, alpha=2.0)
    np.testing.assert_allclose(g, [2 + 0.5 * (3 + 0.5 * 16), 3 + 0.5 * 16, 16])


def test_lambda_returns_by_hand():
    # gamma = 0.5, lam = 0.5, V(s_{t+1}) = [10, 20, 30], terminated at the end.
    # G_2 = 3; G_1 = 2 + 0.5 * (0.5*20 + 0.5*3) = 7.75; G_0 = 1 + 0.5 * (0.5*10 + 0.5*7.75) = 5.4375
    g = lambda_returns([1, 2, 3], [10, 20, 30], [0, 0, 1], [0, 0, 0], gamma=0.5, lam=0.5)
    np.testing.assert_allclose(g, [5.4375, 7.75, 3.0])
    # Truncated: G_2 = 3 + 0.5 * (0.5*30 + 0.5*6) = 12
    g = lambda_returns([1, 2, 3], [10, 20, 30], [0, 0, 0], [0, 0, 1], gamma=0.5, lam=0.5)
    g2 = 12.0
    g1 = 2 + 0.5 * (0.5 * 20 + 0.5 * g2)
    np.testing.assert_allclose(g, [1 + 0.5 * (0.5 * 10 + 0.5 * g1), g1, g2])


# ---------------------------------------------------------------- brute force on random data
def random_dataset(rng, n=300):
    rewards = rng.normal(size=n)
    terminations = rng.random(n) < 0.03
    truncations = (rng.random(n) < 0.03) & ~terminations
    return rewards, terminations, truncations


def episode_end(t, terminations, truncations):
    """First index >= t that ends an episode, found by walking forward."""
    while t < len(terminations) - 1 and not (terminations[t] or truncations[t]):
        t += 1
    return t


def brute_mc(rewards, term, trunc, gamma, bootstrap=True):
    out = []
    for t in range(len(rewards)):
        end = episode_end(t, term, trunc)
        g = sum(gamma ** (k - t) * rewards[k] for k in range(t, end + 1))
        if bootstrap and not term[end]:
            # the last reward repeats forever: gamma^(end-t) * r_end * (gamma + gamma^2 + ...)
            g += gamma ** (end - t) * rewards[end] * gamma / (1 - gamma)
        out.append(g)
    return np.array(out)


def brute_soft(rewards, next_ent, term, trunc, gamma, alpha, bootstrap=True):
    # G_t = sum_k gamma^k r_{t+k} + alpha * sum_{k>=1} gamma^k H_{t+k}, H_{t+k} = next_ent[t+k-1].
    out = []
    for t in range(len(rewards)):
        end = episode_end(t, term, trunc)
        g = sum(gamma ** (k - t) * rewards[k] for k in range(t, end + 1))
        g += alpha * sum(gamma ** k * next_ent[t + k - 1] for k in range(1, end - t + 1))
        if not term[end]:
            g += alpha * gamma ** (end - t + 1) * next_ent[end]  # entropy at the state after truncation
            if bootstrap:
                last_soft_reward = rewards[end] + gamma * alpha * next_ent[end]
                g += gamma ** (end - t) * last_soft_reward * gamma / (1 - gamma)
        out.append(g)
    return np.array(out)


def brute_lambda(rewards, next_values, term, trunc, gamma, lam, bootstrap=True):
    """Weighted sum of n-step returns: sum_n lam (1-lam)^(n-1) G^(n), the rest on the full tail."""
    out = []
    for t in range(len(rewards)):
        end = episode_end(t, term, trunc)
        horizon = end - t + 1  # steps until the episode ends
        g, weight_left = 0.0, 1.0
        for n in range(1, horizon + 1):
            n_step = sum(gamma ** k * rewards[t + k] for k in range(n))
            if not term[t + n - 1]:
                n_step += gamma ** n * next_values[t + n - 1]
            g += lam * (1 - lam) ** (n - 1) * n_step
            weight_left -= lam * (1 - lam) ** (n - 1)
        # Remaining weight (1-lam)^horizon goes to the full return with the Monte-Carlo tail.
        tail = sum(gamma ** k * rewards[t + k] for k in range(horizon))
        if not term[end]:
            if bootstrap:
                tail += gamma ** horizon * rewards[end] / (1 - gamma)
            g += weight_left * tail
        else:
            # After a terminal the bracket is multiplied by 0: the full return is also the n-step one.
            g += weight_left * tail
        out.append(g)
    return np.array(out)


@pytest.mark.parametrize("bootstrap", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mc_matches_brute_force(seed, bootstrap):
    rng = np.random.default_rng(seed)
    r, te, tr = random_dataset(rng)
    np.testing.assert_allclose(mc_returns(r, te, tr, 0.9, bootstrap), brute_mc(r, te, tr, 0.9, bootstrap), rtol=1e-10)


@pytest.mark.parametrize("bootstrap", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_soft_matches_brute_force(seed, bootstrap):
    rng = np.random.default_rng(seed)
    r, te, tr = random_dataset(rng)
    h = rng.normal(size=len(r))
    got = soft_returns(r, h, te, tr, 0.9, 0.3, bootstrap)
    np.testing.assert_allclose(got, brute_soft(r, h, te, tr, 0.9, 0.3, bootstrap), rtol=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("bootstrap", [True, False])
def test_lambda_matches_brute_force(lam, bootstrap):
    rng = np.random.default_rng(3)
    r, te, tr = random_dataset(rng, n=200)
    v = rng.normal(size=len(r)) * 5
    got = lambda_returns(r, v, te, tr, 0.9, lam, bootstrap)
    np.testing.assert_allclose(got, brute_lambda(r, v, te, tr, 0.9, lam, bootstrap), rtol=1e-9, atol=1e-9)


def test_lambda_endpoints():
    rng = np.random.default_rng(4)
    r, te, tr = random_dataset(rng)
    v = rng.normal(size=len(r))
    np.testing.assert_array_equal(lambda_returns(r, v, te, tr, 0.99, 0.0), mc_returns(r, te, tr, 0.99))
    one_step = r + 0.99 * (~te) * v
    np.testing.assert_allclose(lambda_returns(r, v, te, tr, 0.99, 1.0), one_step)


@pytest.mark.parametrize("c", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_lambda_returns_inherit_the_level_of_the_values(c, lam):
    """Far from an episode's end, with constant rewards and V = c * G (the Monte-Carlo return), the
    lambda-return is G_l = r + gamma * [lam * c * G + (1 - lam) * G_l]; with G = r / (1 - gamma) that is
    G_l / G = 1 - gamma * lam * (1 - c) / (1 - gamma * (1 - lam)): about c for any lam >= 0.1 at gamma 0.99,
    which is why lambda-returns need critics at the scale of the returns (the scripts' --lambda-refresh-interval)."""
    gamma, n = 0.99, 5000
    r, te, tr = np.full(n, 2.0), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    tr[-1] = True
    mc = mc_returns(r, te, tr, gamma)
    assert mc[0] == pytest.approx(2.0 / (1 - gamma))  # the truncated tail repeats the last reward
    ratio = lambda_returns(r, c * mc, te, tr, gamma, lam)[:100] / mc[:100]
    np.testing.assert_allclose(ratio, 1 - gamma * lam * (1 - c) / (1 - gamma * (1 - lam)), rtol=1e-9)


def test_one_million_transitions_in_well_under_a_second():
    rng = np.random.default_rng(5)
    n = 1_000_000
    r = rng.normal(size=n)
    te = np.zeros(n, bool)
    tr = np.zeros(n, bool)
    tr[999::1000] = True  # 1000 episodes of 1000 steps
    te[rng.choice(n, 500, replace=False)] = True
    v = rng.normal(size=n)
    start = time.perf_counter()
    mc_returns(r, te, tr, 0.99)
    lambda_returns(r, v, te, tr, 0.99, 0.3)
    assert time.perf_counter() - start < 1.0
