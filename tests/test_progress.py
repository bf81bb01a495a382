"""Progress that tells the truth: one bar over the whole run whose elapsed time never goes back (not at the
hand-over, not around evaluations), and whose rate after a resume counts only the steps run since."""

import re

from conftest import run_script

BAR = re.compile(r"(\d+)/(\d+) \[(\d+):(\d+)<[^,]*, +([\d.]+)step/s")


def bars(stderr):
    """(steps done, elapsed seconds, rate) of every redraw of the training bar."""
    return [(int(m[1]), 60 * int(m[3]) + int(m[4]), float(m[5])) for m in BAR.finditer(stderr)]


def test_elapsed_time_never_goes_back_and_a_resume_reports_its_own_rate(tiny_dataset, tmp_path):
    flags = ["--env-id", tiny_dataset, "--pretrain-steps", 150, "--hidden-dim", 64, "--eval-interval", 100,
             "--eval-episodes", 2, "--run-name", "bar"]
    first = run_script("td3bc_pretrain.py", *flags, "--total-steps", 300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    redraws = bars(first.stderr)
    assert len(redraws) >= 4 and redraws[-1][0] == 300  # a redraw at each phase change and evaluation at least
    elapsed = [seconds for _, seconds, _ in redraws]
    assert elapsed == sorted(elapsed), elapsed

    resumed = run_script("td3bc_pretrain.py", "--resume", tmp_path / "runs" / "bar", "--total-steps", 600,
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done, elapsed, rate = bars(resumed.stderr)[-1]
    # rate x elapsed: the 300 steps this process ran (the bar shows whole seconds), not all 600
    assert done == 600 and 0.5 * 300 < rate * max(elapsed, 1) < 1.5 * 300, (rate, elapsed)


def test_a_log_file_gets_no_cursor_movements(tiny_dataset, tmp_path):
    """A pass over the dataset (here EDAC's entropies for the soft returns) draws its bar on the training bar's
    line: a log file holds carriage-return redraws only, no terminal escape codes."""
    result = run_script("edac_pretrain.py", "--env-id", tiny_dataset, "--total-steps", 60, "--pretrain-steps", 40,
                        "--num-critics", 2, "--hidden-dim", 32, "--eval-episodes", 0, "--run-name", "log", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "entropies for the soft returns" in result.stderr and "\x1b[" not in result.stderr, result.stderr[-2000:]
