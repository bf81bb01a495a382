"""Gradient steps per second of each script's RL update, beside a plain reference update, in one run.

The plain reference is written the way most PyTorch offline-RL code is (CORL's single-file scripts, for
instance): one optimiser per network, a Python loop over parameters for Polyak averaging, batch
indices sampled on the host, `.item()` on every loss every step, and for EDAC a second critic forward
pass for the diversity term. Both use the same architecture (width 256, LayerNorm) and batch 256 on
Hopper-sized data (11-dim observations, 3-dim actions, 1M transitions). Also reported: the FLOPs of one
update (matmul FLOPs, counted by torch's profiler) and this machine's measured matmul rate on the update's
own shapes, so the table shows what fraction of the compute limit each update reaches.

    python benchmark_results/throughput.py                 # writes benchmark_results/throughput.md
    python benchmark_results/throughput.py --steps 300 --output -   # quick look, print only
"""

import copy
import importlib.util
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

ROOT = Path(__file__).resolve().parent.parent
OBS_DIM, ACT_DIM, NUM_TRANSITIONS = 11, 3, 1_000_000


@dataclass
class Args:
    steps: int = 1000
    """timed update steps per measurement (after warm-up)"""
    repeats: int = 3
    """measurements per update; the best is reported"""
    edac_critics: int = 10
    """ensemble size N for the EDAC updates"""
    device: str = "auto"
    """torch device: auto picks cuda when available"""
    output: str = str(ROOT / "benchmark_results" / "throughput.md")
    """markdown file to write ('-' prints only)"""


def load(script):
    spec = importlib.util.spec_from_file_location(script, ROOT / "algos" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[script] = module  # torch.compile looks modules up by name
    spec.loader.exec_module(module)
    return module


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------- plain reference updates
def plain_mlp(in_dim, out_dim, depth, final_tanh=False):
    layers, dim = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(dim, 256), nn.LayerNorm(256, elementwise_affine=False), nn.ReLU()]
        dim = 256
    return nn.Sequential(*layers, nn.Linear(dim, out_dim), *([nn.Tanh()] if final_tanh else []))


def plain_soft_update(target, source, tau):
    for target_param, source_param in zip(target.parameters(), source.parameters()):
        target_param.data.copy_((1 - tau) * target_param.data + tau * source_param.data)


class PlainTD3BC:
    """TD3+BC as it is usually written: two critic modules, three optimisers, host-side sampling."""

    def __init__(self, data, device, cql=False):
        self.data, self.device, self.cql, self.step = data, device, cql, 0
        self.actor = plain_mlp(OBS_DIM, ACT_DIM, 3, final_tanh=True).to(device)
        self.critic_1 = plain_mlp(OBS_DIM + ACT_DIM, 1, 2).to(device)
        self.critic_2 = plain_mlp(OBS_DIM + ACT_DIM, 1, 2).to(device)
        self.actor_target, self.critic_1_target, self.critic_2_target = map(copy.deepcopy, (self.actor, self.critic_1, self.critic_2))
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=3e-4)
        self.critic_1_opt = torch.optim.Adam(self.critic_1.parameters(), lr=3e-4)
        self.critic_2_opt = torch.optim.Adam(self.critic_2.parameters(), lr=3e-4)

    def update(self):
        idx = np.random.randint(0, NUM_TRANSITIONS, size=256)
        obs, act, rew, next_obs, done = (self.data[k][idx] for k in ("observations", "actions", "rewards", "next_observations", "terminations"))
        log = {}
        with torch.no_grad():
            noise = (torch.randn_like(act) * 0.2).clamp(-0.5, 0.5)
            next_act = (self.actor_target(next_obs) + noise).clamp(-1, 1)
            sa = torch.cat([next_obs, next_act], 1)
            target_q = torch.min(self.critic_1_target(sa), self.critic_2_target(sa)).squeeze(-1)
            target_q = rew + 0.99 * (1 - done) * target_q
        sa = torch.cat([obs, act], 1)
        q1, q2 = self.critic_1(sa).squeeze(-1), self.critic_2(sa).squeeze(-1)
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        if self.cql:
            random_act = torch.rand(10, 256, ACT_DIM, device=self.device) * 2 - 1
            rep_obs = obs.repeat(10, 1)
            cql = 0.0
            for critic, q in ((self.critic_1, q1), (self.critic_2, q2)):
                q_rand = critic(torch.cat([rep_obs, random_act.reshape(-1, ACT_DIM)], 1)).reshape(10, 256)
                cql = cql + torch.logsumexp(q_rand, 0).mean() - q.mean()
            critic_loss = critic_loss / critic_loss.detach().abs() + cql / cql.detach().abs()
            log["cql"] = cql.item()
        log["critic_loss"] = critic_loss.item()
        self.critic_1_opt.zero_grad()
        self.critic_2_opt.zero_grad()
        critic_loss.backward()
        self.critic_1_opt.step()
        self.critic_2_opt.step()
        if self.step % 2 == 0:
            pi = self.actor(obs)
            q = self.critic_1(torch.cat([obs, pi], 1))
            actor_loss = -(2.5 / q.abs().mean().detach()) * q.mean() + F.mse_loss(pi, act)
            log["actor_loss"] = actor_loss.item()
            self.actor_opt.zero_grad()
            actor_loss.backward()
            self.actor_opt.step()
            plain_soft_update(self.critic_1_target, self.critic_1, 0.005)
            plain_soft_update(self.critic_2_target, self.critic_2, 0.005)
            plain_soft_update(self.actor_target, self.actor, 0.005)
        self.step += 1
        return log


