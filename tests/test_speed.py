"""The fast paths compute what the plain one does: bf16 hidden layers with fp32 heads, and --compile."""

from dataclasses import replace

import pytest
import torch

from conftest import load_script


def batch_of(size=64, obs_dim=11, act_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(size, obs_dim, generator=g),
            "actions": torch.rand(size, act_dim, generator=g) * 2 - 1,
            "rewards": torch.randn(size, generator=g), "next_observations": torch.randn(size, obs_dim, generator=g),
            "terminations": (torch.rand(size, generator=g) < 0.1).float(), "truncations": torch.zeros(size)}


@pytest.mark.parametrize("script", ["td3bc_pretrain.py", "edac_pretrain.py"])
def test_bf16_keeps_heads_and_outputs_in_fp32(script):
    module = load_script(script)
    extra = dict(num_critics=3, eta=1.0) if script.startswith("edac") else dict(alpha=2.5)
    learners = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        args = replace(module.Args(), precision=precision, hidden_dim=64, **extra)
        learners[precision] = module.make_learner(11, 3, 1.0, args, "cpu")
    batch = batch_of()
    q32, q16 = (learners[p].critic(batch["observations"], batch["actions"]) for p in ("fp32", "bf16"))
    assert q16.dtype == torch.float32 and learners["bf16"].critic.head.weight.dtype == torch.float32
    assert not torch.equal(q32, q16)  # the hidden matmuls did run in bf16 ...
    torch.testing.assert_close(q16, q32, rtol=0.05, atol=0.05)  # ... to bf16's precision


@pytest.mark.parametrize("script", ["td3bc_pretrain.py", "edac_pretrain.py"])
def test_compiled_updates_match_eager_ones(script):
    """--compile on a CPU (torch.compile of the networks): the same losses and weights, to float tolerance."""
    module = load_script(script)
    edac = script.startswith("edac")
    extra = dict(num_critics=3, eta=1.0) if edac else dict(alpha=2.5)
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        args = replace(module.Args(), compile=compiled, hidden_dim=64, **extra)
        learner = module.make_learner(11, 3, 1.0, args, torch.device("cpu"))
        steps = [module.soft_bc_step, module.edac_step] if edac else [module.pretrain_step, module.td3bc_step]
        first, second = module.speed_up(steps, learner, torch.device("cpu"), args)
        losses = []
        for i in range(4):
            batch, noise = batch_of(seed=i), torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(i))
            if edac:
                metrics = first(learner, batch, noise[0], args) if i < 2 else second(learner, batch, *noise, args)
            else:
                metrics = first(learner, batch, batch["rewards"], args) if i < 2 else \
                    second(learner, batch, noise[0], i % 2 == 0, args)
            losses.append({k: v.item() for k, v in metrics.items()})
        runs[compiled] = learner, losses
    (eager, eager_losses), (fast, fast_losses) = runs[False], runs[True]
    for a, b in zip(eager_losses, fast_losses):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    for a, b in zip(eager.actor.parameters(), fast.actor.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
