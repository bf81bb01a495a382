"""Run grids of training runs (seeds x datasets x conditions) on this machine or on a SLURM cluster.

Experiments are declared as data in a TOML file (benchmark_results/experiments.toml): a script, fixed flags,
and axes: seeds, datasets and conditions (named flag sets, optionally with their own script). Each run gets
a stable name, runs/<experiment>/<condition>__<dataset>__s<seed>, so the sweep can be repeated at will:
finished runs (model.pt) are skipped, interrupted ones resumed (--resume, from their checkpoint.pt), the
rest started. The engine is submitit: its local executor runs the jobs as subprocesses here, at most --jobs
at a time; on SLURM the grid is one job array, and a preempted or timed-out job checkpoints (the training
script saves on SIGTERM) and is requeued, to resume where it stopped.

    python common/sweep.py sampled_hopper_td3bc --dry-run             # the commands, one per line
    python common/sweep.py sampled_hopper_td3bc lambda --jobs 2 --threads 1
    python common/sweep.py all --cluster slurm --partition gpu --gpus-per-job 1 --jobs 32 --timeout-min 720
    python common/sweep.py mine --experiments-file my_experiments.toml   # your own, declared as below

An experiment is a TOML table: `script` (a script of algos/, or the path of your own copy, absolute or relative
to the TOML file's folder, where a copy wins over algos/'s script of the same name), `datasets` and `seeds`
(lists), `conditions` (condition name -> its flags, or a table that may also set its own script, datasets and
seeds; plot.py compares each with the first) and optionally `flags`, given to every run:

    [mine]
    script = "td3bc_pretrain.py"
    datasets = ["local/hopper/medium-v0"]
    seeds = [0, 1, 2]
    flags = "--total-steps 100000 --eval-interval 5000"
    conditions = { scratch = "--pretrain none", pretrained = "--pretrain actor-critic" }
"""

import importlib.metadata
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal, Optional

import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    experiments: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="EXPERIMENT...")]
    """experiment names from --experiments-file, or all"""
    experiments_file: str = str(ROOT / "benchmark_results" / "experiments.toml")
    """the TOML file that declares the experiments"""
    seeds: Optional[tuple[int, ...]] = None
    """only these seeds of each experiment (None: all it declares)"""
    datasets: Optional[tuple[str, ...]] = None
    """only the runs on these datasets (None: all it declares)"""
    conditions: Optional[tuple[str, ...]] = None
    """only the runs of these conditions (None: all it declares)"""
    jobs: int = 2
    """runs at a time: local processes, or SLURM's array parallelism"""
    threads: int = 1
    """torch CPU threads per run (passed as --threads; on SLURM also the CPUs per task)"""
    cluster: Literal["local", "slurm", "debug"] = "local"
    """local: subprocesses here; slurm: one job array; debug: one run after another in this process"""
    partition: Optional[str] = None
    """SLURM partition (None: the cluster's default)"""
    gpus_per_job: int = 0
    """GPUs per run on SLURM (the scripts use one)"""
    timeout_min: int = 24 * 60
    """wall-clock limit per job in minutes (on SLURM a job that reaches it checkpoints and is requeued)"""
    slurm_setup: tuple[str, ...] = ()
    """shell lines each SLURM job runs first, e.g. 'source ~/venv/bin/activate'"""
    work_dir: str = "."
    """the runs go to <work-dir>/runs/<experiment>/, as the scripts write them when started there"""
    extra_flags: str = ""
    """flags added to every run's command, new or resumed, such as --extra-flags=--compile on a GPU (with the =;
    a resumed run accepts only the flags it may change, which the scripts' --resume help lists)"""
    dry_run: bool = False
    """print each run's command (and on SLURM the batch script) without running anything"""


