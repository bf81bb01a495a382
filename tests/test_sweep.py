"""common/sweep.py: a tiny grid through submitit's local and debug executors, re-runs that skip, runs that
resume, failures that are reported, and the SLURM job array it would submit."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

pytest.importorskip("submitit")

GRID = """
[tiny]
script = "td3bc_pretrain.py"
datasets = ["{dataset}"]
seeds = [0, 1]
flags = "--total-steps 300 --pretrain-steps 100 --hidden-dim 64 --eval-episodes 0 --checkpoint-interval 100"
conditions = {{ pretrained = "--pretrain actor-critic", scratch = "--pretrain none" }}

[mixed]
script = "td3bc_pretrain.py"
datasets = ["{dataset}"]
seeds = [0]
flags = "--total-steps 100 --pretrain-steps 50 --hidden-dim 64 --eval-episodes 0"
conditions = {{ good = "", bad = "--batch-size 0", other_script = {{ script = "td3bc_cql_pretrain.py" }} }}

[long]
script = "td3bc_pretrain.py"
datasets = ["{dataset}"]
seeds = [0]
flags = "--total-steps 1000000 --pretrain-steps 100 --hidden-dim 64 --eval-episodes 0 --checkpoint-interval 100"
conditions = {{ scratch = "--pretrain none" }}
"""


@pytest.fixture
def grid(tiny_dataset, tmp_path):
    path = tmp_path / "experiments.toml"
    path.write_text(GRID.format(dataset=tiny_dataset))
    return path


def sweep(grid, work_dir, *args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "common" / "sweep.py"), *map(str, args), "--experiments-file",
                           str(grid), "--work-dir", str(work_dir)], capture_output=True, text=True, env=env,
                          timeout=900)


def starts(log):
    return [line for line in log.read_text().splitlines() if line.startswith("$ ")]


def wait_for_checkpoint(run_dir, process, timeout=300):
    """Until the run has saved its first checkpoint, while the process that trains it is still running."""
    deadline = time.time() + timeout
    while not (run_dir / "checkpoint.pt").exists():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)


@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_grid_runs_each_run_once_and_a_rerun_skips_them(cluster, grid, tmp_path):
    result = sweep(grid, tmp_path, "tiny", "--cluster", cluster, "--jobs", 2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 4 runs finished" in result.stdout
    runs = sorted((tmp_path / "runs" / "tiny").glob("*__s*"))
    assert [r.name for r in runs if r.is_dir()] == [
        "pretrained__test-hopper-medium-v0__s0", "pretrained__test-hopper-medium-v0__s1",
        "scratch__test-hopper-medium-v0__s0", "scratch__test-hopper-medium-v0__s1"]
    for run in (r for r in runs if r.is_dir()):
        assert (run / "model.pt").exists()
        assert len(starts(run.with_name(run.name + ".log"))) == 1  # started once
    again = sweep(grid, tmp_path, "tiny", "--cluster", cluster)
    assert again.returncode == 0 and "4 runs, 4 finished, 0 to run" in again.stdout


def test_an_interrupted_run_is_resumed_not_restarted(grid, tmp_path):
    straight = tmp_path / "straight"
    assert sweep(grid, straight, "tiny").returncode == 0
    # One run of the grid, started by hand with the sweep's own command and stopped after a checkpoint.
    work = tmp_path / "interrupted"
    (work / "runs").mkdir(parents=True)
    command = [line for line in sweep(grid, work, "tiny", "--dry-run").stdout.splitlines()
               if "scratch__test-hopper-medium-v0__s1" in line][0].split()
    process = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_dir = work / "runs" / "tiny" / "scratch__test-hopper-medium-v0__s1"
    wait_for_checkpoint(run_dir, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 143
    result = sweep(grid, work, "tiny")
    assert result.returncode == 0 and "(1 of them resume)" in result.stdout, result.stdout
    log = work / "runs" / "tiny" / "scratch__test-hopper-medium-v0__s1.log"
    assert "--resume" in starts(log)[0]
    a = torch.load(run_dir / "model.pt", weights_only=True)
    b = torch.load(straight / "runs" / "tiny" / run_dir.name / "model.pt", weights_only=True)
    assert all(torch.equal(a["actor"][k], b["actor"][k]) for k in a["actor"])


def test_stopping_a_local_sweep_stops_its_runs_and_they_save(grid, tmp_path):
    """SIGTERM to the sweep reaches each training script, which saves its checkpoint and exits, before the sweep
    says so; no run is left training behind it (a second sweep would then train the same run twice). The sweep
    starts as `nohup ... &` starts it from a script: with SIGINT ignored, which its processes inherit."""
    process = subprocess.Popen([sys.executable, str(REPO / "common" / "sweep.py"), "long", "--jobs", "1",
                                "--experiments-file", str(grid), "--work-dir", str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    run_dir = tmp_path / "runs" / "long" / "scratch__test-hopper-medium-v0__s0"
    wait_for_checkpoint(run_dir, process)
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=120)
    finally:  # on failure, leave nothing training behind the test
        process.kill()
        subprocess.run(["pkill", "-f", f"run-name long/{run_dir.name}"], check=False)
    assert "interrupted: 1 running runs stopped, each saving a checkpoint" in output, output
    assert "interrupted at step" in run_dir.with_name(run_dir.name + ".log").read_text()
    step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]
    time.sleep(2)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == step  # nothing trains on


def test_a_failing_run_is_reported_with_its_log_and_the_others_finish(grid, tmp_path):
    result = sweep(grid, tmp_path, "mixed", "--jobs", 2)
    assert result.returncode == 1
    log = tmp_path / "runs" / "mixed" / "bad__test-hopper-medium-v0__s0.log"
    assert "1 of 3 runs failed:\n  mixed/bad__test-hopper-medium-v0__s0: " in result.stdout
    assert f"see {log}" in result.stdout
    assert "--batch-size must be positive" in log.read_text()
    for good in ("good", "other_script"):
        assert (tmp_path / "runs" / "mixed" / f"{good}__test-hopper-medium-v0__s0" / "model.pt").exists()


def test_slurm_job_array_it_would_submit(grid, tmp_path):
    result = sweep(grid, tmp_path, "tiny", "mixed", "--cluster", "slurm", "--dry-run", "--partition", "gpu",
                   "--gpus-per-job", 1, "--jobs", 3, "--threads", 2, "--timeout-min", 600,
                   "--slurm-setup", "source ~/venv/bin/activate")
    assert result.returncode == 0, result.stderr
    for line in ("#SBATCH --array=0-6%3", "#SBATCH --cpus-per-task=2", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --partition=gpu", "#SBATCH --time=600", "#SBATCH --signal=USR2@120",
                 "source ~/venv/bin/activate", "-m submitit.core._submit"):
        assert line in result.stdout, line
    commands = [line for line in result.stdout.splitlines() if "algos/" in line]
    assert len(commands) == 7 and all("--threads 2" in c for c in commands)


def test_preemption_checkpoints_the_run_and_requeues_it(grid, tmp_path):
    """What submitit calls on SLURM's preemption or time-out signal: the training process saves and stops,
    and the same run is submitted again (where it will resume)."""
    spec = importlib.util.spec_from_file_location("sweep", REPO / "common" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import tomllib

    run = module.expand(tomllib.loads(grid.read_text()), ("tiny",))[0]
    (tmp_path / "runs").mkdir()
    job = module.Job(str(tmp_path / "runs"), 1)
    job.process = subprocess.Popen(run.command(str(tmp_path / "runs"), 1), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "runs" / run.name).glob("events*")):
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    requeued = job.checkpoint(run)
    assert job.process.returncode == 143 and (tmp_path / "runs" / run.name / "checkpoint.pt").exists()
    assert requeued.args == (run,) and isinstance(requeued.function, module.Job)
    assert "--resume" in run.command(str(tmp_path / "runs"), 1)  # what the requeued job will run


def test_datasets_seeds_and_conditions_select_runs_of_the_grid(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('[g]\nscript = "td3bc_pretrain.py"\ndatasets = ["a/x/medium-v0", "b/y/medium-v0"]\n'
                    'seeds = [0, 1]\nconditions = { c = "", d = "--pretrain none" }\n')
    sweep = [sys.executable, str(REPO / "common" / "sweep.py"), "g", "--experiments-file", str(grid), "--datasets",
             "b/y/medium-v0", "--seeds", "1", "--dry-run", "--work-dir", str(tmp_path), "--conditions"]
    result = subprocess.run([*sweep, "c"], capture_output=True, text=True, timeout=120)
    commands = [line for line in result.stdout.splitlines() if "--run-name" in line]
    assert result.returncode == 0 and len(commands) == 1 and "g/c__b-y-medium-v0__s1" in commands[0]
    typo = subprocess.run([*sweep, "e"], capture_output=True, text=True, timeout=120)
    assert typo.returncode == 1 and "error: --conditions e matches none of these runs; they have --conditions c d" \
        in typo.stderr
    seeds = subprocess.run([*sweep[:-1], "--seeds", "7"], capture_output=True, text=True, timeout=120)
    assert seeds.returncode == 1 and "error: --seeds 7 matches none of these runs; they have --seeds 0 1" \
        in seeds.stderr
    nothing = subprocess.run([*sweep[:2], "--dry-run"], capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 1 and "error: name the experiments to run (or all)" in nothing.stderr
    assert "warning: 2 dataset(s)" not in result.stdout and "b/y/medium-v0" in result.stdout.split("\n")[1]


def test_extra_flags_reach_new_and_resumed_runs(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('[g]\nscript = "td3bc_pretrain.py"\ndatasets = ["a/x/medium-v0"]\nseeds = [0, 1]\n'
                    'conditions = { c = "--total-steps 100" }\n')
    (tmp_path / "runs" / "g" / "c__a-x-medium-v0__s1").mkdir(parents=True)
    (tmp_path / "runs" / "g" / "c__a-x-medium-v0__s1" / "checkpoint.pt").write_bytes(b"")  # seed 1 resumes
    result = subprocess.run([sys.executable, str(REPO / "common" / "sweep.py"), "g", "--experiments-file", str(grid),
                             "--extra-flags=--compile --eval-episodes 2", "--dry-run", "--work-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    commands = [line for line in result.stdout.splitlines() if "td3bc_pretrain.py" in line]
    assert result.returncode == 0 and len(commands) == 2, result.stdout + result.stderr
    assert "--total-steps 100" in commands[0] and commands[0].endswith("--compile --eval-episodes 2")
    assert "--resume" in commands[1] and commands[1].endswith("--threads 1 --compile --eval-episodes 2")


def test_a_badly_declared_experiment_is_named_with_what_it_lacks_and_a_copied_script_runs(tmp_path):
    copy = tmp_path / "my_td3bc.py"
    copy.write_text("")
    grid = tmp_path / "grid.toml"
    grid.write_text('[no_seeds]\nscript = "td3bc_pretrain.py"\ndatasets = ["a/x/medium-v0"]\nconditions = { c = "" }\n'
                    '[wrong_path]\nscript = "algos/td3bc_pretrain.py"\ndatasets = ["a/x/medium-v0"]\nseeds = [0]\n'
                    'conditions = { c = "" }\n'
                    f'[copied]\nscript = "{copy}"\ndatasets = ["a/x/medium-v0"]\nseeds = [0]\n'
                    'conditions = { c = "" }\n')

    def dry_run(experiment):
        return subprocess.run([sys.executable, str(REPO / "common" / "sweep.py"), experiment, "--experiments-file",
                               str(grid), "--dry-run", "--work-dir", str(tmp_path)], capture_output=True, text=True,
                              timeout=120)

    no_seeds = dry_run("no_seeds")
    assert no_seeds.returncode == 1 and "error: experiment 'no_seeds' does not say its seeds" in no_seeds.stderr
    assert "Traceback" not in no_seeds.stderr
    wrong_path = dry_run("wrong_path")
    assert wrong_path.returncode == 1 and "runs script 'algos/td3bc_pretrain.py', which is neither a script of " \
        "algos/ (edac_bc_pretrain.py, edac_pretrain.py, td3bc_cql_pretrain.py, td3bc_pretrain.py)" in wrong_path.stderr
    copied = dry_run("copied")
    assert copied.returncode == 0 and f"{copy} --env-id a/x/medium-v0" in copied.stdout, copied.stdout + copied.stderr


def test_a_copy_beside_ones_experiments_file_runs_rather_than_the_projects_script_of_that_name(tmp_path):
    project = tmp_path / "project"
    (project / "variants").mkdir(parents=True)
    for script in ("td3bc_pretrain.py", "variants/my_cql.py"):
        (project / script).write_text("")
    grid = project / "mine.toml"
    scripts = {"copy": "td3bc_pretrain.py", "sub": "variants/my_cql.py", "ours": "edac_pretrain.py"}
    grid.write_text("".join(f'[{name}]\nscript = "{script}"\ndatasets = ["a/x/medium-v0"]\nseeds = [0]\n'
                            'conditions = { c = "" }\n' for name, script in scripts.items()))
    result = subprocess.run([sys.executable, str(REPO / "common" / "sweep.py"), "all", "--experiments-file", str(grid),
                             "--dry-run", "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [line.split()[1] for line in result.stdout.splitlines() if "--env-id a/x/medium-v0" in line]
    assert commands == [str(project / "td3bc_pretrain.py"), str(project / "variants" / "my_cql.py"),
                        str(REPO / "algos" / "edac_pretrain.py")]
