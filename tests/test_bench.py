"""bench.py: the GPU suite's dry run starts every piece on CPU (CI has no GPU), and the
FLOP count behind every achieved-FLOP/s figure is the one of the textbook."""
import os
import subprocess
import sys

import torch

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_dry_run_starts_every_piece():
    result = subprocess.run([sys.executable, "bench.py", "gpu", "--dry-run"], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 8, result.stdout
    assert not [row for row in rows if "error" in row], result.stdout
    assert sum(" ok " in row for row in rows) == 5


def test_flops_of_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    assert bench.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 8 * 64 * 32   # forward, 2 in backward


def test_the_demo_work_row_reads_the_demo_schedule_from_run_demo_sh():
    with open(os.path.join(ROOT, "run_demo.sh")) as f:
        lines = [line for line in f if "--steps" in line]
    steps, samples = bench.demo_schedule()
    assert [f'--steps "$(steps {n})"' in line for n, line in zip(steps, lines)] == [True] * 5
    assert ["train_stand_in.py" in lines[0], "--stage 3" in lines[3], "train_diffusion.py" in lines[4]] == [True] * 3
    assert samples == 500 and bench.DEMO_BATCHES["stage0"] == 64      # run_demo.sh: --batch-size 64 in stage 0
    sample_line = [line for line in lines if "--cfg-scale" in line][0]
    assert f"--batch-size {bench.DEMO_BATCHES['sample']} " in sample_line
