"""A researcher's first hour: interruptions (SIGINT, SIGTERM) that lose nothing, runs extended on resume,
errors that say what to do, the start-up summary, and using what was trained (common/evaluate.py, W&B)."""

import importlib.util
import os
import signal
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, load_script, run_script, scalars

SCRIPTS = ["td3bc_pretrain.py", "td3bc_cql_pretrain.py", "edac_pretrain.py", "edac_bc_pretrain.py"]
EXTRA = {"edac_pretrain.py": ["--num-critics", 3], "edac_bc_pretrain.py": ["--num-critics", 3]}


def flags(script, tiny_dataset, total=1200, pretrain=600):
    return ["--env-id", tiny_dataset, "--total-steps", total, "--pretrain-steps", pretrain, "--hidden-dim", 64,
            "--log-interval", 100, "--eval-interval", 600, "--eval-episodes", 2, "--checkpoint-interval", 0,
            *EXTRA.get(script, [])]


def start(script, args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "algos" / script), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_training(run_dir, starts=1, timeout=120):
    """Until the run's `starts`-th start has opened its tensorboard log (each start opens one): by then the
    run has taken over SIGINT and SIGTERM."""
    deadline = time.time() + timeout
    while len(list(run_dir.glob("events*"))) < starts:
        assert time.time() < deadline, "the run never started training"
        time.sleep(0.02)


def same_weights(run_a, run_b):
    a, b = (torch.load(run / "model.pt", weights_only=True) for run in (run_a, run_b))
    return all(torch.equal(a[net][k], b[net][k]) for net in ("actor", "critic") for k in a[net])


def untimed_scalars(run_dir):
    """Every logged value but the timings, which differ from one run to the next."""
    return {tag: values for tag, values in scalars(run_dir).items() if tag not in ("charts/SPS", "charts/eval_seconds")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigint_and_sigterm_save_and_resume_bitwise(script, tiny_dataset, tmp_path):
    """Interrupted at arbitrary points with no periodic checkpoint (once by SIGINT, once by SIGTERM), the run
    saves, says how to continue and exits 130 / 143 without a traceback; resumed, it ends bitwise identical to
    an uninterrupted run, and so does its log: the means written after a resume count the steps before it."""
    run_args = flags(script, tiny_dataset)
    assert start(script, [*run_args, "--run-name", "reference"], tmp_path).wait(timeout=600) == 0
    run_dir = tmp_path / "runs" / "interrupted"
    process = start(script, [*run_args, "--run-name", "interrupted"], tmp_path)
    rng = np.random.default_rng(abs(hash(script)) % 2**32)
    for starts, (signum, code) in enumerate(((signal.SIGINT, 130), (signal.SIGTERM, 143)), start=1):
        wait_until_training(run_dir, starts)
        time.sleep(rng.uniform(0.2, 1.5))
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == code, stderr[-2000:]
        assert "Traceback" not in stderr
        assert f"continue with: python {os.path.relpath(REPO / 'algos' / script, tmp_path)} --resume runs/interrupted" \
            in stderr
        process = start(script, ["--resume", "runs/interrupted"], tmp_path)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]
    assert same_weights(tmp_path / "runs" / "reference", run_dir)
    assert untimed_scalars(run_dir) == untimed_scalars(tmp_path / "runs" / "reference")


def test_a_signal_while_an_interrupted_run_closes_its_logs_is_ignored(monkeypatch):
    """Once the checkpoint is saved, a further Ctrl-C (while tensorboard or W&B flush) must not reach the handler
    from before training, which would say that nothing was saved."""
    module = load_script("td3bc_pretrain.py")
    handlers_while_closing = []

    class Closable:
        def close(self):
            handlers_while_closing.append(signal.getsignal(signal.SIGINT))

    run = module.Run.__new__(module.Run)  # only what Run.interrupt uses
    run.args, run.dir, run.stop_signal = module.Args(), "runs/x", signal.SIGINT
    run.progress = run.writer = Closable()
    run.previous_handlers = {signum: module.leave_before_training for signum in (signal.SIGINT, signal.SIGTERM)}

    def leave(code):
        raise InterruptedError(code)

    monkeypatch.setattr(module.os, "_exit", leave)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(InterruptedError, match="130"):
            run.interrupt(5)
        after = signal.getsignal(signal.SIGINT)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert handlers_while_closing == [signal.SIG_IGN] * 2 and after == signal.SIG_IGN


