"""Nothing lost: a run killed with SIGKILL (once in pre-training, once in RL) and resumed ends with
bitwise-identical weights to an uninterrupted run, and its tensorboard log has no duplicated steps."""

import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import minari
import pytest
import torch
from minari.data_collector import EpisodeBuffer

from conftest import REPO, TIME_LIMIT, load_script, make_tiny_dataset, run_script, scalars

TOTAL, PRETRAIN = 400, 200


def start(script, flags, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "algos" / script), *map(str, flags)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_after_checkpoint(process, checkpoint, min_step):
    """SIGKILL the run at whatever step it has reached once its checkpoint holds at least min_step."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {process.stderr.read()[-2000:]}")
        try:
            saved = torch.load(checkpoint, weights_only=False)
            if saved["step"] >= min_step:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return saved["step"], saved["phase"]
        except (FileNotFoundError, EOFError, RuntimeError):
            pass  # not written yet
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared in time")


@pytest.mark.parametrize("script, extra", [
    ("td3bc_pretrain.py", []),
    ("td3bc_cql_pretrain.py", []),
    ("edac_pretrain.py", ["--num-critics", 3, "--lam", 0.2, "--lambda-refresh-interval", 40]),
    ("edac_bc_pretrain.py", ["--num-critics", 3]),
])
def test_killed_and_resumed_run_is_bitwise_identical(script, extra, tiny_dataset, tmp_path):
    flags = ["--env-id", tiny_dataset, "--total-steps", TOTAL, "--pretrain-steps", PRETRAIN, "--hidden-dim", 64,
             "--checkpoint-interval", 10, "--log-interval", 50, "--eval-interval", 200, "--eval-episodes", 2, *extra]
    reference = start(script, [*flags, "--run-name", "reference"], tmp_path)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()

    run_dir = tmp_path / "runs" / "interrupted"
    process = start(script, [*flags, "--run-name", "interrupted"], tmp_path)
    phases = []
    for min_step in (60, PRETRAIN + 60):  # once during pre-training, once during RL
        step, phase = kill_after_checkpoint(process, run_dir / "checkpoint.pt", min_step)
        phases.append((step, phase))
        process = start(script, ["--resume", run_dir], tmp_path)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    assert phases[0][0] < PRETRAIN <= phases[1][0], phases

    expected = torch.load(tmp_path / "runs" / "reference" / "model.pt", weights_only=True)
    resumed = torch.load(run_dir / "model.pt", weights_only=True)
    for network in ("actor", "critic"):
        for name, tensor in expected[network].items():
            assert torch.equal(tensor, resumed[network][name]), f"{network}.{name} differs after resuming"

    logged = scalars(run_dir)
    for tag in ("losses/critic", "eval/normalized_score"):
        steps = [s for s, _ in logged[tag]]
        assert steps == sorted(set(steps)), f"{tag} has duplicated or unordered steps: {steps}"
    assert [s for s, _ in logged["losses/critic"]] == [250, 300, 350, 400]
    assert logged["eval/normalized_score"] == scalars(tmp_path / "runs" / "reference")["eval/normalized_score"]


def test_resume_without_checkpoint_says_what_to_do(tmp_path, minari_path):
    result = subprocess.run([sys.executable, str(REPO / "algos" / "td3bc_pretrain.py"), "--resume", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "no checkpoint.pt" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "runs" / "t1").mkdir(parents=True)
    (tmp_path / "runs" / "t1" / "checkpoint.pt").touch()
    for near_miss in ("t1", "runs/t1/model.pt"):  # the run's name alone, or a file in its directory
        result = subprocess.run([sys.executable, str(REPO / "algos" / "td3bc_pretrain.py"), "--resume", near_miss],
                                capture_output=True, text=True, cwd=tmp_path)
        assert f"no checkpoint.pt in '{near_miss}'" in result.stderr
        assert "Did you mean --resume runs/t1?" in result.stderr


class Recorder:
    """Stands in for the tensorboard writer and the progress bar of a Run."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = value

    def update(self, n):
        pass

    def set_description(self, text):
        pass


def test_logged_means_count_only_the_steps_that_reported():
    module = load_script("td3bc_pretrain.py")
    run = module.Run.__new__(module.Run)  # only what Run.log uses
    run.args = module.Args(log_interval=10, total_steps=100)
    run.writer = run.progress = Recorder()
    run.sums, run.counts, run.last_log, run.phase, run.dir = {}, {}, (time.time() - 1, 0), None, "runs/x"
    for step in range(10):  # the actor reports every other step, as TD3's delayed actor does
        metrics = {"losses/critic": torch.tensor(float(step))}
        if step % 2 == 0:
            metrics["losses/actor"] = torch.tensor(10.0 * step)
        run.log(step + 1, metrics, "TD3+BC")
    assert run.writer.scalars["losses/critic"] == pytest.approx(4.5)
    assert run.writer.scalars["losses/actor"] == pytest.approx(10.0 * (0 + 2 + 4 + 6 + 8) / 5)


def test_exploding_loss_stops_the_run_with_a_message(minari_path, tmp_path):
    """Rewards of 1e30 are finite, but their squared regression error is not in float32."""
    dataset = make_tiny_dataset("test/hopper/huge-rewards-v0", num_episodes=3)
    episodes = [EpisodeBuffer(id=e.id, observations=e.observations, actions=e.actions, rewards=e.rewards * 1e30,
                              terminations=e.terminations, truncations=e.truncations)
                for e in dataset.iterate_episodes()]
    minari.delete_dataset("test/hopper/huge-rewards-v0")
    env = gym.make("Hopper-v5", max_episode_steps=TIME_LIMIT)
    minari.create_dataset_from_buffers("test/hopper/huge-rewards-v0", episodes, env=env)
    result = subprocess.run([sys.executable, str(REPO / "algos" / "td3bc_pretrain.py"),
                             "--env-id", "test/hopper/huge-rewards-v0", "--total-steps", "100",
                             "--pretrain-steps", "50", "--eval-episodes", "0", "--log-interval", "10",
                             "--run-name", "nan"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)
    assert result.returncode != 0
    assert "losses/pretrain_critic became inf by step 10" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "nan" / "checkpoint.pt").exists()


def test_main_called_from_python_resumes_with_the_runs_own_settings(tiny_dataset, tmp_path, monkeypatch):
    """Only the flags that differ from their defaults count as given, as on the command line."""
    flags = ["--env-id", tiny_dataset, "--total-steps", 200, "--pretrain-steps", 100, "--hidden-dim", 64,
             "--eval-episodes", 0, "--alpha", 3.0, "--run-name", "py"]
    assert run_script("td3bc_pretrain.py", *flags, cwd=tmp_path).returncode == 0
    module = load_script("td3bc_pretrain.py")
    monkeypatch.chdir(tmp_path)
    module.main(module.Args(resume=str(tmp_path / "runs" / "py"), total_steps=300, threads=1))
    checkpoint = torch.load(tmp_path / "runs" / "py" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 300 and checkpoint["args"]["alpha"] == 3.0 and checkpoint["args"]["hidden_dim"] == 64