@dataclass
class TrainingRun:
    """One run of the grid: its name, script and flags."""

    name: str
    script: str  # as declared, which plot.py records
    flags: list
    path: str  # the file that runs: the declared script beside the experiments file, else algos/'s
    extra_flags: tuple = ()  # --extra-flags: for this machine (--compile), not part of the experiment

    def command(self, runs_dir: str, threads: int) -> list:
        """The command that finishes this run from wherever it stands: resume if it saved a checkpoint."""
        run_dir = Path(runs_dir) / self.name
        script = [sys.executable, self.path]
        if (run_dir / "checkpoint.pt").exists():
            return [*script, "--resume", str(run_dir), "--threads", str(threads), *self.extra_flags]
        return [*script, *self.flags, "--run-name", self.name, "--threads", str(threads), *self.extra_flags]


def expand(experiments: dict, names, folder=ROOT / "benchmark_results") -> list:
    """The grid of each named experiment as TrainingRuns, seed by seed (so that a grid stopped half-way has
    whole seeds of every condition). A script path is taken from `folder`, the experiments file's, so that
    a copy beside one's own TOML file runs rather than algos/'s script of the same name."""
    runs = []
    for name in (experiments if names == ("all",) else names):
        if name not in experiments:
            raise SystemExit(f"error: no experiment '{name}' in the experiments file; it declares: "
                             f"{', '.join(experiments)}. Declare yours in a TOML file and pass it "
                             "with --experiments-file (common/sweep.py --help shows one).")
        spec, grid = experiments[name], []
        missing = [key for key in ("script", "datasets", "seeds", "conditions") if key not in spec]
        if missing:
            raise SystemExit(f"error: experiment '{name}' does not say its {', '.join(missing)}; an experiment "
                             "needs script, datasets, seeds and conditions (common/sweep.py --help shows one).")
        for condition, setting in spec["conditions"].items():
            setting = {"flags": setting} if isinstance(setting, str) else setting
            script = setting.get("script", spec["script"])
            path = next((p for p in (Path(folder) / script, ROOT / "algos" / script) if p.is_file()), None)
            if path is None:
                raise SystemExit(f"error: experiment '{name}' runs script '{script}', which is neither a script of "
                                 f"algos/ ({', '.join(sorted(p.name for p in (ROOT / 'algos').glob('*.py')))}) nor "
                                 f"a file at that path relative to {Path(folder).resolve()}, the experiments file's "
                                 "folder.")
            for dataset in setting.get("datasets", spec["datasets"]):
                for seed in setting.get("seeds", spec["seeds"]):
                    flags = ["--env-id", dataset, "--seed", str(seed), *shlex.split(spec.get("flags", "")),
                             *shlex.split(setting.get("flags", ""))]
                    run_name = f"{name}/{condition}__{dataset.replace('/', '-')}__s{seed}"
                    grid.append((seed, TrainingRun(run_name, script, flags, str(path.resolve()))))
        runs += [run for _, run in sorted(grid, key=lambda item: item[0])]  # stable: conditions keep their order
    return runs


class Job:
    """What each submitit job runs: one training run to its end, as a subprocess whose output goes to
    runs/<name>.log. On SLURM, submitit calls `checkpoint` when the job is preempted or about to time out:
    the training process gets SIGTERM, saves its checkpoint and exits, and the job is requeued to resume."""

    def __init__(self, runs_dir: str, threads: int):
        self.runs_dir, self.threads, self.process = runs_dir, threads, None

    def __call__(self, run: TrainingRun) -> str:
        run_dir = Path(self.runs_dir) / run.name
        if (run_dir / "model.pt").exists():
            return "already finished"
        if run_dir.exists() and not (run_dir / "checkpoint.pt").exists():
            shutil.rmtree(run_dir)  # started but stopped before saving anything: start it again
        log = Path(self.runs_dir) / f"{run.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = run.command(self.runs_dir, self.threads)
        with open(log, "a") as out:
            out.write(f"# {provenance()}\n$ {shlex.join(command)}\n")
            out.flush()
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONWARNINGS": "ignore"}
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            cwd=Path(self.runs_dir).resolve().parent)  # the scripts write to runs/
            pid_file = pid_path(self.runs_dir, run)
            pid_file.write_text(str(self.process.pid))  # how a local sweep that is stopped reaches the script
            try:
                code = self.process.wait()
            except KeyboardInterrupt:  # the job is being cancelled: the run saves its checkpoint first
                self.process.send_signal(signal.SIGTERM)
                self.process.wait()
                raise
            finally:
                pid_file.unlink(missing_ok=True)
        if code != 0:
            raise RuntimeError(f"{run.name} exited with {code}; see {log}")
        return "finished"

    def checkpoint(self, run: TrainingRun):
        import submitit

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the script saves and exits
            self.process.wait()
        return submitit.helpers.DelayedSubmission(Job(self.runs_dir, self.threads), run)


