"""Figures, summary.csv and the README's tables of benchmark_results/, from the runs' own logs.

    python benchmark_results/plot.py --export --allow-mixed-versions   # refresh data/ from the runs, then draw
    python benchmark_results/plot.py --allow-mixed-versions            # draw from the committed CSVs alone
    python benchmark_results/plot.py --export --experiments-file mine.toml --runs-dir runs --out-dir mine  # your own

The experiments are those of --experiments-file (benchmark_results/experiments.toml; common/sweep.py runs
them). Everything is written to --out-dir, benchmark_results/ itself by default: data/<experiment>.csv (with
--export), <experiment>.png, summary.csv and the tables between the `generated` markers of its README.md
(a README.md with just those markers where there is none). The committed results mix script versions of
identical training (benchmark_results/README.md), hence --allow-mixed-versions. Statistics, for few-seed
comparisons as rliable recommends (Agarwal et al., 2021):
- the interquartile mean (IQM) of the seeds' scores at each evaluation, with a 95 % stratified-bootstrap
  confidence interval (the figures' bands; the tables' final scores);
- the probability that a condition improves over the experiment's baseline at the final evaluation
  (rliable's probability of improvement, with its bootstrap interval);
- the steps to reach 90 % of the better condition's final IQM, on each condition's IQM curve, with a 95 %
  bootstrap interval over seeds ("not reached" when the curve never gets there), and those steps over the
  baseline's (below 1: sooner; 0 or ∞ when only one of the two gets there), with a 95 % interval from
  resampling the seeds of both.
A CSV row records the script version of its run (a hash of the script, from the run's hyperparameters);
a figure that would mix versions is refused unless --allow-mixed-versions is given.
"""

import csv
import sys
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from common.sweep import expand  # noqa: E402

SCORE = "eval/normalized_score"
FIT = ("pretrain/critic_explained_variance", "pretrain/q_mean", "pretrain/target_mean")
FIT_STEPS = (1000, 2000, 5000, 10000, 20000)  # where critic_fit's table looks; other experiments: the hand-over
# EDAC's pessimism where the actor acts: the critics' spread at the data's and the actor's actions, and their distance
ENSEMBLE = ("ensemble/std_data_actions", "ensemble/std_policy_actions", "ensemble/policy_distance")
# experiment -> (title, baseline condition, tags to export). Experiments not listed here use the first
# condition declared as the baseline.
FIGURES = {
    "first_look": ("a first look on data made as D4RL made it (1 seed)", "td3bc_scratch", (SCORE, *ENSEMBLE)),
    "sampled_hopper_td3bc": ("TD3+BC: pre-trained vs from scratch", "scratch", (SCORE,)),
    "sampled_hopper_td3bc_alpha2.5": ("TD3+BC with alpha 2.5: pre-trained vs from scratch", "scratch", (SCORE,)),
    "sampled_walker2d_td3bc": ("TD3+BC: pre-trained vs from scratch", "scratch", (SCORE,)),
    "sampled_halfcheetah_td3bc": ("TD3+BC: pre-trained vs from scratch", "scratch", (SCORE,)),
    "sampled_precision": ("EDAC in fp32 vs bf16", "edac_fp32", (SCORE,)),
    "sampled_halfcheetah_edac": ("EDAC: pre-trained vs from scratch", "scratch", (SCORE, "charts/entropy", *ENSEMBLE)),
    "edac_handover": ("EDAC's hand-over: critics pre-trained on bootstrap resamples or with eta 100, or critics first",
                      "none", (SCORE, *ENSEMBLE, "losses/diversity")),
    "halfcheetah_edac_old_data": ("EDAC from scratch on the earlier data: the control", "scratch",
                                  (SCORE, "charts/entropy", *ENSEMBLE)),
    "hopper_td3bc": ("TD3+BC: pre-trained vs from scratch", "scratch", (SCORE,)),
    "hopper_td3bc_alpha2.5": ("TD3+BC with alpha 2.5: pre-trained vs from scratch", "scratch", (SCORE,)),
    "data_limited_edac": ("EDAC vs EDAC+BC on 24 episodes", "edac", (SCORE,)),
    "lambda": ("lambda of the pre-training targets (lambda-returns after the fix)", "lam0", (SCORE,)),
    "critic_fit": ("critic fit along pre-training, --critic-init", "td3bc_paper", FIT),
    "td3bc_critic_init": ("TD3+BC, short and long pre-training, with and without --critic-init",
                          "pretrain10k_paper", (SCORE,)),
    "edac_critic_init_short": ("EDAC after 4k + 4k steps of pre-training, with and without --critic-init", "paper",
                               (SCORE, "charts/entropy", "values/q_data")),
    "edac_critic_init": ("EDAC after the authors' 10k + 10k steps of pre-training, with and without --critic-init",
                         "paper", (SCORE, "charts/entropy", "values/q_data")),
    "precision": ("fp32 vs bf16", "td3bc_fp32", (SCORE,)),
    "what_to_pretrain": ("what is pre-trained", "scratch", (SCORE,)),
    "layernorm": ("where LayerNorm is (pre-trained actor and critics)", "both", (SCORE,)),
    "data_limited_td3bc": ("TD3+BC vs TD3+BC+CQL on 24 episodes", "td3bc", (SCORE,)),
}
PROTOCOLS = {"sampled": "sampled from a SAC policy", "mean-plus-noise": "mean action + N(0, 0.1²), clipped",
             "d4rl": "sampled from a SAC policy (D4RL)"}
