"""How much of soft behaviour cloning's loss comes from dataset actions that sit exactly on the action bound.

For each dataset: the fraction of action coordinates at the bound, then soft BC (edac_pretrain.py's own
networks and update) for --steps steps under each likelihood of dataset actions, the authors' (a density at
atanh(clip(a, +-(1 - 1e-6))), `--action-saturation 1`) and ours (a coordinate within 0.1 % of the bound
counts by the probability mass beyond that point, the default 0.999); on a fixed sample of
the data: each kind of coordinate's mean negative log-likelihood at the start, after 1,000 steps and at
the end, and the policy's mean log-std, entropy estimate and temperature alpha. Writes
benchmark_results/soft_bc_bounds.md.

    python benchmark_results/soft_bc_bounds.py --datasets local/hopper/medium-v0 local/halfcheetah/medium-v0
"""

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    datasets: list[str] = field(default_factory=lambda: ["local/hopper/medium-v0", "local/walker2d/medium-v0",
                                                          "local/halfcheetah/medium-v0"])
    """Minari dataset ids"""
    steps: int = 4000
    """soft-BC gradient steps per likelihood"""
    seed: int = 0
    output: str = str(ROOT / "benchmark_results" / "soft_bc_bounds.md")
    """markdown file to write ('-' prints only)"""


def load_edac():
    spec = importlib.util.spec_from_file_location("edac_pretrain", ROOT / "algos" / "edac_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_coordinate_nll(actor, obs, actions, saturation):
    """-log-likelihood of each dataset action coordinate, as soft BC sees it."""
    mean, log_std = actor.distribution(obs)
    a = actions / actor.max_action
    if saturation >= 1:
        return -actor.coordinate_log_density(mean, log_std, torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6)))
    density = actor.coordinate_log_density(mean, log_std, torch.atanh(a.clamp(-saturation, saturation)))
    mass = torch.special.log_ndtr((torch.sign(a) * mean - np.arctanh(saturation)) / log_std.exp())
    return -torch.where(a.abs() >= saturation, mass, density)


def main(args: Args) -> None:
    edac = load_edac()
    torch.set_num_threads(1)
    rows = []
    for dataset_id in args.datasets:
        _, data = edac.load_data(dataset_id)
        at_bound = np.abs(data["actions"]) >= 1.0
        obs = (data["observations"] - data["observations"].mean(0)) / (data["observations"].std(0) + 1e-3)
        data_t = {"observations": torch.as_tensor(obs, dtype=torch.float32),
                  "actions": torch.as_tensor(data["actions"], dtype=torch.float32)}
        sample = torch.linspace(0, len(obs) - 1, 20_000).long()
        for name, saturation in (("authors (density, clip 1e-6)", 1.0), ("censored (saturation 0.999)", 0.999)):
            run_args = replace(edac.Args(), num_critics=2, action_saturation=saturation)
            torch.manual_seed(args.seed)
            learner = edac.make_learner(obs.shape[1], data["actions"].shape[1], 1.0, run_args, "cpu")
            sampler = torch.Generator().manual_seed(args.seed)
            bound, snapshots = at_bound[sample.numpy()], []
            for step in range(args.steps + 1):
                if step in (0, 1000, args.steps):
                    with torch.no_grad():
                        nll = per_coordinate_nll(learner.actor, data_t["observations"][sample],
                                                 data_t["actions"][sample], saturation).numpy()
                    snapshots.append(f"{nll[bound].mean():.1f} / {nll[~bound].mean():.2f}")
                if step == args.steps:
                    break
                idx = torch.randint(len(obs), (256,), generator=sampler)
                noise = torch.randn(256, data["actions"].shape[1], generator=sampler)
                metrics = edac.soft_bc_step(learner, {k: v[idx] for k, v in data_t.items()}, noise, run_args)
            with torch.no_grad():
                _, log_std = learner.actor.distribution(data_t["observations"][sample])
            rows.append(f"| {dataset_id} | {100 * at_bound.mean():.1f} % | {name} | {' | '.join(snapshots)} | "
                        f"{log_std.mean():.2f} | {metrics['charts/entropy'].item():.2f} | "
                        f"{metrics['charts/alpha'].item():.3f} |")
            print(rows[-1], flush=True)
    table = "\n".join([
        f"Soft BC for {args.steps:,} steps (batch 256, seed {args.seed}); statistics on 20,000 evenly spaced "
        "transitions. NLL: the mean negative log-likelihood of an action coordinate on the bound / of any other "
        "coordinate (a density for the authors' likelihood, hence negative where it is high; a probability "
        "mass, >= 0, for a censored coordinate). Log-std (pre-tanh), entropy estimate and alpha after training.",
        "", "| dataset | coordinates at the bound | likelihood | NLL bound / other, step 0 | step 1,000 | "
        f"step {args.steps:,} | mean log-std | entropy | alpha |",
        "|---|---|---|---|---|---|---|---|---|", *rows])
    if args.output != "-":
        Path(args.output).write_text("# Soft behaviour cloning and actions on the bound\n\nMade by "
                                     "`python benchmark_results/soft_bc_bounds.py`.\n\n" + table + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args))
