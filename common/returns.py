"""Returns-to-go for every transition of an offline dataset (pure NumPy).

These are the regression targets for pre-training critics (Jelley et al., 2024, arXiv 2406.13376).
Every function takes flat 1-D arrays over the dataset's transitions in episode order. An episode
ends at index t where ``terminations[t]`` or ``truncations[t]`` is true; the last index always ends
an episode and, if neither flag is set there, counts as truncated (the data simply stops).

At a *terminated* end nothing follows, so the return is the last reward. At a *truncated* end
(a time limit, or the end of the data) the episode would have gone on; with
``bootstrap_truncated=True`` we assume, as the paper's authors do, that the last reward repeats
forever, contributing r_T / (1 - gamma).
"""

import numpy as np


def _episode_ends(terminations, truncations):
    """Boolean mask of episode ends, and whether each end is a truncation (not a true terminal)."""
    terminations = np.asarray(terminations, dtype=bool)
    ends = terminations | np.asarray(truncations, dtype=bool)
    ends[-1] = True
    return ends, ends & ~terminations


def _backward_recursion(base, discount, ends):
    """Solve G_t = base_t + discount_t * G_{t+1} backwards inside each episode (G after an end is 0).

    Vectorised over episodes: step d of the loop handles every transition that lies d steps before
    its episode's end, so the loop runs (longest episode) times, not (dataset size) times.
    """
    end_idx = np.flatnonzero(ends)
    lengths = np.diff(np.concatenate(([-1], end_idx)))
    returns = np.empty(len(base), dtype=np.float64)
    returns[end_idx] = base[end_idx]
    for d in range(1, int(lengths.max())):
        idx = end_idx[lengths > d] - d
        returns[idx] = base[idx] + discount[idx] * returns[idx + 1]
    return returns


def mc_returns(rewards, terminations, truncations, gamma, bootstrap_truncated=True):
    """Monte-Carlo return-to-go.

    G_t = r_t + gamma * G_{t+1} inside an episode, and at its last step T:
      terminated:              G_T = r_T
      truncated (bootstrap):   G_T = r_T / (1 - gamma)
      truncated (no bootstrap): G_T = r_T
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    ends, truncated_ends = _episode_ends(terminations, truncations)
    base = rewards.copy()
    if bootstrap_truncated:
        base[truncated_ends] /= 1.0 - gamma
    discount = np.where(ends, 0.0, gamma)
    return _backward_recursion(base, discount, ends)


def soft_returns(rewards, next_entropies, terminations, truncations, gamma, alpha, bootstrap_truncated=True):
    """Soft (entropy-regularised) Monte-Carlo return-to-go, the target of a soft Q-function.

    It is the Monte-Carlo return of the soft reward
      r'_t = r_t + gamma * alpha * (1 - term_t) * H_{t+1},
    where next_entropies[t] = H_{t+1} = -log pi(a~ | s_{t+1}) with a~ ~ pi(.|s_{t+1}). Inside an
    episode this is G_t = sum_k gamma^k r_{t+k} + alpha * sum_{k>=1} gamma^k H_{t+k}, which matches
    Q(s, a) = r + gamma * E[Q(s', a') - alpha * log pi(a'|s')]. A truncated end repeats the last
    soft reward forever (G_T = r'_T / (1 - gamma)) when bootstrap_truncated.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    terminations = np.asarray(terminations, dtype=bool)
    soft_rewards = rewards + gamma * alpha * (~terminations) * np.asarray(next_entropies, dtype=np.float64)
    return mc_returns(soft_rewards, terminations, truncations, gamma, bootstrap_truncated)


def lambda_returns(rewards, next_values, terminations, truncations, gamma, lam, bootstrap_truncated=True):
    """Lambda-return in the paper's convention: lam = 0 is pure Monte-Carlo, lam = 1 is one-step TD.

      G_t = r_t + gamma * (1 - term_t) * [lam * V_{t+1} + (1 - lam) * G_{t+1}],
    with next_values[t] = V_{t+1} = V(s_{t+1}). After a truncated end, G_{T+1} is the Monte-Carlo tail
    r_T / (1 - gamma) (0 without bootstrap), so lam = 0 reproduces mc_returns exactly and lam = 1
    gives r_t + gamma * (1 - term_t) * V_{t+1} at every step. This is the textbook lambda-return with
    lambda_textbook = 1 - lam.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    next_values = np.asarray(next_values, dtype=np.float64)
    terminations = np.asarray(terminations, dtype=bool)
    ends, truncated_ends = _episode_ends(terminations, truncations)
    alive = ~terminations
    base = rewards + gamma * alive * lam * next_values
    if bootstrap_truncated:
        # r + gamma*lam*V + gamma*(1-lam)*r/(1-gamma), written so that lam = 0 gives mc_returns bit for bit
        tail = rewards[truncated_ends] / (1.0 - gamma)
        one_step = rewards[truncated_ends] + gamma * next_values[truncated_ends]
        base[truncated_ends] = lam * one_step + (1.0 - lam) * tail
    discount = np.where(ends, 0.0, gamma * (1.0 - lam) * alive)
    return _backward_recursion(base, discount, ends)