COLUMNS = ["condition", "dataset", "seed", "step", "tag", "value", "script", "script_version", "finished"]


@dataclass
class Args:
    export: bool = False
    """first refresh data/<experiment>.csv from the runs' tensorboard logs under runs/<experiment>/"""
    allow_mixed_versions: bool = False
    """draw figures whose runs come from different versions of a script"""
    reps: int = 2000
    """bootstrap resamples for every confidence interval"""
    runs_dir: str = str(ROOT / "runs")
    """where --export finds the runs (common/sweep.py's <work-dir>/runs)"""
    experiments_file: str = str(HERE / "experiments.toml")
    """the TOML file that declares the experiments (as common/sweep.py's --experiments-file)"""
    out_dir: str = str(HERE)
    """where data/, the figures, summary.csv and README.md's generated tables go"""


# ------------------------------------------------------------------------------------------- export
def run_key(run) -> tuple:
    """(condition, dataset, seed) of a run named runs/<experiment>/<condition>__<dataset>__s<seed>."""
    condition, dataset, seed = run.name.split("/", 1)[1].rsplit("__", 2)
    return condition, dataset, seed[1:]


def run_versions(events) -> str:
    """The script versions a run's starts recorded in its hyperparameters ('unrecorded' before they did)."""
    versions = []
    for tensor in events.Tensors("hyperparameters/text_summary") if "hyperparameters/text_summary" in \
            events.Tags()["tensors"] else []:
        table = tensor.tensor_proto.string_val[0].decode()
        versions += [line.split("|")[2] for line in table.splitlines() if line.startswith("|script_version|")]
    return "+".join(sorted(set(versions))) or "unrecorded"


def rows_without_runs(path, runs, runs_dir) -> list:
    """The rows an earlier export wrote for declared runs with no logs under runs_dir (a fresh machine, say):
    they stay, so an export refreshes the runs at hand and loses nothing of the others."""
    if not path.exists():
        return []
    absent = {run_key(run) for run in runs if not any((Path(runs_dir) / run.name).glob("events*"))}
    with open(path) as f:
        return [row for row in list(csv.reader(f))[1:] if tuple(row[:3]) in absent]


