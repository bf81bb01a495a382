"""Redraw every benchmark figure and summary.csv from the committed scalar data.

    python benchmark_results/plot.py             # figures and summary.csv from benchmark_results/data/*.csv
    python benchmark_results/plot.py --export    # first refresh the CSVs from the runs' tensorboard logs

It also rewrites the tables between the `generated` markers of benchmark_results/README.md, so the
README's numbers are always the CSVs' numbers.

Each experiment's CSV holds one row per evaluation: condition, seed, step, normalized_score. A figure
shows the mean over seeds and its min-max spread against gradient steps, pre-training shaded.
"Steps to 90 %" is the first evaluation at which a condition's seed-mean score reaches 90 % of the
reference condition's final seed-mean score (the from-scratch run where an experiment has one).
"""

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "runs" / "benchmark"
# experiment -> (run folder, dataset, pre-training steps, reference condition, [(condition, label)])
EXPERIMENTS = {
    "1_pretrain_vs_scratch": ("hopper_td3bc", "local/hopper/medium-v0", 10_000, "scratch", [
        ("pretrained", "pre-trained actor + critics"), ("scratch", "from scratch (TD3+BC)")]),
    "2_walker2d_pretrain_vs_scratch": ("walker2d_td3bc", "local/walker2d/medium-v0", 10_000, "scratch", [
        ("pretrained", "pre-trained actor + critics"), ("scratch", "from scratch (TD3+BC)")]),
    "2_halfcheetah_pretrain_vs_scratch": ("halfcheetah_td3bc", "local/halfcheetah/medium-v0", 10_000, "scratch", [
        ("pretrained", "pre-trained actor + critics"), ("scratch", "from scratch (TD3+BC)")]),
    "3_what_to_pretrain": ("hopper_td3bc", "local/hopper/medium-v0", 10_000, "scratch", [
        ("pretrained", "actor + critics"), ("actor_only", "actor only"), ("critic_only", "critics only"),
        ("scratch", "nothing (scratch)")]),
    "4_layernorm": ("hopper_td3bc", "local/hopper/medium-v0", 10_000, "scratch", [
        ("pretrained", "LayerNorm in both"), ("layernorm_actor_only", "actor only"),
        ("layernorm_critic_only", "critics only"), ("layernorm_none", "neither"), ("scratch", "scratch (LN both)")]),
    "5_lambda": ("hopper100k_lambda", "local-100k/hopper/medium-v0", 10_000, "lam0", [
        ("lam0", "λ = 0 (Monte-Carlo)"), ("lam0.1", "λ = 0.1"), ("lam0.3", "λ = 0.3"), ("lam0.5", "λ = 0.5")]),
    "6_edac_pretrain_vs_scratch": ("hopper_edac", "local/hopper/medium-v0", 3_000, "scratch", [
        ("pretrained", "EDAC, pre-trained (soft BC + soft returns)"), ("scratch", "EDAC from scratch")]),
    "7_data_limited": ("hopper25ep_hybrids", "local-25ep/hopper/medium-v0", 10_000, "td3bc", [
        ("td3bc", "TD3+BC, pre-trained"), ("td3bc_cql", "TD3+BC+CQL, pre-trained")]),
    "7_data_limited_edac": ("hopper25ep_edac", "local-25ep/hopper/medium-v0", 3_000, "edac", [
        ("edac", "EDAC, pre-trained"), ("edac_bc", "EDAC+BC, pre-trained")]),
}


@dataclass
class Args:
    export: bool = False
    """refresh data/<experiment>.csv from the tensorboard logs under runs/benchmark/ before plotting"""


def export(experiment, folder, conditions):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for condition, _ in conditions:
        for seed_dir in sorted((RUNS / folder / condition).glob("seed*")):
            if not (seed_dir / "model.pt").exists():
                continue  # unfinished runs are left out
            events = EventAccumulator(str(seed_dir))
            events.Reload()
            for event in events.Scalars("eval/normalized_score"):
                rows.append((condition, seed_dir.name[4:], event.step, event.value))
    path = HERE / "data" / f"{experiment}.csv"
    path.parent.mkdir(exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["condition", "seed", "step", "normalized_score"])
        writer.writerows(rows)
    print(f"wrote {path.relative_to(HERE.parent)} ({len(rows)} evaluations)")