class PlainEDAC:
    """EDAC as it is usually written: a vectorised ensemble, but the diversity term from a second forward
    pass on repeated inputs, a Python-loop soft update, host-side sampling and `.item()` every step."""

    def __init__(self, data, device, edac, num_critics, bc=False):
        self.data, self.device, self.bc, self.num_critics = data, device, bc, num_critics
        self.actor = edac.Actor(OBS_DIM, ACT_DIM, 1.0, 256, True).to(device)
        self.critic = edac.Critic(OBS_DIM, ACT_DIM, 256, True, num_critics).to(device)
        self.target_critic = copy.deepcopy(self.critic)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=3e-4)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=3e-4)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=3e-4)

    def diversity(self, obs, act):
        n = self.num_critics
        obs = obs.unsqueeze(0).repeat_interleave(n, 0)
        act = act.unsqueeze(0).repeat_interleave(n, 0).requires_grad_(True)
        q = self.critic(obs, act)
        grad = torch.autograd.grad(q.sum(), act, retain_graph=True, create_graph=True)[0]
        grad = grad / (grad.norm(p=2, dim=2).unsqueeze(-1) + 1e-10)
        grad = grad.transpose(0, 1)
        masks = torch.eye(n, device=self.device).unsqueeze(0).repeat(grad.shape[0], 1, 1)
        grad = (1 - masks) * (grad @ grad.permute(0, 2, 1))
        return grad.sum(dim=(1, 2)).mean() / (n - 1)

    def update(self):
        idx = np.random.randint(0, NUM_TRANSITIONS, size=256)
        obs, act, rew, next_obs, done = (self.data[k][idx] for k in ("observations", "actions", "rewards", "next_observations", "terminations"))
        pi, log_prob = self.actor(obs, torch.randn(256, ACT_DIM, device=self.device))
        alpha_loss = (-self.log_alpha * (log_prob.detach() - ACT_DIM)).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        alpha = self.log_alpha.exp().detach()
        actor_loss = (alpha * log_prob - self.critic(obs, pi).min(0).values).mean()
        if self.bc:
            bc = F.mse_loss(pi, act)
            actor_loss = actor_loss / actor_loss.detach().abs() + bc / bc.detach()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            next_act, next_log_prob = self.actor(next_obs, torch.randn(256, ACT_DIM, device=self.device))
            q_next = self.target_critic(next_obs, next_act).min(0).values - alpha * next_log_prob
            target_q = rew + 0.99 * (1 - done) * q_next
        q = self.critic(obs, act)
        critic_loss = ((q - target_q) ** 2).mean(1).sum() + 1.0 * self.diversity(obs, act)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        plain_soft_update(self.target_critic, self.critic, 0.005)
        return {"alpha_loss": alpha_loss.item(), "actor_loss": actor_loss.item(), "critic_loss": critic_loss.item(),
                "alpha": alpha.item()}


