"""run_demo.sh end to end at a tiny fraction of its size: every command of the demo runs,
and the run folder gets its checkpoints, pictures and metrics."""
import json
import os
import re
import shlex
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The README's walk-through of one ablation by hand, scaled like the tiny demo above.
WALK_THROUGH = {"train_tokenizer.py": "--steps 2 --num-images 200", "train_diffusion.py": "--steps 2 --num-images 200",
                "sample.py": "--num-samples 20", "evaluate.py": "--num-images 40"}


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
    # the wall time of every step of the pipeline, printed and kept in times.txt
    times = (run / "times.txt").read_text().splitlines()
    assert [line.split(" s  ")[1] for line in times] == [
        "stage 0", "stage 1", "stage 2", "stage 3", "latent cache + LightningDiT", "sampling", "evaluation",
        "the whole demo"]
    assert sum(int(line.split(" s  ")[0]) for line in times[:-1]) <= int(times[-1].split(" s  ")[0])

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = re.search(r"One ablation by hand.*?```bash\n(.*?)```", readme, re.S).group(1).replace("\\\n", " ")
    commands = [line.strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 5
    for command in commands:
        words = shlex.split(command.replace("runs/demo", str(run)))
        assert words[0] == "python"
        argv = [sys.executable] + words[1:] + WALK_THROUGH[words[1]].split()
        step = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
        assert step.returncode == 0, command + "\n" + step.stderr[-3000:]
    nosp = json.loads((run / "metrics-nosp.json").read_text())
    assert nosp.keys() == metrics.keys() and (run / "stage2-nosp" / "curves.png").is_file()


def normalised_commands(text, variables):
    """The python command lines of a bash text, with continuations joined, comments
    dropped, run_demo.sh's `timed LABEL` prefix removed and the given variables expanded,
    as lists of words."""
    text = re.sub(r'^timed "[^"]*" ', "", text.replace("\\\n", " "), flags=re.M)
    for name, value in variables.items():
        text = text.replace(name, value)
    commands = []
    for line in text.splitlines():
        line = re.sub(r"\s#.*$", "", line).strip()
        if line.startswith("python "):
            commands.append(shlex.split(line))
    return commands


def test_readme_demo_block_is_run_demo_sh():
    """The README's demo commands are run_demo.sh's, word for word once run_demo.sh's
    variables take their defaults: the rehearsal above then covers both."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "run_demo.sh")) as f:
        script = f.read()
    block = re.search(r"## What the demo does.*?```bash\n(.*?)```", readme, re.S).group(1)
    settings = dict(re.findall(r'^(ENCODER|DECODER|COMMON)="(.*)"$', block, re.M))
    assert settings == dict(re.findall(r'^(ENCODER|DECODER|COMMON)="(.*)"$', script.replace(
        "${DEMO_IMAGES:-10000}", "10000"), re.M))
    expand = {f"${name}": value for name, value in settings.items()}
    from_script = normalised_commands(re.sub(r'"\$\(steps (\d+)\)"', r"\1", script), {
        '"$RUN': '"runs/demo', "${DEMO_IMAGES:-10000}": "10000", "${DEMO_SAMPLES:-500}": "500",
        "${DEMO_EVAL_IMAGES:-1000}": "1000", **expand})
    assert normalised_commands(block, expand) == from_script and len(from_script) == 7