def provenance() -> str:
    """The code, packages and machine a run (re)starts on, for its log."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "not a git checkout"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    packages = []
    for name in ("torch", "minari", "gymnasium", "mujoco", "numpy"):
        try:
            packages.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"commit {commit}; {', '.join(packages)}; {cpu}, {os.cpu_count()} cores"


def slurm_parameters(args: Args) -> dict:
    """What the job array asks SLURM for: one task per run, --threads CPUs, --gpus-per-job GPUs, the time limit;
    USR2 two minutes before it, on which submitit checkpoints the run and requeues it."""
    return dict(job_name="first-imitate", time=args.timeout_min, ntasks_per_node=1, cpus_per_task=args.threads,
                array_parallelism=args.jobs, signal_delay_s=120, setup=list(args.slurm_setup),
                **({"partition": args.partition} if args.partition else {}),
                **({"gpus_per_node": args.gpus_per_job} if args.gpus_per_job else {}))


def make_executor(args: Args, folder: Path):
    import submitit

    if args.cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    if args.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        # Without a timeout the local executor kills a job after 2 minutes.
        executor.update_parameters(timeout_min=args.timeout_min)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=100)
    executor.update_parameters(**slurm_parameters(args))
    return executor


def slurm_batch_script(args: Args, folder: Path, num_runs: int) -> str:
    """The sbatch script that submitit writes for a job array of `num_runs` runs (also off a cluster)."""
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([sys.executable, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=submitit.core.utils.JobPaths.get_first_id_independent_folder(
        folder), map_count=num_runs, **slurm_parameters(args))


def run_locally(executor, job, runs, limit):
    """Submit at most `limit` runs at a time (the local executor would start them all at once). Ctrl-C or
    SIGTERM stops the running ones the same way (each saves its checkpoint) and starts no more."""
    pending, running, failures = list(runs), [], []
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        while pending or running:
            pending, running = step_locally(executor, job, pending, running, limit, failures)
    except KeyboardInterrupt:
        # SIGTERM straight to each training script, which saves its checkpoint and exits. submitit's cancel alone
        # sends SIGINT, which a sweep started in the background (nohup ... &) and its processes ignore.
        pid_files = [pid_path(job.runs_dir, run) for run, _ in running]
        for pid_file in pid_files:
            signal_run(pid_file, signal.SIGTERM)
        deadline = time.time() + 300
        while any(signal_run(pid_file, 0) for pid_file in pid_files) and time.time() < deadline:
            time.sleep(0.5)
        for run, handle in running:
            handle.cancel(check=False)
        still = [p.stem for p in pid_files if signal_run(p, 0)]
        raise SystemExit(f"\ninterrupted: {len(running) - len(still)} running runs stopped, each saving a "
                         "checkpoint once it had begun training, and "
                         f"{len(pending)} did not start; run the same command again to go on."
                         + (f" Still running after 5 minutes: {', '.join(still)}." if still else ""))
    return failures


def pid_path(runs_dir, run) -> Path:
    return Path(runs_dir) / f"{run.name}.pid"


def signal_run(pid_file: Path, signum) -> bool:
    """Send `signum` to the training script whose pid the file holds (0 only asks whether it still runs);
    False when there is no such file or process."""
    try:
        os.kill(int(pid_file.read_text()), signum)
        return True
    except (OSError, ValueError):
        return False


def step_locally(executor, job, pending, running, limit, failures):
    while pending and len(running) < limit:
        run = pending.pop(0)
        running.append((run, executor.submit(job, run)))
        print(f"started {run.name}", flush=True)
    time.sleep(0.5)
    for run, handle in [r for r in running if r[1].done()]:
        running.remove((run, handle))
        try:
            print(f"{run.name}: {handle.result()}", flush=True)
        except Exception as e:  # a failed run does not stop the others
            failures.append((run.name, last_line(e)))
            print(f"{run.name}: FAILED", flush=True)
    return pending, running


def last_line(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if "exited with" in line]
    return lines[-1].strip() if lines else str(error).strip().splitlines()[-1]


def warn_missing_datasets(runs) -> None:
    """Name the local datasets the runs need that this machine does not have (each run would fail at once)."""
    import minari

    needed = {run.flags[run.flags.index("--env-id") + 1] for run in runs}
    missing = sorted(d for d in needed if "/" in d and d.split("/")[0] not in ("mujoco", "D4RL")
                     and d not in minari.list_local_datasets())
    if missing:
        print(f"warning: {len(missing)} dataset(s) these runs need are not on this machine: {', '.join(missing)}. "
              "Make them first: benchmark_results/README.md, 'How to reproduce', has the commands.")


def select(runs, values, key, flag) -> list:
    """The runs whose key(run) is among values (all when values is None); a value that matches no run is an
    error that lists what the runs have."""
    if values is None:
        return runs
    declared = sorted({key(run) for run in runs})
    unknown = [value for value in values if value not in declared]
    if unknown:
        raise SystemExit(f"error: {flag} {' '.join(map(str, unknown))} matches none of these runs; they have "
                         f"{flag} {' '.join(map(str, declared))}")
    return [run for run in runs if key(run) in values]


def main(args: Args) -> None:
    with open(args.experiments_file, "rb") as f:
        experiments = tomllib.load(f)
    if not args.experiments:
        raise SystemExit(f"error: name the experiments to run (or all); {args.experiments_file} declares: "
                         f"{', '.join(experiments)}")
    runs = expand(experiments, args.experiments, Path(args.experiments_file).parent)
    runs = select(runs, args.seeds, lambda run: int(run.name.rsplit("__s", 1)[1]), "--seeds")
    runs = select(runs, args.datasets, lambda run: run.flags[run.flags.index("--env-id") + 1], "--datasets")
    runs = select(runs, args.conditions, lambda run: run.name.split("/", 1)[1].split("__")[0], "--conditions")
    runs = [replace(run, extra_flags=tuple(shlex.split(args.extra_flags))) for run in runs]
    runs_dir = (Path(args.work_dir) / "runs").resolve()
    todo = [run for run in runs if not (runs_dir / run.name / "model.pt").exists()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run "
          f"({sum((runs_dir / r.name / 'checkpoint.pt').exists() for r in todo)} of them resume)")
    folder = runs_dir / ".submitit"
    warn_missing_datasets(todo)
    if args.dry_run:
        for run in todo:
            print(shlex.join(run.command(str(runs_dir), args.threads)))
        if args.cluster == "slurm" and todo:
            print(slurm_batch_script(args, folder, len(todo)))
        return
    if not todo:
        return
    executor, job = make_executor(args, folder), Job(str(runs_dir), args.threads)
    if args.cluster == "slurm":
        handles = executor.map_array(job, todo)
        print(f"submitted job array {handles[0].job_id.split('_')[0]} ({len(handles)} runs, {args.jobs} at a time); "
              f"each run's output goes to {runs_dir}/<experiment>/<run>.log")
        return
    if args.cluster == "debug":
        failures = []
        for run in todo:
            try:
                print(f"{run.name}: {executor.submit(job, run).result()}", flush=True)
            except Exception as e:
                failures.append((run.name, last_line(e)))
    else:
        failures = run_locally(executor, job, todo, args.jobs)
    if failures:
        print(f"{len(failures)} of {len(todo)} runs failed:")
        for name, reason in failures:
            print(f"  {name}: {reason}")
        raise SystemExit(1)
    print(f"all {len(todo)} runs finished")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
