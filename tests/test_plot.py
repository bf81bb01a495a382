"""benchmark_results/plot.py: the critic-fit tables report the numbers the runs logged, averaged by hand here."""

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("plot", ROOT / "benchmark_results" / "plot.py")
plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot)

EV, Q, TARGET = plot.FIT


def write_csv(path, values):
    """values: {(condition, seed, step, tag): value} as export() writes them."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(plot.COLUMNS)
        for (condition, seed, step, tag), value in values.items():
            script = "edac_pretrain.py" if condition.startswith("edac") else "td3bc_pretrain.py"
            writer.writerow([condition, "local-hopper-medium-v0", seed, step, tag, value, script, "v1", 1])


def test_fit_table_along_pretraining_averages_seeds_at_each_step(tmp_path):
    values = {}
    for seed, (ev_1k, q_1k, ev_2k, q_2k) in enumerate([(0.2, 40.0, 0.5, 80.0), (0.4, 60.0, 0.7, 120.0)]):
        values |= {("paper", seed, 1000, EV): ev_1k, ("paper", seed, 1000, Q): q_1k,
                   ("paper", seed, 1000, TARGET): 200.0, ("paper", seed, 2000, EV): ev_2k,
                   ("paper", seed, 2000, Q): q_2k, ("paper", seed, 2000, TARGET): 200.0}
    values[("paper", 1, 3000, EV)] = 0.9  # a step that is not one of FIT_STEPS never shows
    write_csv(tmp_path / "fit.csv", values)
    table = plot.fit_table(plot.load(tmp_path / "fit.csv"), plot.FIT_STEPS)
    row = next(line for line in table.splitlines() if "| paper |" in line)
    # by hand: 1k: EV (0.2 + 0.4) / 2 = 0.30, Q 50 / 200 = 0.25; 2k: EV 0.60, Q 100 / 200 = 0.50
    assert row == "| local-hopper-medium-v0 | paper | 2 | 0.30 / 0.25 | 0.60 / 0.50 |"
    assert "| 1k | 2k |" in table and "3k" not in table


def test_fit_table_at_the_hand_over_takes_the_last_step_every_seed_logged(tmp_path):
    values = {}
    for seed, q in enumerate([90.0, 110.0]):
        for step in (1000, 2000):
            values |= {("mean_target", seed, step, EV): 0.1 * step / 1000, ("mean_target", seed, step, Q): q,
                       ("mean_target", seed, step, TARGET): 250.0}
    values[("mean_target", 0, 3000, EV)] = 0.9  # only one seed got this far: not the hand-over of both
    write_csv(tmp_path / "handover.csv", values)
    table = plot.fit_table(plot.load(tmp_path / "handover.csv"), None)
    row = next(line for line in table.splitlines() if "| mean_target |" in line)
    assert row == "| local-hopper-medium-v0 | mean_target | 2 | 2k | 0.20 / 0.40 (100 / 250) |"


def test_fit_table_counts_edac_steps_from_the_start_of_critic_pre_training(tmp_path):
    # EDAC pre-trains the actor for the first half (steps 0-2k here), then the critics (2k-4k)
    values = {}
    for step, ev in ((3000, 0.1), (4000, 0.3)):
        values |= {("edac_paper", 0, step, EV): ev, ("edac_paper", 0, step, Q): 50.0,
                   ("edac_paper", 0, step, TARGET): 100.0}
    write_csv(tmp_path / "edac.csv", values)
    table = plot.fit_table(plot.load(tmp_path / "edac.csv"), plot.FIT_STEPS)
    assert "| 1k | 2k |" in table  # critic steps 1k and 2k are global steps 3k and 4k
    assert "| local-hopper-medium-v0 | edac_paper | 1 | 0.10 / 0.50 | 0.30 / 0.50 |" in table
    handover = plot.fit_table(plot.load(tmp_path / "edac.csv"), None)
    assert "| local-hopper-medium-v0 | edac_paper | 1 | 4k | 0.30 / 0.50 (50 / 100) |" in handover  # global step


def test_runs_table_says_how_far_each_experiment_got(tmp_path):
    experiments = {
        "long": {"script": "td3bc_pretrain.py", "datasets": ["local/hopper/medium-v0"], "seeds": [0, 1, 2],
                 "flags": "--total-steps 200000 --eval-interval 5000",
                 "conditions": {"pretrained": "--pretrain actor-critic", "scratch": "--pretrain none"}},
        "unrun": {"script": "td3bc_pretrain.py", "datasets": ["local/hopper/medium-v0"], "seeds": [0],
                  "conditions": {"a": "--total-steps 1000", "b": "--total-steps 3000"}},
    }
    # long: seed 0 finished in both conditions, seed 1 stopped at 45k and 40k, seed 2 never started
    with open(tmp_path / "long.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(plot.COLUMNS)
        for condition, seed, last, finished in (("pretrained", 0, 200000, 1), ("scratch", 0, 200000, 1),
                                                ("pretrained", 1, 45000, 0), ("scratch", 1, 40000, 0)):
            for step in range(5000, last + 1, 5000):
                writer.writerow([condition, "local-hopper-medium-v0", seed, step, plot.SCORE, 1.0,
                                 "td3bc_pretrain.py", "v1", finished])
        # a run of a condition the file no longer declares is not counted
        writer.writerow(["gone", "local-hopper-medium-v0", 0, 5000, plot.SCORE, 1.0, "td3bc_pretrain.py", "v1", 1])
    table = plot.runs_table({name: plot.expand(experiments, (name,)) for name in experiments}, tmp_path).splitlines()
    assert table[2] == ("| `long` | 6 runs: 2 conditions, seeds 0, 1, 2; 200k steps | 4 runs (seeds 0, 1), "
                        "2 finished; logged up to step 40k-200k |")
    assert table[3] == "| `unrun` | 2 runs: 2 conditions, seeds 0; 1k / 3k steps | not started |"


def test_datasets_table_puts_each_dataset_beside_the_earlier_one_and_d4rls(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [plot.DATASET_COLUMNS,
            ["local-noise/hopper/medium-v0", "mean-plus-noise", 1686, 1000232, 1713.1, 53.3, 0.08, 0.05, ""],
            ["local/hopper/medium-v0", "sampled", 2000, 1000000, 1400.0, 43.7, 0.2, 0.001, 1410.5],
            ["local/halfcheetah/medium-v0", "sampled", 1000, 1000000, 4970.4, 42.3, 0.109, 0.0025, 4971.1],
            ["myteam/hopper-expert-v0", "", 10, 10000, 3000.0, "", "", 0.0, ""]]  # one's own, of two parts
    with open(tmp_path / "data" / "datasets.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with open(tmp_path / "data" / "d4rl_reference.csv", "w", newline="") as f:
        csv.writer(f).writerows([plot.DATASET_COLUMNS, ["d4rl/hopper/medium-v2", "d4rl", "", 1000000, "",
                                                        "about 40-45", "", "none exactly at ±1", ""]])
    table = plot.datasets_table(tmp_path)
    assert "| myteam/hopper-expert-v0 |  | 10 | 10000 | 3000.0 | - |" in table
    lines = [line for line in table.splitlines() if line.startswith("| local") or "d4rl/" in line]
    assert [line.split(" | ")[0][2:] for line in lines] == [
        "local/halfcheetah/medium-v0", "local/hopper/medium-v0", "d4rl/hopper/medium-v2",
        "local-noise/hopper/medium-v0"]
    assert "| about 40-45 | - | none exactly at ±1 |" in lines[2]
    assert "mean action + N(0, 0.1²), clipped" in lines[3] and "| 0.08 | 0.05 |" in lines[3]


def test_data_protocol_follows_the_namespace():
    assert plot.data_protocol("local-noise-100k-hopper-medium-v0") == "mean-plus-noise"
    assert plot.data_protocol("local-hopper-medium-v0") == "sampled"
    assert plot.data_protocol("mujoco-hopper-medium-v0") == "mujoco"


def test_export_refreshes_the_runs_at_hand_and_keeps_the_rows_of_runs_it_cannot_see(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    experiments = {"exp": {"script": "td3bc_pretrain.py", "datasets": ["local/hopper/medium-v0"], "seeds": [0, 1],
                           "conditions": {"pretrained": "--pretrain actor-critic"}}}
    runs = plot.expand(experiments, ("exp",))
    (tmp_path / "data").mkdir()
    # an earlier export, from a machine that had both runs: seed 0 at 1.0, seed 1 at 2.0
    write_csv(tmp_path / "data" / "exp.csv", {("pretrained", 0, 5000, plot.SCORE): 1.0,
                                               ("pretrained", 1, 5000, plot.SCORE): 2.0})
    with SummaryWriter(tmp_path / "runs" / "exp" / "pretrained__local-hopper-medium-v0__s1") as writer:
        writer.add_scalar(plot.SCORE, 7.0, 5000)  # only seed 1 is here now, and it has a new value
        writer.add_scalar(plot.SCORE, 8.0, 10000)
    plot.export("exp", runs, tmp_path / "runs", tmp_path)
    with open(tmp_path / "data" / "exp.csv") as f:
        values = {(r["seed"], int(r["step"])): float(r["value"]) for r in csv.DictReader(f)}
    assert values == {("0", 5000): 1.0, ("1", 5000): 7.0, ("1", 10000): 8.0}


def test_export_of_datasets_keeps_the_rows_of_datasets_not_on_this_machine(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    rows = [plot.DATASET_COLUMNS, ["local/gone/medium-v0", "sampled", 10, 1000, 5.0, 1.0, 0.2, 0.0, 5.0]]
    with open(tmp_path / "data" / "datasets.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "no_datasets"))  # a machine without them
    plot.export_datasets(tmp_path, ["local/gone/medium-v0"])
    with open(tmp_path / "data" / "datasets.csv") as f:
        assert list(csv.reader(f)) == [plot.DATASET_COLUMNS, [str(cell) for cell in rows[1]]]


def test_steps_ratio_and_its_interval_match_every_resample_worked_by_hand(tmp_path, monkeypatch):
    import itertools
    from types import SimpleNamespace

    curves = {("pretrained", 0): [50, 90, 95, 100], ("pretrained", 1): [80, 85, 95, 100],
              ("scratch", 0): [10, 20, 60, 100], ("scratch", 1): [10, 40, 95, 100],
              ("never", 0): [0, 0, 0, 0], ("never", 1): [0, 0, 0, 0]}
    steps = [10000, 20000, 30000, 40000]
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "pair.csv", {(c, s, step, plot.SCORE): v for (c, s), curve in curves.items()
                                                for step, v in zip(steps, curve)})
    monkeypatch.setitem(plot.FIGURES, "pair", ("test", "scratch", (plot.SCORE,)))
    rows, table = plot.analyse("pair", SimpleNamespace(reps=1000, allow_mixed_versions=False, out_dir=tmp_path))

    def first_step_at_90(seeds):  # the IQM of two seeds is their mean; both finals are 100, so 90 % is 90
        mean = [sum(curves[s][i] for s in seeds) / len(seeds) for i in range(len(steps))]
        return next(step for step, value in zip(steps, mean) if value >= 90)

    pairs = {c: list(itertools.product([(c, 0), (c, 1)], repeat=2)) for c in ("pretrained", "scratch")}
    ratios = [first_step_at_90(a) / first_step_at_90(b) for a in pairs["pretrained"] for b in pairs["scratch"]]
    both = {c: [(c, 0), (c, 1)] for c in pairs}
    point = first_step_at_90(both["pretrained"]) / first_step_at_90(both["scratch"])
    assert (point, min(ratios), max(ratios)) == (0.75, 0.5, 1.0)  # every resample is at least 1/16 likely
    cells = {line.split(" | ")[1]: line.rsplit(" | ", 1)[1] for line in table.splitlines() if "local-hopper" in line}
    assert cells == {"pretrained": "0.75 [0.50, 1.00] |", "scratch": "- |", "never": "∞ [∞, ∞] |"}
    by_condition = {row["condition"]: row for row in rows}
    ratio_columns = [f"steps_to_90pct_ratio{end}" for end in ("", "_low", "_high")]
    assert [by_condition["pretrained"][column] for column in ratio_columns] == [0.75, 0.5, 1.0]


def test_your_own_experiment_is_plotted_into_a_folder_of_its_own(tmp_path, tiny_dataset):
    from torch.utils.tensorboard import SummaryWriter

    (tmp_path / "mine.toml").write_text(f'[mine]\nscript = "td3bc_pretrain.py"\ndatasets = ["{tiny_dataset}"]\n'
                                        'seeds = [0, 1]\n'
                                        'conditions = { scratch = "--pretrain none", pretrained = "" }\n')
    for condition, seed, score in (("pretrained", 0, 60.0), ("pretrained", 1, 70.0), ("scratch", 0, 40.0),
                                   ("scratch", 1, 50.0)):
        with SummaryWriter(tmp_path / "runs" / "mine" / f"{condition}__test-hopper-medium-v0__s{seed}") as writer:
            writer.add_scalar(plot.SCORE, score, 5000)
    shipped = {path: path.read_bytes() for path in (plot.HERE / "README.md", plot.HERE / "summary.csv")}
    plot.main(plot.Args(export=True, reps=100, runs_dir=str(tmp_path / "runs"),
                        experiments_file=str(tmp_path / "mine.toml"), out_dir=str(tmp_path / "out")))
    assert {path: path.read_bytes() for path in shipped} == shipped  # the project's results are left alone
    out = tmp_path / "out"
    assert (out / "data" / "mine.csv").exists() and (out / "mine.png").exists()
    with open(out / "summary.csv") as f:
        finals = {row["condition"]: float(row["final_iqm"]) for row in csv.DictReader(f)}
    assert finals == {"pretrained": 65.0, "scratch": 45.0}
    readme = (out / "README.md").read_text()
    assert "| experiment | declared in mine.toml |" in readme
    assert "| `mine` | 4 runs: 2 conditions, seeds 0, 1; default steps | 4 runs (seeds 0, 1), 0 finished" in readme
    assert "### mine\n" in readme
    # the first condition declared is the baseline: both pretrained seeds beat both scratch seeds
    assert "P(better than scratch)" in readme
    rows = {line.split(" | ")[1]: line.split(" | ")[7] for line in readme.splitlines() if "test-hopper" in line}
    assert rows == {"scratch": "-", "pretrained": "1.00 [1.00, 1.00]"}
    # the datasets table holds the experiment's dataset, read from Minari (40 episodes), and no other
    import minari

    episodes = minari.load_dataset(tiny_dataset).total_episodes
    datasets = [line for line in readme.splitlines() if line.startswith("| ") and "/medium-v0 |" in line]
    assert len(datasets) == 1 and datasets[0].startswith(f"| {tiny_dataset} | ") and f" | {episodes} | " in datasets[0]


def test_a_panel_without_the_baseline_compares_with_its_first_condition_not_itself(tmp_path, monkeypatch):
    from types import SimpleNamespace

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "mixed.csv", "w", newline="") as f:  # the baseline ran on one dataset only
        writer = csv.writer(f)
        writer.writerow(plot.COLUMNS)
        values = (("base", "a", 0, 10.0), ("other", "a", 0, 20.0), ("first", "b", 0, 30.0), ("second", "b", 0, 40.0),
                  ("first", "b", 1, 31.0), ("second", "b", 1, 41.0))
        for condition, dataset, seed, value in values:
            writer.writerow([condition, f"{dataset}-x-medium-v0", seed, 5000, plot.SCORE, value, "td3bc_pretrain.py",
                             "v1", 1])
    monkeypatch.setitem(plot.FIGURES, "mixed", ("test", "base", (plot.SCORE,)))
    rows, _ = plot.analyse("mixed", SimpleNamespace(reps=100, allow_mixed_versions=False, out_dir=tmp_path))
    improvement = {row["condition"]: row["prob_improvement"] for row in rows}
    assert improvement == {"base": "", "other": 1.0, "first": "", "second": 1.0}