def export(experiment, runs, runs_dir, out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(out) / "data" / f"{experiment}.csv"
    rows, tags = rows_without_runs(path, runs, runs_dir), FIGURES.get(experiment, ("", "", (SCORE,)))[2]
    tags = (*tags, *(tag for tag in FIT if tag not in tags))  # every experiment's fit at the hand-over
    for run in runs:
        run_dir = Path(runs_dir) / run.name
        if not run_dir.exists():
            continue
        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        condition, dataset, seed = run_key(run)
        version, finished = run_versions(events), int((run_dir / "model.pt").exists())
        for tag in tags:
            if tag in events.Tags()["scalars"]:
                rows += [(condition, dataset, seed, e.step, tag, e.value, run.script, version, finished)
                         for e in events.Scalars(tag)]
    if not rows:
        return
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    print(f"wrote {path} ({len(rows)} values)")


DATASET_COLUMNS = ["dataset", "data_protocol", "episodes", "transitions", "average_return",
                   "average_normalized_score", "behaviour_action_std", "at_bound_fraction", "policy_return"]


def export_datasets(out, dataset_ids):
    """Each of these datasets that is on this machine, read from Minari: its size, average episode return and
    normalised score, how its actions were made (data_protocol), the behaviour policy's action std at a state
    (make_dataset.py measured it on the dataset's states) and the fraction of action coordinates with
    |a| >= 0.999."""
    import minari

    path, rows = Path(out) / "data" / "datasets.csv", []
    earlier = list(csv.reader(path.read_text().splitlines()))[1:] if path.exists() else []
    here = sorted({*dataset_ids, *(row[0] for row in earlier)} & set(minari.list_local_datasets()))
    for dataset_id in here:
        dataset = minari.load_dataset(dataset_id)
        episodes = list(dataset.iterate_episodes())  # one pass over the file for returns and actions alike
        returns = np.array([float(e.rewards.sum()) for e in episodes])
        actions = np.concatenate([e.actions for e in episodes])
        metadata = dataset.storage.metadata
        spread, policy_return = metadata.get("behaviour_action_std"), metadata.get("policy_return")
        protocol = metadata.get("data_protocol", "mean-plus-noise" if dataset_id.startswith("local") else "")
        scored = metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None
        rows.append((dataset_id, protocol, dataset.total_episodes, dataset.total_steps, round(float(returns.mean()), 1),
                     round(float(100 * np.mean(minari.get_normalized_score(dataset, returns))), 1) if scored else "",
                     "" if spread is None else round(float(spread), 3),
                     round(float(np.mean(np.abs(actions) >= 0.999)), 4),
                     "" if not isinstance(policy_return, float) else round(policy_return, 1)))
    rows += [row for row in earlier if row[0] not in here]  # those not on this machine keep their earlier row
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([DATASET_COLUMNS, *sorted(rows, key=lambda row: row[0])])


# ------------------------------------------------------------------------------------------- statistics
def load(path):
    """A CSV of export() as {(dataset, tag): {condition: ({seed: {step: value}}, versions, finished seeds)}}."""
    table = defaultdict(lambda: defaultdict(lambda: [defaultdict(dict), set(), set()]))
    with open(path) as f:
        for row in csv.DictReader(f):
            entry = table[(row["dataset"], row["tag"])][row["condition"]]
            entry[0][row["seed"]][int(row["step"])] = float(row["value"])
            entry[1].add((row.get("script", "?"), row["script_version"]))
            if row["finished"] == "1":
                entry[2].add(row["seed"])
    return table


def iqm(scores):
    """Interquartile mean along axis 0 (the seeds): the mean of the middle 50 %."""
    from scipy.stats import trim_mean

    return trim_mean(scores, proportiontocut=0.25, axis=0)


def curve_with_interval(by_seed, reps, rng):
    """Steps evaluated by every seed, the IQM curve over seeds and its 95 % bootstrap interval."""
    steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    scores = np.array([[by_seed[s][step] for step in steps] for s in sorted(by_seed)])  # [seeds, steps]
    resampled = scores[rng.integers(0, len(scores), size=(reps, len(scores)))]  # [reps, seeds, steps]
    boot = iqm(np.moveaxis(resampled, 1, 0))  # [reps, steps]
    return np.array(steps), scores, iqm(scores), np.percentile(boot, [2.5, 97.5], axis=0)


def steps_to(steps, curve, threshold):
    reached = np.flatnonzero(curve >= threshold)
    return int(steps[reached[0]]) if len(reached) else None


def steps_to_interval(steps, scores, threshold, reps, rng):
    found = []
    for _ in range(reps):
        sample = scores[rng.integers(0, len(scores), len(scores))]
        found.append(steps_to(steps, iqm(sample), threshold))
    reached = [s for s in found if s is not None]
    if len(reached) < 0.975 * reps:  # in more than 2.5 % of resamples it is never reached
        return (int(np.percentile(reached, 2.5)) if reached else None), None
    return int(np.percentile(reached, 2.5)), int(np.percentile(reached, 97.5))


def steps_ratio(steps, scores, base_scores, threshold, reps, rng):
    """(ratio, low, high): the steps to `threshold` on a condition's IQM curve over those on the baseline's (below
    1: it gets there sooner), and a 95 % interval from resampling each condition's seeds. A curve that never gets
    there counts as infinitely late: the ratio is then 0 or infinite, and a resample in which neither gets there
    is left out."""
    def ratio(a, b):
        a, b = (np.inf if x is None else x for x in (a, b))
        return np.nan if a == b == np.inf else a / b

    def resampled(s):
        return s[rng.integers(0, len(s), len(s))]

    point = ratio(steps_to(steps, iqm(scores), threshold), steps_to(steps, iqm(base_scores), threshold))
    boot = np.array([ratio(steps_to(steps, iqm(resampled(scores)), threshold),
                           steps_to(steps, iqm(resampled(base_scores)), threshold)) for _ in range(reps)])
    boot = boot[~np.isnan(boot)]
    if not len(boot):
        return point, np.nan, np.nan
    return point, np.percentile(boot, 2.5, method="lower"), np.percentile(boot, 97.5, method="higher")


def final_iqm_interval(final_scores, reps):
    """rliable's IQM of the final scores over seeds and its 95 % stratified-bootstrap interval."""
    np.random.seed(0)  # part of the bootstrap draws from the global generator: the same interval every time
    from rliable import library, metrics

    point, interval = library.get_interval_estimates({"x": final_scores[:, None]},
                                                     lambda s: np.array([metrics.aggregate_iqm(s)]), reps=reps,
                                                     random_state=np.random.RandomState(0))
    return float(point["x"][0]), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def probability_of_improvement(x, y, reps):
    """rliable's P(X > Y) on the final scores, and its 95 % stratified-bootstrap interval."""
    np.random.seed(0)  # part of the bootstrap draws from the global generator: the same interval every time
    from rliable import library, metrics

    point, interval = library.get_interval_estimates({"p": (x[:, None], y[:, None])},
                                                     metrics.probability_of_improvement, reps=reps,
                                                     random_state=np.random.RandomState(0))
    return float(point["p"]), float(np.ravel(interval["p"])[0]), float(np.ravel(interval["p"])[1])


# ------------------------------------------------------------------------------------------- output
def fmt_steps(value):
    return "-" if value is None else f"{value / 1000:g}k"


def fmt_ratio(value):
    return "-" if np.isnan(value) else "∞" if np.isinf(value) else f"{value:.2f}"


def draw(ax, condition, curve):
    """A condition's IQM curve and its 95 % band; returns the curve."""
    steps, scores, center, (low, high) = curve
    ax.plot(steps, center, label=f"{condition} ({len(scores)} seed{'s' * (len(scores) != 1)})")
    ax.fill_between(steps, low, high, alpha=0.2)
    return curve


def data_protocol(dataset: str) -> str:
    """How a dataset's actions were made, from its name as the CSVs write it (local-hopper-medium-v0)."""
    if dataset.startswith("local-noise"):
        return "mean-plus-noise"
    return "sampled" if dataset.startswith("local-") else dataset.split("-", 1)[0]


def analyse(experiment, args, first_condition=None):
    title, baseline, tags = FIGURES.get(experiment, ("", first_condition, (SCORE,)))
    title = f"{experiment}: {title}" if title else experiment
    out = Path(args.out_dir)
    table, rng = load(out / "data" / f"{experiment}.csv"), np.random.default_rng(0)
    ratio_rng = np.random.default_rng(1)  # its own stream: the other intervals stay as they were before it
    rows, lines = [], []
    panels = sorted((key for key in table if key[1] in tags), key=lambda key: (key[0], key[1] != SCORE, key[1]))
    grid_columns = min(len(panels), 3)
    grid_rows = -(-len(panels) // grid_columns)
    fig, axes = plt.subplots(grid_rows, grid_columns, figsize=(max(5.6 * grid_columns, 8.0), 4.0 * grid_rows),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (dataset, tag) in zip(axes.flat, panels):
        conditions = table[(dataset, tag)]
        versions = defaultdict(set)  # script -> its versions among these runs
        for script, version in set().union(*(c[1] for c in conditions.values())):
            versions[script].add(version)
        mixed = {script: sorted(v) for script, v in versions.items() if len(v) > 1}
        if mixed and not args.allow_mixed_versions:
            raise SystemExit(f"error: {experiment} on {dataset} mixes runs of different versions of {mixed}; re-run "
                             "them on one version, or pass --allow-mixed-versions if the versions are known to "
                             "train identically.")
        curves = {c: curve_with_interval(v[0], args.reps, rng) for c, v in conditions.items()}
        best_final = max(curve[2][-1] for curve in curves.values())
        for condition, curve in curves.items():
            steps, scores, center, _ = draw(ax, condition, curve)
            if tag != SCORE:
                continue
            to_90 = steps_to(steps, center, 0.9 * best_final)
            to_90_interval = steps_to_interval(steps, scores, 0.9 * best_final, args.reps, rng)
            base_name = baseline if baseline in curves else next(iter(curves))
            base = curves[base_name]
            compared = len(base[0]) and base[0][-1] == steps[-1] and condition != base_name
            improvement = probability_of_improvement(scores[:, -1], base[1][:, -1], args.reps) \
                if compared else None
            final, final_low, final_high = final_iqm_interval(scores[:, -1], args.reps)
            ratio = steps_ratio(steps, scores, base[1], 0.9 * best_final, args.reps, ratio_rng) \
                if compared else (np.nan,) * 3
            peak = int(np.argmax(center))  # the best evaluation of the IQM curve: a collapse shows beside the final
            rows.append(dict(experiment=experiment, dataset=dataset, data_protocol=data_protocol(dataset),
                             condition=condition, seeds=len(scores),
                             finished_seeds=len(conditions[condition][2]), total_steps=int(steps[-1]),
                             final_score_mean=round(float(scores[:, -1].mean()), 2),
                             final_score_std=round(float(scores[:, -1].std()), 2),
                             best_iqm=round(float(center[peak]), 2), best_iqm_step=int(steps[peak]),
                             steps_to_90pct_of_scratch=steps_to(steps, center, 0.9 * base[2][-1]),
                             final_iqm=round(final, 2), final_iqm_low=round(final_low, 2),
                             final_iqm_high=round(final_high, 2),
                             prob_improvement=round(improvement[0], 3) if improvement else "",
                             prob_improvement_low=round(improvement[1], 3) if improvement else "",
                             prob_improvement_high=round(improvement[2], 3) if improvement else "",
                             steps_to_90pct_of_best=to_90 if to_90 is not None else "",
                             steps_to_90pct_of_best_low=to_90_interval[0] if to_90_interval[0] is not None else "",
                             steps_to_90pct_of_best_high=to_90_interval[1] if to_90_interval[1] is not None else "",
                             **{f"steps_to_90pct_ratio{end}": "" if np.isnan(value) else round(float(value), 3)
                                for end, value in zip(("", "_low", "_high"), ratio)},
                             script_versions="+".join(sorted(v for _, v in conditions[condition][1]))))
            p = (f"{improvement[0]:.2f} [{improvement[1]:.2f}, {improvement[2]:.2f}]" if improvement else "-")
            lines.append(f"| {dataset} | {condition} | {len(conditions[condition][2])}/{len(scores)} | {steps[-1]:,} | "
                         f"{center[peak]:.1f} at {fmt_steps(steps[peak])} | "
                         f"{final:.1f} [{final_low:.1f}, {final_high:.1f}] | {scores[:, -1].mean():.1f} ± "
                         f"{scores[:, -1].std():.1f} | {p} | {fmt_steps(to_90)} "
                         f"[{fmt_steps(to_90_interval[0])}, {fmt_steps(to_90_interval[1])}] | "
                         + (f"{fmt_ratio(ratio[0])} [{fmt_ratio(ratio[1])}, {fmt_ratio(ratio[2])}] |"
                            if not np.isnan(ratio[0]) else "- |"))
        ax.set_title(f"{dataset}: {tag.split('/')[-1]}", fontsize=9)
        ax.set_xlabel("gradient steps (pre-training included)")
        ax.set_ylabel({SCORE: "normalised score (IQM, 95 % CI)"}.get(tag, tag))
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{experiment}.png", dpi=100)
    plt.close(fig)
    header = (f"### {title}\n\n![{experiment}]({experiment}.png)\n\n")
    if lines:
        header += ("| dataset | condition | seeds finished / plotted | steps | best IQM | final IQM [95 % CI] "
                   f"| final mean ± std | P(better than {baseline}) [95 % CI] | steps to 90 % of the best final IQM "
                   f"[95 % CI] | those steps over {baseline}'s [95 % CI] |\n|---|---|---|---|---|---|---|---|---|---|\n"
                   + "\n".join(lines) + "\n")
    return rows, header + fit_table(table, FIT_STEPS if FIT[0] in tags else None)


def data_comparison(args, pairs=(("hopper_td3bc", "earlier data: mean action + noise"),
                                 ("sampled_hopper_td3bc", "data made as D4RL made it"))):
    """One figure with TD3+BC pre-trained and from scratch on hopper-medium made both ways, side by side."""
    out = Path(args.out_dir)
    tables = [(load(out / "data" / f"{name}.csv"), name, label) for name, label in pairs
              if (out / "data" / f"{name}.csv").exists()]
    if len(tables) < 2:
        return ""
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, len(tables), figsize=(5.6 * len(tables), 4.0), sharey=True, squeeze=False)
    for ax, (table, name, label) in zip(axes.flat, tables):
        for (dataset, tag), conditions in sorted(table.items()):
            for condition, (by_seed, _, _) in conditions.items() if tag == SCORE else ():
                draw(ax, condition, curve_with_interval(by_seed, args.reps, rng))
        ax.set_title(f"{label}\n({name})", fontsize=9)
        ax.set_xlabel("gradient steps (pre-training included)")
        ax.legend(fontsize=7)
    axes.flat[0].set_ylabel("normalised score (IQM, 95 % CI)")
    fig.suptitle("TD3+BC on hopper-medium: the same comparison on data made two ways", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "hopper_data_compared.png", dpi=100)
    plt.close(fig)
    return ("### hopper-medium made two ways\n\n![hopper_data_compared](hopper_data_compared.png)\n\nThe panels "
            "draw the experiments' own curves (tables above and below).\n")


def fit_table(table, at_steps):
    """The critics' fit to their pre-training targets, averaged over seeds: explained variance and mean Q /
    mean target, at at_steps or (when None) at the hand-over, the last step at which the fit was logged."""
    rows = []
    for dataset, condition in sorted({(d, c) for (d, tag) in table if tag == FIT[0] for c in table[(d, tag)]}):
        by_tag = {tag: table[(dataset, tag)][condition][0] for tag in FIT}
        seeds = sorted(by_tag[FIT[0]])
        logged = sorted(set.intersection(*(set(by_tag[FIT[0]][s]) for s in seeds)))
        # Count critic pre-training steps: EDAC's critics train in the second half of pre-training, after soft BC.
        edac = any(script.startswith("edac") for script, _ in table[(dataset, FIT[0])][condition][1])
        critics_from = logged[-1] // 2 if edac and at_steps else 0
        steps = [s + critics_from for s in at_steps if s + critics_from in logged] if at_steps else logged[-1:]
        cells = []
        for step in steps:
            explained = np.mean([by_tag[FIT[0]][s][step] for s in seeds])
            q, target = (np.mean([by_tag[tag][s][step] for s in seeds]) for tag in FIT[1:])
            cells.append(f"{explained:.2f} / {q / target:.2f}" + ("" if at_steps else f" ({q:.0f} / {target:.0f})"))
        rows.append((dataset, condition, len(seeds), [step - critics_from for step in steps], cells))
    if not rows:
        return ""
    if at_steps:
        columns = sorted({step for row in rows for step in row[3]})
        head = " | ".join(f"{fmt_steps(step)}" for step in columns)
        lines = [f"| {d} | {c} | {n} | " + " | ".join(dict(zip(steps, cells)).get(step, "-") for step in columns)
                 + " |" for d, c, n, steps, cells in rows]
        return ("\nCritic fit after this many critic pre-training steps (EDAC's come after as many steps of soft BC), "
                "mean over seeds: explained variance of the targets / mean Q ÷ mean target.\n\n"
                f"| dataset | condition | seeds | {head} |\n|---|---|---|" + "---|" * len(columns) + "\n"
                + "\n".join(lines) + "\n")
    lines = [f"| {d} | {c} | {n} | {fmt_steps(steps[0])} | {cells[0]} |" for d, c, n, steps, cells in rows]
    return ("\nThe critics at the hand-over, mean over seeds: explained variance of the targets / mean Q ÷ mean "
            "target (mean Q / mean target).\n\n| dataset | condition | seeds | hand-over step | fit |\n"
            "|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def flag_value(flags, name):
    """The value of the last `name` among a run's command-line flags, or None."""
    values = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == name]
    return values[-1] if values else None


def runs_table(grids, data_dir, experiments_file="experiments.toml"):
    """For every experiment: the grid its file declares, and how far its runs got by the last export: the runs
    with logged values, how many of them finished, and the range of their last logged steps."""
    lines = [f"| experiment | declared in {experiments_file} | ran here |", "|---|---|---|"]
    for experiment, grid in grids.items():
        seeds = sorted({int(flag_value(run.flags, "--seed")) for run in grid})
        budgets = sorted({int(flag_value(run.flags, "--total-steps") or 0) for run in grid})
        declared = (f"{len(grid)} runs: {len({run_key(run)[0] for run in grid})} conditions, seeds "
                    f"{', '.join(map(str, seeds))}; " + " / ".join(fmt_steps(b) if b else "default" for b in budgets)
                    + " steps")
        last_step, finished = {}, set()
        if (data_dir / f"{experiment}.csv").exists():
            with open(data_dir / f"{experiment}.csv") as f:
                for row in csv.DictReader(f):
                    run = (row["condition"], row["dataset"], row["seed"])
                    last_step[run] = max(last_step.get(run, 0), int(row["step"]))
                    if row["finished"] == "1":
                        finished.add(run)
        ran = {run_key(run) for run in grid} & set(last_step)
        if not ran:
            lines.append(f"| `{experiment}` | {declared} | not started |")
            continue
        ran_seeds = sorted({int(seed) for _, _, seed in ran})
        reached = sorted({last_step[run] for run in ran})
        lines.append(f"| `{experiment}` | {declared} | {len(ran)} runs (seed{'s' * (len(ran_seeds) > 1)} "
                     f"{', '.join(map(str, ran_seeds))}), {len(finished & ran)} finished; logged up to step "
                     + (fmt_steps(reached[0]) if len(reached) == 1 else
                        f"{fmt_steps(reached[0])}-{fmt_steps(reached[-1])}") + " |")
    return "\n".join(lines) + "\n"


def action_source(row) -> str:
    if row["dataset"].endswith("/random-v0"):
        return "uniformly random"
    if "medium-replay" in row["dataset"]:
        return "SAC's replay buffer" if row["data_protocol"] == "sampled" else "the learner's rollouts"
    return PROTOCOLS.get(row["data_protocol"], row["data_protocol"])


def datasets_table(out):
    """Our datasets beside what D4RL reports of its own (data/d4rl_reference.csv), environment by environment."""
    rows = []
    for name, source in (("datasets.csv", "here"), ("d4rl_reference.csv", "D4RL")):
        if (Path(out) / "data" / name).exists():
            with open(Path(out) / "data" / name) as f:
                rows += [{**row, "source": source} for row in csv.DictReader(f)]
    if not rows:
        return ""
    order = {"sampled": 0, "d4rl": 1, "mean-plus-noise": 2}

    def place(r):  # by environment, quality and protocol (an id may have fewer than three parts)
        _, env, name = [*r["dataset"].split("/"), "", ""][:3]
        return env, name.rsplit("-v", 1)[0], order.get(r["data_protocol"], 3), r["dataset"]

    rows.sort(key=place)
    cells = ("episodes", "transitions", "average_return", "average_normalized_score", "behaviour_action_std",
             "at_bound_fraction")
    return "\n".join([
        "| dataset | actions | episodes | transitions | average return | normalised score | behaviour policy's action "
        "std | share of action coordinates with abs(a) >= 0.999 |", "|---|---|---|---|---|---|---|---|",
        *(f"| {r['dataset']} | {action_source(r)} | "
          + " | ".join(r[c] or "-" for c in cells) + " |" for r in rows)]) + "\n"


def main(args: Args) -> None:
    with open(args.experiments_file, "rb") as f:
        experiments = tomllib.load(f)
    out = Path(args.out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    grids = {name: expand(experiments, (name,), Path(args.experiments_file).parent) for name in experiments}
    if args.export:
        export_datasets(out, {flag_value(run.flags, "--env-id") for grid in grids.values() for run in grid})
        for experiment, grid in grids.items():
            export(experiment, grid, args.runs_dir, out)
    summary, sections = [], [datasets_table(out)]
    for experiment in experiments:
        if (out / "data" / f"{experiment}.csv").exists():
            rows, section = analyse(experiment, args, next(iter(experiments[experiment]["conditions"])))
            summary += rows
            sections.append(section)
            print(f"drew {out / experiment}.png")
    sections.insert(1, data_comparison(args))
    if summary:
        with open(out / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(summary[0]))
            writer.writeheader()
            writer.writerows(summary)
    readme = out / "README.md"
    text = readme.read_text() if readme.exists() else (
        "# Results\n\n<!-- generated: the runs table -->\n<!-- generated: end of the runs table -->\n\n"
        "<!-- generated: plot.py writes from here -->\n<!-- generated: to here -->\n")
    for start, end, content in (
            ("<!-- generated: the runs table -->", "<!-- generated: end of the runs table -->",
             runs_table(grids, out / "data", Path(args.experiments_file).name)),
            ("<!-- generated: plot.py writes from here -->", "<!-- generated: to here -->", "\n".join(sections))):
        if start in text:
            head, rest = text.split(start, 1)
            text = f"{head}{start}\n{content}{end}{rest.split(end, 1)[1]}"
    readme.write_text(text)
    print(f"updated the tables in {readme}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
