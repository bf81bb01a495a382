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
import math
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
    compile: bool = False
    """also measure each update with the networks compiled (torch.compile; CUDA graphs on GPUs)"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    only: tuple[str, ...] = ()
    """measure only these scripts (e.g. td3bc_pretrain)"""
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
        self.actor_target, self.critic_1_target, self.critic_2_target = map(copy.deepcopy, (self.actor, self.critic_1,
                                                                                            self.critic_2))
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=3e-4)
        self.critic_1_opt = torch.optim.Adam(self.critic_1.parameters(), lr=3e-4)
        self.critic_2_opt = torch.optim.Adam(self.critic_2.parameters(), lr=3e-4)

    def update(self):
        idx = np.random.randint(0, NUM_TRANSITIONS, size=256)
        obs, act, rew, next_obs, done = (self.data[k][idx] for k in ("observations", "actions", "rewards",
                                                                     "next_observations", "terminations"))
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


class FrozenVectorizedLinear(nn.Module):
    def __init__(self, in_dim, out_dim, ensemble_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_dim))
        nn.init.uniform_(self.weight, -1 / in_dim ** 0.5, 1 / in_dim ** 0.5)
        nn.init.uniform_(self.bias, -1 / in_dim ** 0.5, 1 / in_dim ** 0.5)

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class FrozenEnsembleCritic(nn.Module):
    """The plain EDAC reference's critics: edac_pretrain.py's ensemble as it was when this reference was
    written (3 hidden layers, LayerNorm, one batched matmul per layer), frozen so the reference stays put."""

    def __init__(self, num_critics):
        super().__init__()
        layers, dim = [], OBS_DIM + ACT_DIM
        for _ in range(3):
            layers += [FrozenVectorizedLinear(dim, 256, num_critics), nn.LayerNorm(256, elementwise_affine=False),
                       nn.ReLU()]
            dim = 256
        self.net = nn.Sequential(*layers, FrozenVectorizedLinear(256, 1, num_critics))
        self.num_critics = num_critics

    def forward(self, obs, action):
        obs = obs.expand(self.num_critics, *obs.shape[-2:])
        action = action.expand(self.num_critics, *action.shape[-2:])
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


class FrozenTanhGaussianActor(nn.Module):
    """The plain EDAC reference's actor: edac_pretrain.py's as it was when this reference was written."""

    def __init__(self):
        super().__init__()
        layers, dim = [], OBS_DIM
        for _ in range(3):
            layers += [nn.Linear(dim, 256), nn.LayerNorm(256, elementwise_affine=False), nn.ReLU()]
            dim = 256
        self.trunk = nn.Sequential(*layers)
        self.mean, self.log_std = nn.Linear(256, ACT_DIM), nn.Linear(256, ACT_DIM)

    def forward(self, obs, noise):
        h = self.trunk(obs)
        mean, log_std = self.mean(h), self.log_std(h).clamp(-5.0, 2.0)
        pre_tanh = mean + log_std.exp() * noise
        gaussian = (-0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_det = (2 * (math.log(2) - pre_tanh - F.softplus(-2 * pre_tanh))).sum(-1)
        return torch.tanh(pre_tanh), gaussian - log_det


class PlainEDAC:
    """EDAC as it is usually written (CORL's, for instance): a vectorised ensemble, but the diversity term
    from a second forward pass on repeated inputs, a Python-loop soft update, host-side sampling and
    `.item()` every step."""

    def __init__(self, data, device, num_critics, bc=False):
        self.data, self.device, self.bc, self.num_critics = data, device, bc, num_critics
        self.actor = FrozenTanhGaussianActor().to(device)
        self.critic = FrozenEnsembleCritic(num_critics).to(device)
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
        obs, act, rew, next_obs, done = (self.data[k][idx] for k in ("observations", "actions", "rewards",
                                                                     "next_observations", "terminations"))
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
def project_update(module, data, device, precision, compile_networks, num_critics=None):
    """The RL-phase loop body of one of the scripts, as the script runs it: sampling on the device, the
    update (targets included) and the metrics summed on the device."""
    edac = hasattr(module, "edac_step")
    extra = dict(num_critics=num_critics, eta=1.0) if edac else dict(alpha=2.5)
    args = replace(module.Args(), precision=precision, compile=compile_networks, **extra)
    torch.manual_seed(0)
    learner = module.make_learner(OBS_DIM, ACT_DIM, 1.0, args, device)
    # As the scripts do with --compile: CUDA graphs on a GPU, compiled networks elsewhere.
    step, = module.speed_up([module.edac_step if edac else module.td3bc_step], learner, device, args)
    sampler = torch.Generator(device=device).manual_seed(0)
    sums = {}  # the metrics summed on the device, as the scripts' Run.log does between writes
    cql = hasattr(module, "cql_regulariser")
    state = {"step": 0}

    def update():
        idx = torch.randint(NUM_TRANSITIONS, (256,), device=device, generator=sampler)
        batch = {k: v[idx] for k, v in data.items()}
        if cql:
            batch["random_actions"] = 2 * torch.rand(10, 256, ACT_DIM, device=device, generator=sampler) - 1
        if edac:
            noise, next_noise = torch.randn(2, 256, ACT_DIM, device=device, generator=sampler)
            metrics = step(learner, batch, noise, next_noise, args)
        else:
            noise = torch.randn(256, ACT_DIM, device=device, generator=sampler)
            metrics = step(learner, batch, noise, state["step"] % 2 == 0, args)
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        state["step"] += 1

    update.learner = learner
    return update


def compiled_matches_eager(module, data, device, precision, num_critics, steps=100):
    """Largest difference between any weight after `steps` identical updates, compiled vs eager."""
    eager, compiled = (project_update(module, data, device, precision, c, num_critics) for c in (False, True))
    for _ in range(steps):
        eager()
        compiled()
    return max((a - b).abs().max().item() for a, b in zip(eager.learner.actor.parameters(),
                                                           compiled.learner.actor.parameters()))


# ------------------------------------------------------------------------------- measuring
def steps_per_second(updates, steps, repeats, device):
    """Best rate of each update over `repeats` rounds; the updates take turns within a round, so that a slow
    spell of a shared machine does not fall on one of them alone."""
    for update in updates:
        for _ in range(20):  # warm-up: allocator, optimiser state, lazy initialisation, compilation
            update()
    best = [0.0] * len(updates)
    for _ in range(repeats):
        for i, update in enumerate(updates):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                update()
            synchronize(device)
            best[i] = max(best[i], steps / (time.perf_counter() - start))
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


def matmul_rate(device, num_critics, dtype):
    """Achievable FLOP/s on the update's own matmul shapes (batch 256 x width 256), best of three."""
    a = torch.randn(num_critics, 256, 256, device=device, dtype=dtype)
    b = torch.randn(num_critics, 256, 256, device=device, dtype=dtype)
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


def fast_bf16(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return capabilities.get("avx512_bf16", False) or capabilities.get("amx_bf16", False)


def main(args: Args) -> None:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    n = args.edac_critics
    scripts = [("td3bc_pretrain", 2, lambda: PlainTD3BC(data, device).update),
               ("td3bc_cql_pretrain", 2, lambda: PlainTD3BC(data, device, cql=True).update),
               ("edac_pretrain", n, lambda: PlainEDAC(data, device, n).update),
               ("edac_bc_pretrain", n, lambda: PlainEDAC(data, device, n, bc=True).update)]
    precisions = ["fp32", "bf16"] if fast_bf16(device) else ["fp32"]
    compiles = [False, True] if args.compile else [False]
    rows, profiles = [], []
    for script, ensemble, plain in scripts:
        if args.only and script not in args.only:
            continue
        module = load(script)
        name = f"{script}.py" + (f" (N={n})" if script.startswith("edac") else "")
        flops = flops_per_update(project_update(module, data, device, "fp32", False, n))
        rates = {p: matmul_rate(device, ensemble, torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
        configs, updates = [], [plain()]
        for precision in precisions:
            for compiled in compiles:
                try:
                    update = project_update(module, data, device, precision, compiled, n)
                    update()  # compiles now, so that a configuration this machine cannot run fails here
                    configs.append((precision, compiled))
                    updates.append(update)
                except Exception as e:  # say so and go on
                    print(f"{name} {precision} compile={compiled}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    rows.append(f"| {name} | {precision} | {'yes' if compiled else 'no'} | failed: "
                                f"{type(e).__name__} | | | | | |")
        plain_sps, *rates_sps = steps_per_second(updates, args.steps, args.repeats, device)
        for (precision, compiled), sps in zip(configs, rates_sps):
            limits = " | ".join(f"{100 * sps * flops / rates[p]:.0f}%" if p in rates else "-" for p in ("fp32", "bf16"))
            rows.append(f"| {name} | {precision} | {'yes' if compiled else 'no'} | {sps:.0f} | {plain_sps:.0f} | "
                        f"{sps / plain_sps:.2f}x | {flops / 1e6:.1f} | {limits} |")
            print(rows[-1], flush=True)
        if args.compile and any(compiled for _, compiled in configs):
            difference = compiled_matches_eager(module, data, device, precisions[-1], n)
            profiles.append(f"- {name}, {precisions[-1]}: after 100 identical updates, the compiled and the eager "
                            f"actor's weights differ by at most {difference:.2g}")
            print(profiles[-1], flush=True)
        best = "bf16" if "bf16" in precisions else "fp32"
        rate_note = ", ".join(f"{p} {r / 1e9:.0f} GFLOP/s" for p, r in rates.items())
        profiles.append(f"- {name}, {best}: {top_operators(project_update(module, data, device, best, False, n))} "
                        f"(matmul rate on its shapes: {rate_note})")

    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    table = "\n".join([
        f"Device: {hardware}; torch {torch.__version__}; batch 256, width 256, LayerNorm, Hopper-sized data "
        f"({NUM_TRANSITIONS:,} transitions, obs {OBS_DIM}, action {ACT_DIM}); best of {args.repeats} rounds of "
        f"{args.steps} steps after warm-up, the configurations taking turns within each round. The plain reference "
        "is fp32 and eager in every row; speed-up = ours / plain. "
        "'% of limit' = the update's matmul FLOPs at this machine's measured matmul rate on the update's own "
        "shapes (batched 256 x 256 x 256), in fp32 and in bf16.",
        "",
        "| update | precision | compiled | ours (steps/s) | plain fp32 reference (steps/s) | speed-up | "
        "MFLOP per update | % of fp32 matmul limit | % of bf16 matmul limit |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Where the time of our eager updates goes (share of self time, torch profiler, 20 updates):",
        "",
        *profiles,
    ])
    if args.output != "-":
        Path(args.output).write_text(f"# Update throughput\n\nMade by `python benchmark_results/throughput.py"
                                     f"{' --compile' if args.compile else ''}`.\n\n{table}\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args))