def test_a_second_ctrl_c_never_corrupts_the_checkpoint(tiny_dataset, tmp_path):
    """Two SIGINTs in quick succession: whichever way the run leaves, the checkpoint it leaves (if any) loads
    and resumes to the end."""
    script, run_args = "td3bc_pretrain.py", flags("td3bc_pretrain.py", tiny_dataset)
    for attempt, gap in enumerate((0.0, 0.001, 0.01, 0.05)):
        run_dir = tmp_path / "runs" / f"twice{attempt}"
        process = start(script, [*run_args, "--checkpoint-interval", 50, "--run-name", f"twice{attempt}"], tmp_path)
        wait_until_training(run_dir)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        time.sleep(gap)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
        assert not (run_dir / "checkpoint.pt.tmp").exists()
        if (run_dir / "checkpoint.pt").exists():
            torch.load(run_dir / "checkpoint.pt", weights_only=False)
            assert start(script, ["--resume", run_dir], tmp_path).wait(timeout=600) == 0


@pytest.mark.parametrize("resume_from", ["runs/short", "runs/short/checkpoint.pt"])
def test_resume_extends_a_finished_run_exactly(resume_from, tiny_dataset, tmp_path):
    run_args = flags("td3bc_pretrain.py", tiny_dataset, total=500, pretrain=200)
    assert run_script("td3bc_pretrain.py", *run_args, "--run-name", "long", cwd=tmp_path).returncode == 0
    short = [*run_args[:3], 300, *run_args[4:]]
    assert run_script("td3bc_pretrain.py", *short, "--run-name", "short", cwd=tmp_path).returncode == 0
    result = run_script("td3bc_pretrain.py", "--resume", resume_from, "--total-steps", 500, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert same_weights(tmp_path / "runs" / "long", tmp_path / "runs" / "short")
    extended, straight = scalars(tmp_path / "runs" / "short"), scalars(tmp_path / "runs" / "long")
    assert [s for s, _ in extended["losses/critic"]] == [300, 400, 500]  # the log goes on, no step twice
    assert extended["eval/return"][-1] == straight["eval/return"][-1]


@pytest.mark.parametrize("script, extra, writes", [
    ("td3bc_pretrain.py", ["--total-steps", 300, "--pretrain-steps", 150],
     {"losses/pretrain_actor": [100, 150], "losses/critic": [200, 300]}),
    ("edac_pretrain.py", ["--total-steps", 300, "--pretrain-steps", 200, "--num-critics", 3],  # soft BC ends at 100
     {"losses/pretrain_actor": [80, 100], "losses/pretrain_critic": [160, 200], "losses/critic": [240, 300]}),
])
def test_each_phase_writes_its_own_metrics_at_its_last_step(script, extra, writes, tiny_dataset, tmp_path):
    """A phase that ends between two --log-interval writes has its last steps written at its end, not averaged
    into the next phase's first write."""
    result = run_script(script, "--env-id", tiny_dataset, *extra, "--hidden-dim", 32, "--log-interval", 80 if
                        script.startswith("edac") else 100, "--eval-episodes", 0, "--run-name", "r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    logged = scalars(tmp_path / "runs" / "r")
    assert {tag: [step for step, _ in logged[tag]] for tag in writes} == writes


def test_pretrain_none_says_that_it_drops_pretrain_steps(tiny_dataset, tmp_path):
    result = run_script("td3bc_pretrain.py", "--env-id", tiny_dataset, "--pretrain", "none", "--pretrain-steps", 100,
                        "--total-steps", 50, "--hidden-dim", 32, "--eval-episodes", 0, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: --pretrain none trains from scratch; --pretrain-steps 100 is ignored" in result.stdout
    assert "50 gradient steps: TD3+BC" in result.stdout


@pytest.mark.parametrize("extra, expected", [
    ([], "has finished its 300 steps; pass a larger --total-steps"),
    (["--total-steps", 500, "--alpha", 3.0], "--alpha cannot change when resuming"),
    (["--seed", 4, "--alpha", 3.0], "--seed cannot change when resuming (the run has 0, given 4); --alpha cannot"),
    (["--total-steps", 100], "would end it before that"),
])
def test_resume_refuses_what_it_cannot_do(extra, expected, tiny_dataset, tmp_path):
    run_args = flags("td3bc_pretrain.py", tiny_dataset, total=300, pretrain=200)
    assert run_script("td3bc_pretrain.py", *run_args, "--run-name", "done", cwd=tmp_path).returncode == 0
    result = run_script("td3bc_pretrain.py", "--resume", "runs/done", *extra, cwd=tmp_path)
    assert result.returncode != 0 and expected in result.stderr and "Traceback" not in result.stderr


def test_a_resumed_run_is_not_told_to_change_its_pretraining(tiny_dataset, tmp_path):
    """A run stopped during a long pre-training cannot end before it: the advice is a --total-steps that
    works, not a --pretrain-steps that resuming refuses."""
    run_args = flags("td3bc_pretrain.py", tiny_dataset, total=300, pretrain=200)
    assert run_script("td3bc_pretrain.py", *run_args, "--run-name", "long", cwd=tmp_path).returncode == 0
    path = tmp_path / "runs" / "long" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=False)  # as if stopped at step 300 of a 1000-step pre-training
    torch.save({**checkpoint, "args": {**checkpoint["args"], "pretrain_steps": 1000, "total_steps": 2000}}, path)
    result = run_script("td3bc_pretrain.py", "--resume", "runs/long", "--total-steps", 500, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "pass a --total-steps of at least 1000" in result.stderr and "pass --pretrain-steps" not in result.stderr


def test_reusing_a_run_name_is_refused(tiny_dataset, tmp_path):
    run_args = flags("td3bc_pretrain.py", tiny_dataset, total=100, pretrain=50)
    assert run_script("td3bc_pretrain.py", *run_args, "--run-name", "taken", cwd=tmp_path).returncode == 0
    result = run_script("td3bc_pretrain.py", *run_args, "--run-name", "taken", cwd=tmp_path)
    assert result.returncode != 0 and "--resume runs/taken" in result.stderr
    assert len(list((tmp_path / "runs" / "taken").glob("events*"))) == 1


def test_start_up_summary_and_threads(tiny_dataset, tmp_path):
    result = run_script("edac_pretrain.py", *flags("edac_pretrain.py", tiny_dataset, total=200, pretrain=100),
                        "--threads", 1, "--eval-interval", 100, "--run-name", "summary", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for text in ("test/hopper/medium-v0, 795 transitions in 40 episodes", "device cpu (1 thread)",
                 "soft BC of the actor (50 steps), then the critics on soft returns (50 steps), then EDAC with N = 3",
                 "writing to runs/summary", "evaluation every 100 steps and at the end, on 2 episodes"):
        assert text in result.stdout, result.stdout
    result = run_script("td3bc_pretrain.py", *flags("td3bc_pretrain.py", tiny_dataset, total=20, pretrain=10),
                        "--run-name", "short", cwd=tmp_path)  # --eval-interval 600 > --total-steps 20
    assert result.returncode == 0 and "evaluation at the end, on 2 episodes" in result.stdout, result.stderr
    result = run_script("td3bc_pretrain.py", *flags("td3bc_pretrain.py", tiny_dataset, total=20, pretrain=10),
                        "--eval-episodes", 0, "--run-name", "blind", cwd=tmp_path)
    assert result.returncode == 0 and "no evaluation (--eval-episodes 0)" in result.stdout, result.stderr


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args, expected", [
    (["--device", "cuda"], "sees no CUDA GPU here; use --device cpu"),
    (["--device", "mps"], "--device mps, but this torch"),  # a Mac's GPU flag on a machine without one
    (["--env-id", "local/hopper/medium-replay-v0"], "test/hopper/medium-v0"),  # it lists what is here
    (["--env-id", "walker2d-medium-replay-v2"], "python common/make_dataset.py --env-id Walker2d-v5"),
    (["--env-id", "hopper-mediun-v2"], "Did you mean hopper-medium-v2?"),
    (["--env-id", "test/hopper/mediun-v0"], "Did you mean test/hopper/medium-v0?"),
    (["--env-id", "test/hopper/medium-v0", "--total-steps", 100], "(10000, this dataset's default)"),
    (["--env-id", "Hopper-v5"], "python common/make_dataset.py --env-id Hopper-v5"),  # a Gymnasium id
    (["--env-id", "test/hopper/medium-v0", "--alpha", -1], "--alpha must not be negative"),
])
def test_errors_say_what_to_do(args, expected, tiny_dataset, tmp_path):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available() or \
            args[:2] == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has that GPU")
    started = time.time()
    result = run_script("td3bc_pretrain.py", *(["--env-id", tiny_dataset] if args[0] == "--device" else []), *args,
                        cwd=tmp_path)
    assert result.returncode != 0 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.time() - started < 30  # no network retries for ids Minari does not host


@pytest.mark.parametrize("args, expected, unexpected", [
    (["--env-id", "hoper-medium-v2"], "Did you mean hopper-medium-v2?", "Hoper-v5"),  # no command for a typo
    (["--env-id", "test/hopper/medium-v0", "--total-steps", -5], "--total-steps must be positive, got -5",
     "--pretrain-steps -"),  # no advice computed from the bad number
])
def test_errors_about_one_thing_say_nothing_about_another(args, expected, unexpected, tiny_dataset, tmp_path):
    result = run_script("td3bc_pretrain.py", *args, cwd=tmp_path)
    assert result.returncode != 0 and expected in result.stderr and unexpected not in result.stderr, result.stderr
    assert not any(line.endswith(" ") for line in result.stderr.splitlines()), repr(result.stderr)


@pytest.mark.parametrize("script", ["td3bc_cql_pretrain.py", "edac_pretrain.py"])
def test_resuming_with_another_script_is_refused(script, tiny_dataset, tmp_path):
    run_args = flags("td3bc_pretrain.py", tiny_dataset, total=100, pretrain=50)
    assert run_script("td3bc_pretrain.py", *run_args, "--run-name", "td3bc", cwd=tmp_path).returncode == 0
    result = run_script(script, "--resume", "runs/td3bc", "--total-steps", 200, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    other = os.path.relpath(REPO / "algos" / "td3bc_pretrain.py", tmp_path)  # a command that works from here
    assert "runs/td3bc is a run of td3bc_pretrain.py" in result.stderr and f"python {other} --resume runs/td3bc" \
        in result.stderr


def test_any_minari_id_resolves_to_its_environment(minari_path):
    from conftest import load_script, make_tiny_dataset

    make_tiny_dataset("tinyhopper-v0", num_episodes=2)  # a local id without a namespace
    module = load_script("td3bc_pretrain.py")
    assert module.resolve_dataset("tinyhopper-v0") == (["tinyhopper-v0"], "tinyhopper", "tinyhopper")
    assert module.resolve_dataset("myteam/hopper-expert-v0") == (["myteam/hopper-expert-v0"], "hopper", "expert")
    for other in ("mujoco/hopper/medium-replay-v0", "hopper/medium-replay-v0"):  # not read as env "medium"
        assert module.resolve_dataset(other)[1:] == ("hopper", "medium-replay")
    assert module.resolve_dataset("myteam/medium-replay-v0")[1:] == ("myteam", "medium-replay")
    assert module.same_env_here("mujoco/hopper/medium-v0", ["local/hopper/medium-v0", "local/walker2d/medium-v0",
                                                            "myteam/hopper-expert-v0"]) \
        == "This machine has local/hopper/medium-v0, myteam/hopper-expert-v0 (pass one to --env-id)."
    assert module.same_env_here("mujoco/hopper/medium-v0", ["local/hopper/medium-v0"]) \
        == "This machine has local/hopper/medium-v0 (pass it to --env-id)."


@pytest.mark.parametrize("script, unset_flags", [*((f"algos/{script}", 7) for script in SCRIPTS),
                                                  ("common/make_dataset.py", 10), ("common/sweep.py", 4)])
def test_help_says_what_each_unset_flag_means(script, unset_flags):
    """A flag whose default is None (set per dataset, or by the run) says in its help what None stands for."""
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "1000"})
    helps = []  # one flag's help each: its line in the box, and those indented below it
    for line in result.stdout.splitlines():
        if line.startswith("│ -"):
            helps.append("")
        if helps and line.startswith("│"):
            helps[-1] += " " + line.strip("│ ")
    unset = [text for text in helps if "(default: None)" in text]
    assert len(unset) >= unset_flags, helps
    assert all("(None: " in text for text in unset), [text for text in unset if "(None: " not in text]


def test_a_copied_script_finds_returns_py_beside_it(tmp_path):
    import shutil

    (tmp_path / "project").mkdir()
    shutil.copy(REPO / "algos" / "edac_pretrain.py", tmp_path / "project")
    shutil.copy(REPO / "common" / "returns.py", tmp_path / "project")
    result = subprocess.run([sys.executable, "project/edac_pretrain.py", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--num-critics" in result.stdout, result.stderr
    assert "Usage:" in result.stdout and "--resume runs/<run-name>" in result.stdout  # --help opens with the docstring
    (tmp_path / "alone").mkdir()  # the script without returns.py: one line says what to copy
    shutil.copy(REPO / "algos" / "td3bc_pretrain.py", tmp_path / "alone")
    result = subprocess.run([sys.executable, "alone/td3bc_pretrain.py", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "needs returns.py beside it" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_d4rl_name_offline_names_every_dataset_to_download(monkeypatch, minari_path, capsys):
    from conftest import load_script

    module = load_script("td3bc_pretrain.py")

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(module.minari, "load_dataset", no_network)
    with pytest.raises(SystemExit) as exit_info:
        module.load_data("walker2d-medium-expert-v2")
    assert "`minari download mujoco/walker2d/medium-v0 mujoco/walker2d/expert-v0`" in str(exit_info.value.code)
    assert "mujoco/walker2d/medium-v0 is not on this machine" in capsys.readouterr().out  # said before the wait


def test_missing_local_dataset_says_how_to_make_it(tiny_dataset, minari_path, tmp_path, monkeypatch):
    result = run_script("td3bc_pretrain.py", "--env-id", "local/hopper/medium-v0", cwd=tmp_path)
    expected = "`python common/make_dataset.py --env-id Hopper-v5` writes local/hopper/random-v0, medium-v0"
    assert expected in result.stderr
    assert "--stop-at expert also expert-v0" in result.stderr  # every quality it can make, so the asked-for one too
    assert f"on this machine (MINARI_DATASETS_PATH={minari_path}; it has: " in result.stderr
    # a namespace of one's own is the one the command writes
    result = run_script("td3bc_pretrain.py", "--env-id", "myteam/hopper/expert-v0", cwd=tmp_path)
    assert "`python common/make_dataset.py --env-id Hopper-v5 --namespace myteam` writes myteam/hopper/random-v0" \
        in result.stderr
    # the earlier protocol's namespaces say how to make data that way, with its own shipped policy
    result = run_script("td3bc_pretrain.py", "--env-id", "local-noise-25ep/hopper/medium-v0", cwd=tmp_path)
    command = "python common/make_dataset.py --env-id Hopper-v5 --protocol mean-plus-noise --namespace local-noise-25ep"
    assert f"`{command}` writes local-noise-25ep/hopper/random-v0" in result.stderr
    assert "behaviour_policies/mean_plus_noise/hopper_medium.npz it writes medium-v0" in result.stderr
    # without MINARI_DATASETS_PATH the message names Minari's default folder, not a setting that is not there
    module = load_script("td3bc_pretrain.py")
    monkeypatch.delenv("MINARI_DATASETS_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        module.load_minari("local/hopper/medium-v0", ["local/hopper/medium-v0"])
    assert "on this machine (in ~/.minari/datasets, as MINARI_DATASETS_PATH is unset; it has: none)" \
        in str(exit_info.value.code)


def test_the_hand_over_line_suggests_mean_target_critics_only_to_a_run_without_them(capsys):
    module = load_script("td3bc_pretrain.py")
    run = module.Run.__new__(module.Run)  # only what Run.log_fit uses
    run.writer = SimpleNamespace(add_scalar=lambda *args: None)
    run.progress = SimpleNamespace(write=print)
    fit = {"pretrain/bc_mse": 0.01, "pretrain/critic_explained_variance": 0.2, "pretrain/q_mean": 10.0,
           "pretrain/target_mean": 50.0}
    lines = {}
    for critic_init in ("paper", "mean-target"):
        run.args = module.Args(critic_init=critic_init)
        run.log_fit(1000, {name: torch.tensor(value) for name, value in fit.items()}, handover=True)
        lines[critic_init] = capsys.readouterr().out
    assert "the critics explain 20.0% of their targets' variance" in lines["mean-target"]
    assert "pre-train longer, or pass --critic-init mean-target" in lines["paper"]
    assert "pre-train longer;" in lines["mean-target"] and "--critic-init" not in lines["mean-target"]


# ---------------------------------------------------------------------------------------- using the result
def load_evaluator():
    spec = importlib.util.spec_from_file_location("evaluate", REPO / "common" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, precision", [("td3bc_pretrain.py", "fp32"), ("edac_bc_pretrain.py", "bf16")])
def test_evaluator_reproduces_the_final_evaluation(script, precision, tiny_dataset, tmp_path):
    result = run_script(script, *flags(script, tiny_dataset, total=300, pretrain=200), "--eval-interval", 300,
                        "--eval-episodes", 3, "--precision", precision, "--run-name", "trained", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "trained"
    model = torch.load(run_dir / "model.pt", weights_only=True)  # tensors and plain values only
    evaluator = load_evaluator()
    policy = evaluator.load_policy(str(run_dir))
    import minari

    envs = [minari.load_dataset(tiny_dataset).recover_environment(eval_env=True) for _ in range(3)]
    returns = evaluator.evaluate(policy, envs, seed=model["args"]["seed"] * 10**8 + 300)
    assert float(np.mean(returns)) == pytest.approx(scalars(run_dir)["eval/return"][-1][1], rel=1e-6)


def test_evaluator_prints_scores_and_writes_videos(tiny_dataset, tmp_path):
    assert run_script("td3bc_pretrain.py", *flags("td3bc_pretrain.py", tiny_dataset, total=100, pretrain=50),
                      "--run-name", "film", cwd=tmp_path).returncode == 0
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(REPO / "common" / "evaluate.py"), "runs/film", "--episodes", "2",
                             "--capture-video"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 episodes from seed 0: return" in result.stdout and "normalised score" in result.stdout
    videos = sorted((tmp_path / "runs" / "film" / "videos").glob("*.mp4"))
    assert len(videos) == 2
    import imageio

    assert imageio.get_reader(videos[0]).count_frames() > 1


@pytest.mark.parametrize("args, expected", [
    (["--episodes", 0], "--episodes must be at least 1"),
    (["--threads", 0], "--threads must be at least 1"),
    (["--capture-video"], "set MUJOCO_GL=egl"),
    (["--device", "cuda"], "sees no CUDA GPU here; use --device cpu"),
    ([], "could not read"),  # the model.pt below is not one
])
def test_evaluator_errors_say_what_to_do(args, expected, tmp_path):
    if (args == ["--device", "cuda"] and torch.cuda.is_available()) or (args == ["--capture-video"] and (
            not sys.platform.startswith("linux") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))):
        pytest.skip("this machine can do it")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"not a model")
    env = {key: value for key, value in os.environ.items() if key != "MUJOCO_GL"}
    result = subprocess.run([sys.executable, str(REPO / "common" / "evaluate.py"), "run", *map(str, args)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_evaluator_says_when_the_run_directory_does_not_exist(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "common" / "evaluate.py"), "runs/nope"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "there is no 'runs/nope'" in result.stderr, result.stderr


def test_evaluator_says_how_to_finish_a_run_and_which_dataset_it_needs(tiny_dataset, tmp_path):
    assert run_script("td3bc_pretrain.py", *flags("td3bc_pretrain.py", tiny_dataset, total=100, pretrain=50),
                      "--run-name", "half", cwd=tmp_path).returncode == 0
    evaluate = [sys.executable, str(REPO / "common" / "evaluate.py"), "runs/half", "--episodes", "1"]
    (tmp_path / "runs" / "half" / "model.pt").rename(tmp_path / "model.pt")  # as if interrupted at its last step
    result = subprocess.run(evaluate, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    resume = f"python {os.path.relpath(REPO / 'algos' / 'td3bc_pretrain.py', tmp_path)} --resume runs/half`"
    assert "stopped at step 100" in result.stderr and resume in result.stderr, result.stderr
    (tmp_path / "project").mkdir()  # evaluate.py copied into a project of one's own, beside a copied script
    for source in (REPO / "common" / "evaluate.py", REPO / "algos" / "td3bc_pretrain.py"):
        shutil.copy(source, tmp_path / "project")
    result = subprocess.run([sys.executable, "project/evaluate.py", *evaluate[2:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert "`python project/td3bc_pretrain.py --resume runs/half`" in result.stderr, result.stderr
    (tmp_path / "model.pt").rename(tmp_path / "runs" / "half" / "model.pt")
    (tmp_path / "elsewhere").mkdir()  # the run copied to a machine without its dataset
    result = subprocess.run(evaluate, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "elsewhere")})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"needs the run's dataset {tiny_dataset}" in result.stderr and "elsewhere" in result.stderr


def test_tracking_with_weights_and_biases_offline(tiny_dataset, tmp_path):
    pytest.importorskip("wandb")
    env_before = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        result = run_script("td3bc_pretrain.py", *flags("td3bc_pretrain.py", tiny_dataset, total=100, pretrain=50),
                            "--track", "--run-name", "tracked", cwd=tmp_path)
    finally:
        os.environ.pop("WANDB_MODE") if env_before is None else os.environ.update(WANDB_MODE=env_before)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "runs" / "tracked" / "wandb").glob("offline-run-*"))


def test_a_resumable_flag_can_go_back_to_its_default(tiny_dataset, tmp_path):
    run_args = flags("td3bc_pretrain.py", tiny_dataset, total=300, pretrain=200)  # --eval-interval 600
    assert run_script("td3bc_pretrain.py", *run_args, "--run-name", "back", cwd=tmp_path).returncode == 0
    result = run_script("td3bc_pretrain.py", "--resume", "runs/back", "--total-steps", 400, "--eval-interval", 5000,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "runs" / "back" / "model.pt", weights_only=True)["args"]["eval_interval"] == 5000


@pytest.mark.parametrize("script, env_id, expected", [
    ("td3bc_pretrain.py", "hopper-medium-v2", dict(alpha=10.0, pretrain_steps=10_000)),
    ("td3bc_pretrain.py", "hopper-medium-expert-v2", dict(alpha=2.5)),
    ("td3bc_pretrain.py", "halfcheetah-medium-expert-v2", dict(alpha=2.5, total_steps=100_000)),
    ("edac_pretrain.py", "walker2d-medium-expert-v2", dict(num_critics=10, eta=5.0)),
    ("edac_pretrain.py", "halfcheetah-medium-v2", dict(num_critics=10, eta=1.0)),
])
def test_per_dataset_defaults_follow_the_d4rl_name(script, env_id, expected):
    """medium-expert resolves to Minari's medium and expert datasets, but takes medium-expert's settings."""
    module = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location(
        script[:-3], REPO / "algos" / script))
    spec.loader.exec_module(module)
    args, _ = module.prepare_args(module.Args(env_id=env_id))
    assert {key: getattr(args, key) for key in expected} == expected