# ------------------------------------------------------------------------------- this project's updates
def project_td3bc(module, data, device, cql):
    """The RL-phase loop body of td3bc_pretrain.py (or td3bc_cql_pretrain.py), as the script runs it."""
    args = replace(module.Args(), alpha=2.5)
    actor = module.Actor(OBS_DIM, ACT_DIM, 1.0, 256, True).to(device)
    critic = module.Critic(OBS_DIM, ACT_DIM, 256, True).to(device)
    target_actor, target_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=3e-4, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=3e-4, fused=True)
    sampler = torch.Generator(device=device).manual_seed(0)
    loss_log = module.LossLog(["critic", "cql", "actor"], 1000, device, 0)
    state = {"step": 0}

    def update():
        step = state["step"]
        idx = torch.randint(NUM_TRANSITIONS, (256,), device=device, generator=sampler)
        batch = {k: v[idx] for k, v in data.items()}
        noise = torch.randn(batch["actions"].shape, device=device, generator=sampler)
        update_actor = step % 2 == 0
        if cql:
            random_actions = 2 * torch.rand(10, 256, ACT_DIM, device=device, generator=sampler) - 1
            losses = module.td3bc_step(batch, actor, critic, target_actor, target_critic, actor_opt, critic_opt, update_actor, noise, random_actions, args)
        else:
            losses = module.td3bc_step(batch, actor, critic, target_actor, target_critic, actor_opt, critic_opt, update_actor, noise, args)
        if update_actor:
            module.polyak_update(actor, target_actor, 0.005)
            module.polyak_update(critic, target_critic, 0.005)
        loss_log.add(step, losses)
        state["step"] += 1

    return update


def project_edac(module, data, device, num_critics):
    """The RL-phase loop body of edac_pretrain.py (or edac_bc_pretrain.py), as the script runs it."""
    args = replace(module.Args(), num_critics=num_critics, eta=1.0)
    actor = module.Actor(OBS_DIM, ACT_DIM, 1.0, 256, True).to(device)
    critic = module.Critic(OBS_DIM, ACT_DIM, 256, True, num_critics).to(device)
    target_critic = copy.deepcopy(critic)
    log_alpha = torch.zeros((), device=device, requires_grad=True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=3e-4, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=3e-4, fused=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=3e-4, fused=True)
    sampler = torch.Generator(device=device).manual_seed(0)
    loss_log = module.LossLog(["critic", "diversity", "actor", "bc", "alpha"], 1000, device, 0)
    state = {"step": 0}

    def update():
        idx = torch.randint(NUM_TRANSITIONS, (256,), device=device, generator=sampler)
        batch = {k: v[idx] for k, v in data.items()}
        noise, next_noise = torch.randn(2, 256, ACT_DIM, device=device, generator=sampler)
        losses = module.edac_step(batch, noise, next_noise, actor, critic, target_critic, log_alpha, actor_opt,
                                  critic_opt, alpha_opt, -float(ACT_DIM), args)
        module.polyak_update(critic, target_critic, 0.005)
        loss_log.add(state["step"], losses)
        state["step"] += 1

    return update


# ------------------------------------------------------------------------------- measuring
def steps_per_second(update, steps, repeats, device):
    for _ in range(20):  # warm-up: allocator, optimiser state, lazy initialisation
        update()
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            update()
        synchronize(device)
        best = max(best, steps / (time.perf_counter() - start))
    return best


def flops_per_update(update):
    """Matmul FLOPs of one update, forward and backward, as torch's profiler counts them."""
    with torch.profiler.profile(with_flops=True) as profile:
        update()
    return sum(event.flops for event in profile.key_averages())


