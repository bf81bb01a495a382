"""The README's quick start, taken from README.md and run as written but with a tiny budget (--medium-size,
--pretrain-steps and --total-steps made small): it must keep working offline, from a fresh dataset to a
printed score, and stay two commands, the second of them the test suite."""

import os
import re
import subprocess

from conftest import REPO


def quick_start():
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- quick start -->", 1)[1].split("<!-- end of quick start -->", 1)[0]
    return re.search(r"```bash\n(.*?)```", block, re.S).group(1).strip().splitlines()


def test_the_quick_start_is_two_commands_and_the_second_runs_the_tests():
    commands = quick_start()
    assert len(commands) == 2 and commands[1] == "python -m pytest tests"
    assert commands[0].startswith("pip install -r requirements.txt && ")


def test_the_quick_start_trains_offline_and_prints_a_score(minari_path, tmp_path):
    command = quick_start()[0].removeprefix("pip install -r requirements.txt && ")  # installed already
    command = re.sub(r"--medium-size \d+", "--medium-size 3000", command)
    command = re.sub(r"--total-steps \d+", "--total-steps 300 --pretrain-steps 150 --eval-episodes 2", command)
    for folder in ("common/", "algos/", "benchmark_results/"):  # run from elsewhere, so runs/ lands in tmp_path
        command = command.replace(f" {folder}", f" {REPO}/{folder}")
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote quickstart/halfcheetah/medium-v0" in result.stdout
    assert re.search(r"final normalised score -?\d+\.\d", result.stdout), result.stdout[-2000:]