def export_datasets():
    """Size and average episode return of each benchmark dataset, read from Minari."""
    import minari

    rows = []
    # The experiments' datasets and everything else make_dataset.py wrote under the local namespace.
    available = set(minari.list_local_datasets())
    local = {d for d in available if d.startswith("local/")}
    for dataset_id in sorted(({e[1] for e in EXPERIMENTS.values()} | local) & available):
        dataset = minari.load_dataset(dataset_id)
        returns = [float(e.rewards.sum()) for e in dataset.iterate_episodes()]
        rows.append((dataset_id, dataset.total_episodes, dataset.total_steps, round(float(np.mean(returns)), 1),
                     round(float(100 * np.mean(minari.get_normalized_score(dataset, np.array(returns)))), 1)))
    with open(HERE / "data" / "datasets.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "episodes", "transitions", "average_return", "average_normalized_score"])
        writer.writerows(rows)


def markdown_tables(summary):
    lines = []
    if (HERE / "data" / "datasets.csv").exists():
        with open(HERE / "data" / "datasets.csv") as f:
            rows = list(csv.DictReader(f))
        lines += ["| dataset | episodes | transitions | average return | average normalised score |", "|---|---|---|---|---|"]
        lines += [f"| {r['dataset']} | {r['episodes']} | {r['transitions']} | {r['average_return']} | {r['average_normalized_score']} |" for r in rows]
    policies = sorted((HERE / "behaviour_policies").glob("*_medium.npz"))
    if policies:
        lines += ["", "| behaviour policy | learner | average return when saved | environment steps of training |", "|---|---|---|---|"]
        for path in policies:
            saved = np.load(path)
            learner = "SAC (MLP)" if "kind" in saved and str(saved["kind"]) == "mlp" else "ARS (linear)"
            lines.append(f"| behaviour_policies/{path.name} | {learner} | {float(saved['avg_return']):.1f} | {int(saved['env_steps']):,} |")
    for experiment in EXPERIMENTS:
        rows = [r for r in summary if r[0] == experiment]
        if not rows:
            continue
        scratch = next((r for r in rows if r[2] == EXPERIMENTS[experiment][3]), None)
        lines += ["", f"### {experiment} ({rows[0][1]}, {rows[0][4]:,} gradient steps)", "", f"![{experiment}]({experiment}.png)", "",
                  f"| condition | seeds | final score (mean ± std) | steps to 90 % of {EXPERIMENTS[experiment][3]}'s final score | speed-up vs {EXPERIMENTS[experiment][3]} |",
                  "|---|---|---|---|---|"]
        for r in rows:
            speedup = f"{scratch[7] / r[7]:.1f}x" if scratch and scratch[7] != "" and r[7] not in ("", 0) else "-"
            lines.append(f"| {r[2]} | {r[3]} | {r[5]:.1f} ± {r[6]:.1f} | {r[7] if r[7] != '' else 'not reached'} | {speedup} |")
    return "\n".join(lines)


def load(experiment):
    """condition -> (steps, scores [seeds, steps]) for conditions whose seeds all share the same steps."""
    by_condition = defaultdict(lambda: defaultdict(dict))
    with open(HERE / "data" / f"{experiment}.csv") as f:
        for row in csv.DictReader(f):
            by_condition[row["condition"]][row["seed"]][int(row["step"])] = float(row["normalized_score"])
    curves = {}
    for condition, seeds in by_condition.items():
        steps = sorted(set.intersection(*(set(s) for s in seeds.values())))
        curves[condition] = (np.array(steps), np.array([[seed[s] for s in steps] for seed in seeds.values()]))
    return curves


def steps_to_reach(steps, mean_curve, threshold):
    reached = np.flatnonzero(mean_curve >= threshold)
    return int(steps[reached[0]]) if len(reached) else None


def main(args: Args) -> None:
    summary = []
    if args.export:
        export_datasets()
    for experiment, (folder, dataset, pretrain_steps, scratch, conditions) in EXPERIMENTS.items():
        if args.export:
            export(experiment, folder, conditions)
        if not (HERE / "data" / f"{experiment}.csv").exists():
            print(f"no data for {experiment}; skipped")
            continue
        curves = load(experiment)
        if not curves:
            print(f"no finished runs for {experiment}; skipped")
            continue
        scratch_final = curves[scratch][1].mean(0)[-1] if scratch in curves else None
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.axvspan(0, pretrain_steps, color="0.9", label="pre-training")
        for condition, label in conditions:
            if condition not in curves:
                continue
            steps, scores = curves[condition]
            mean = scores.mean(0)
            ax.plot(steps, mean, label=f"{label} (n={len(scores)})")
            ax.fill_between(steps, scores.min(0), scores.max(0), alpha=0.2)
            to_90 = steps_to_reach(steps, mean, 0.9 * scratch_final) if scratch_final is not None else None
            summary.append([experiment, dataset, condition, len(scores), int(steps[-1]), round(float(mean[-1]), 2),
                            round(float(scores[:, -1].std()), 2), "" if to_90 is None else to_90])
        ax.set_xlabel("gradient steps (pre-training included)")
        ax.set_ylabel("normalised score")
        ax.set_title(f"{dataset}: {experiment.split('_', 1)[1].replace('_', ' ')}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / f"{experiment}.png", dpi=110)
        plt.close(fig)
        print(f"drew benchmark_results/{experiment}.png")
    with open(HERE / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "dataset", "condition", "seeds", "total_steps", "final_score_mean",
                         "final_score_std", "steps_to_90pct_of_scratch"])
        writer.writerows(summary)
    print("wrote benchmark_results/summary.csv")
    readme = HERE / "README.md"
    start, end = "<!-- generated: plot.py writes from here -->", "<!-- generated: to here -->"
    if readme.exists() and start in readme.read_text():
        text = readme.read_text()
        head, rest = text.split(start, 1)
        readme.write_text(f"{head}{start}\n{markdown_tables(summary)}\n{end}{rest.split(end, 1)[1]}")
        print("updated the tables in benchmark_results/README.md")


if __name__ == "__main__":
    main(tyro.cli(Args))
