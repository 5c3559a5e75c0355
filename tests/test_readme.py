"""A rehearsal of the README's GPU/ImageNet commands: each command is read from README.md
and run as a user would type it, in order, on CPU in seconds, with overrides appended
(argparse keeps the last value of a repeated flag): tiny steps and sizes, a generated
ImageFolder with images of mixed sizes in place of /data/imagenet, random weight files
under the official file names, the GAN starting inside the run, torchrun with 2 gloo
processes where the README says torchrun, and --compile kept on with a backend that
compiles in seconds. A README edit that breaks a command fails here."""
import os
import re
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_tokenizer.py", "train_diffusion.py", "sample.py", "evaluate.py")
TINY_ENCODER = "--encoder-depth 1 --encoder-dim 32 --encoder-heads 2 --encoder-patch 4 --encoder-native-size 16"
STAGE_1 = (f"--steps 3 --image-size 32 --encoder-size 16 --batch-size 2 --workers 0 --log-every 1 --disc-start 1 "
           f"--disc-layers 2 --stats-images 8 --compile-backend aot_eager --latent-channels 4 --decoder-width 16 "
           f"--decoder-multipliers 1 1 2 2 --decoder-res-blocks 0 {TINY_ENCODER}")
OVERRIDES = {   # by script (and evaluate.py's command)
    "train_tokenizer.py --stage 1": STAGE_1,
    "train_tokenizer.py --stage 2": STAGE_1[:STAGE_1.index("--latent-channels")],   # the model comes from --init
    "train_tokenizer.py --stage 3": STAGE_1[:STAGE_1.index("--latent-channels")],
    "train_diffusion.py": "--steps 3 --batch-size 2 --workers 0 --depth 1 --hidden-size 32 --num-heads 2 "
                          "--log-every 1 --sample-steps 2 --cache-batch-size 8 --compile-backend aot_eager",
    "sample.py": "--num-samples 10 --steps 2 --batch-size 2 --shard-size 4 --device cpu",   # 3 shards, 2 ranks
    "evaluate.py metrics": "--batch-size 5 --device cpu",
    "evaluate.py recon": "--batch-size 5 --workers 0 --device cpu --num-images 8",
}


def readme_commands(section, end):
    """The shell commands of the ```bash blocks between two headings of README.md, with
    continuation lines joined and comments dropped."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    text = text[text.index(section):text.index(end, text.index(section))]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rehearsal(command, data_root):
    """argv of a README command, scaled down: the script from the repository, 2 processes
    for torchrun, /data/imagenet replaced and the OVERRIDES appended."""
    words = shlex.split(command.replace("/data/imagenet", data_root))
    script = next(w for w in words if w in SCRIPTS)
    rest = words[words.index(script) + 1:]
    if words[0] == "torchrun":
        assert any(w.startswith("--nproc_per_node") for w in words[:words.index(script)])
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    else:
        assert words[0] == "python", command
        launcher = [sys.executable]
    key = script
    if script == "train_tokenizer.py":
        key += " --stage " + rest[rest.index("--stage") + 1]
    elif script == "evaluate.py":
        key += " " + rest[0]
    extra = shlex.split(OVERRIDES[key])
    return launcher + [os.path.join(ROOT, script)] + rest + extra


def make_image_folder(root, classes=3, per_class=4, seed=0):
    """An ImageFolder tree of small RGB images of mixed sizes and aspect ratios (and one
    grey-scale file), as ImageNet has."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 36), (64, 48), (33, 70), (50, 50)]
    for c in range(classes):
        folder = os.path.join(root, f"n0{c}")
        os.makedirs(folder)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert("L") if i == 3 else Image.fromarray(pixels)
            image.save(os.path.join(folder, f"img{i}.{'jpg' if i % 2 else 'png'}"))


def make_weight_files(folder):
    """Random weights under the official file names the README uses (small DINOv2; the
    VGG16 trunk without its classifier, which LPIPS drops anyway)."""
    import torchvision
    from inception import load_inception
    from losses import LPIPS
    from tokenizer import load_dinov2
    torch.manual_seed(0)
    encoder = load_dinov2("dinov2_vitl14", depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16)
    torch.save(encoder.state_dict(), os.path.join(folder, "dinov2_vitl14_pretrain.pth"))
    vgg = {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items() if k.startswith("features.")}
    torch.save(vgg, os.path.join(folder, "vgg16-397923af.pth"))
    torch.save({k: torch.rand_like(v) for k, v in LPIPS().heads.state_dict().items()}, os.path.join(folder, "vgg.pth"))
    torch.save(load_inception().state_dict(), os.path.join(folder, "pt_inception-2015-12-05-6726825d.pth"))
    # ADM's reference batch layout: images (arr_0) and its own statistics.
    rng = np.random.default_rng(0)
    features = rng.standard_normal((4096, 2048)).astype(np.float32)
    spatial = rng.standard_normal((4096, 2023)).astype(np.float32)
    np.savez(os.path.join(folder, "VIRTUAL_imagenet256_labeled.npz"),
             arr_0=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
             mu=features.mean(0), sigma=np.cov(features, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))


def run(argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    data = folder / "imagenet"
    make_image_folder(str(data / "train"))
    make_image_folder(str(data / "val"), seed=1)
    make_weight_files(str(folder))
    return folder, str(data)


def test_readme_gpu_commands_run_scaled_down(rehearsal):
    folder, data = rehearsal
    training = readme_commands("## Real data and real DINOv2 (GPU)", "### Sampling and evaluation")
    evaluation = readme_commands("### Sampling and evaluation", "## Results")
    scripts = [next(w for w in shlex.split(c) if w in SCRIPTS) for c in training + evaluation]
    assert scripts == ["train_tokenizer.py"] * 3 + ["train_diffusion.py", "sample.py", "evaluate.py", "evaluate.py"]
    for command in training + evaluation:
        assert "--compile" in command or "train_" not in command, command    # compile stays on as written
        run(as_rehearsal(command, data), str(folder))

    # What each step handed to the next: the GAN and LPIPS ran in every stage, the
    # discriminator was carried from stage to stage, and the DiT trained on the latents.
    runs = folder / "runs" / "in1k"
    stages = [torch.load(runs / f"stage{s}" / "checkpoint.pt", weights_only=True) for s in (1, 2, 3)]
    for checkpoint in stages:
        assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2 and "discriminator" in checkpoint
        assert checkpoint["args"]["compile"] and checkpoint["args"]["perceptual_weight"] == 1.0
    assert stages[0]["gan_start"] == 1 and stages[1]["gan_start"] == 0 and stages[2]["gan_start"] == 0
    dit = torch.load(runs / "dit-xl" / "checkpoint.pt", weights_only=True)
    assert dit["step"] == 3 and dit["model_config"]["num_classes"] == 3
    with np.load(folder / "samples.npz") as samples:
        assert samples["arr_0"].shape == (10, 32, 32, 3) and samples["arr_1"].tolist() == [0, 1, 2] * 3 + [0]
    for name in ("metrics.json", "recon.json"):
        assert (folder / name).is_file(), name