def top_operators(update, count=6):
    """Where one update's time goes: the operators with the most self time over 20 updates."""
    with torch.profiler.profile() as profile:
        for _ in range(20):
            update()
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:count])


def matmul_rate(device, num_critics):
    """Achievable FLOP/s on the update's own matmul shapes (batch 256 x width 256), best of three."""
    a, b = torch.randn(num_critics, 256, 256, device=device), torch.randn(num_critics, 256, 256, device=device)
    for _ in range(10):
        torch.bmm(a, b)
    best = 0.0
    for _ in range(3):
        synchronize(device)
        start, count = time.perf_counter(), 200
        for _ in range(count):
            torch.bmm(a, b)
        synchronize(device)
        best = max(best, count * 2 * num_critics * 256 ** 3 / (time.perf_counter() - start))
    return best


def main(args: Args) -> None:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    np.random.seed(0)
    data = {
        "observations": torch.randn(NUM_TRANSITIONS, OBS_DIM, device=device),
        "actions": torch.rand(NUM_TRANSITIONS, ACT_DIM, device=device) * 2 - 1,
        "rewards": torch.randn(NUM_TRANSITIONS, device=device),
        "next_observations": torch.randn(NUM_TRANSITIONS, OBS_DIM, device=device),
        "terminations": (torch.rand(NUM_TRANSITIONS, device=device) < 0.001).float(),
        "truncations": torch.zeros(NUM_TRANSITIONS, device=device),
    }
    td3bc, td3bc_cql, edac, edac_bc = (load(s) for s in ("td3bc_pretrain", "td3bc_cql_pretrain", "edac_pretrain", "edac_bc_pretrain"))
    n = args.edac_critics
    cases = [
        ("td3bc_pretrain.py", project_td3bc(td3bc, data, device, cql=False), PlainTD3BC(data, device).update, 2),
        ("td3bc_cql_pretrain.py", project_td3bc(td3bc_cql, data, device, cql=True), PlainTD3BC(data, device, cql=True).update, 2),
        (f"edac_pretrain.py (N={n})", project_edac(edac, data, device, n), PlainEDAC(data, device, edac, n).update, n),
        (f"edac_bc_pretrain.py (N={n})", project_edac(edac_bc, data, device, n), PlainEDAC(data, device, edac, n, bc=True).update, n),
    ]
    rows, profiles = [], []
    for name, ours, plain, ensemble in cases:
        flops = flops_per_update(ours)
        rate = matmul_rate(device, ensemble)
        ours_sps = steps_per_second(ours, args.steps, args.repeats, device)
        plain_sps = steps_per_second(plain, args.steps, args.repeats, device)
        limit_sps = rate / flops
        rows.append(f"| {name} | {ours_sps:.0f} | {plain_sps:.0f} | {ours_sps / plain_sps:.2f}x | {flops / 1e6:.1f} | "
                    f"{rate / 1e9:.0f} | {limit_sps:.0f} | {100 * ours_sps / limit_sps:.0f}% |")
        print(rows[-1], flush=True)
        profiles.append(f"- {name}: {top_operators(ours)}")

    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    table = "\n".join([
        f"Device: {hardware}; torch {torch.__version__}; batch 256, width 256, LayerNorm, Hopper-sized data "
        f"({NUM_TRANSITIONS:,} transitions, obs {OBS_DIM}, action {ACT_DIM}); best of {args.repeats} x {args.steps} steps.",
        "",
        "| update | ours (steps/s) | plain reference (steps/s) | speed-up | MFLOP per update | matmul rate (GFLOP/s) | matmul limit (steps/s) | of limit |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Where the time of our updates goes (share of CPU self time, torch profiler, 20 updates):",
        "",
        *profiles,
    ])
    if args.output != "-":
        Path(args.output).write_text(f"# Update throughput\n\nMade by `python benchmark_results/throughput.py`.\n\n{table}\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args))
