"""run_demo.sh end to end at a tiny fraction of its size: every command of the demo runs,
and the run folder gets its checkpoints, pictures and metrics."""
import json
import os
import subprocess
import sys

from PIL import Image


def test_demo_pipeline_end_to_end(tmp_path):
    run = tmp_path / "demo"
    env = dict(os.environ, DEMO_SCALE="0.005", DEMO_IMAGES="200", DEMO_SAMPLES="20", DEMO_EVAL_IMAGES="40",
               OMP_NUM_THREADS="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    result = subprocess.run(["bash", "run_demo.sh", str(run)], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("stage0", "stage1", "stage2", "stage3", "dit"):
        assert (run / stage / "checkpoint.pt").is_file(), stage
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("psnr", "ssim", "fd_stand_in_reconstructions", "fd_stand_in_samples", "linear_probe_latents",
                "class_agreement_samples"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert metrics["num_samples"] == 20 and 0 <= metrics["class_agreement_samples"] <= 1
    # recon.png: originals over reconstructions (2 rows); samples.png: one row per class (10 rows).
    with Image.open(run / "recon.png") as recon, Image.open(run / "samples.png") as samples:
        assert recon.size[1] == 2 * 32 + 3 * 2
        assert samples.size[1] == 10 * 32 + 11 * 2
    assert "demo finished" in result.stdout
