"""
Where the time goes: training steps, sampling, peak memory and our networks against their
reference implementations. Every figure is a ratio taken in one process on one machine
(a shared machine's load moves absolute times, not ratios), printed as one table.

    python bench.py                 # the CPU table (README, Performance); 11 min alone on 2 cores
    python bench.py gpu             # the GPU suite: one table, under 8 minutes on one H100
    python bench.py gpu --dry-run   # every piece of the GPU suite started on CPU at tiny sizes (CI)

Achieved FLOP/s: FLOPs counted by torch.utils.flop_counter.FlopCounterMode over one step
(matmuls, convolutions and attention, forward and backward; the optimiser's elementwise
work is not counted), divided by the median step time. On CPU it is divided by the FLOP/s
of a large float32 matmul measured just before, in the same process; on GPU by the chip's
dense bf16 peak (MFU). The reference rows (DINOv2 vs transformers, Inception vs
pytorch-fid) need the test requirements (requirements-dev.txt).
"""
import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dit import create_model, flow_loss, guided_velocity, sample
from inception import load_inception
from losses import LPIPS
from tokenizer import AlignTok, EncoderClassifier, load_dinov2

ROOT = os.path.dirname(os.path.abspath(__file__))
# The demo's sizes (run_demo.sh): 32 px images, a 4-block stand-in encoder with 4 px patches,
# 8x8x16 latents, and a 4-block width-128 DiT.
DEMO_ENCODER = dict(depth=4, embed_dim=128, num_heads=4, patch_size=4, img_size=32)
DEMO_TOKENIZER = dict(latent_channels=16, decoder_width=32, decoder_multipliers=(1, 2, 2), decoder_res_blocks=1,
                      image_size=32, encoder_size=32)
DEMO_DIT = dict(depth=4, hidden_size=128, num_heads=2)
# run_demo.sh's batches: stage 0 at 64, stages 1-3 at train_tokenizer.py's default 32, the DiT
# at 32, sampling at 50. Its step counts are read from run_demo.sh itself (demo_schedule).
DEMO_BATCHES = dict(stage0=64, tokenizer=32, dit=32, sample=50)


#################################################################################
#                               Timing helpers                                  #
#################################################################################

def median(values):
    return sorted(values)[len(values) // 2]


def seconds(fn, repeats, warmup=1):
    """Median seconds of fn() after warm-up calls (the first calls compile and allocate)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return median(times)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def count_flops(fn):
    """FLOPs of one call of fn, counted by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_flops_per_s(n=2048, repeats=5):
    """FLOP/s of a large float32 matmul on this machine now: the CPU rows' yardstick."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / seconds(lambda: a @ b, repeats)


def time_ratio(ours, reference, repeats):
    """Median seconds of ours() and reference(), interleaved so that both see the same
    machine load; one warm-up call each first."""
    with torch.no_grad():
        ours(), reference()
        ours_times, reference_times = [], []
        for _ in range(repeats):
            for fn, times in ((ours, ours_times), (reference, reference_times)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return median(ours_times), median(reference_times)


def table(rows):
    """Prints (what, value, note) rows as one Markdown table."""
    print("| what | value | note |\n|---|---|---|")
    for what, value, note in rows:
        print(f"| {what} | {value} | {note} |")


#################################################################################
#                     Training steps (as the training scripts)                  #
#################################################################################

def dit_step(model, batch_size, device, compiled=False, backend="inductor"):
    """One train_diffusion.py step (flow loss, backward, AdamW) on random latents; returns
    (step function, the function whose FLOPs are counted: the same step, uncompiled)."""
    config = model.config
    x = torch.randn(batch_size, config["in_channels"], config["input_size"], config["input_size"], device=device)
    y = torch.randint(0, config["num_classes"], (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    train_model = torch.compile(model, backend=backend) if compiled else model

    def step(net):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = flow_loss(net, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return lambda: step(train_model), lambda: step(model)


def tokenizer_step(model, stage, batch_size, device):
    """One train_tokenizer.py generator step of stage 1 (adapter + decoder), 2 (all, with
    semantic preservation against a frozen copy) or 3 (decoder), with the demo's losses: L1
    (and L_sp)."""
    model.set_trainable(stage)
    reference = model.frozen_reference() if stage == 2 else None
    images = torch.rand(batch_size, 3, model.image_size, model.image_size, device=device) * 2 - 1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            reconstruction, z, _ = model(images)
            reconstruction = reconstruction.float()
            loss = (reconstruction - images).abs().mean()
            if reference is not None:
                with torch.no_grad():
                    z_ref = reference.encode(images)
                loss = loss + F.mse_loss(z.float(), z_ref.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def demo_tokenizer():
    return AlignTok("dinov2_vits14", DEMO_ENCODER, **DEMO_TOKENIZER)


def vitb_tokenizer():
    """DINOv2-B/14 at 224 px with the default decoder to 256 px (16x16x32 latents)."""
    return AlignTok("dinov2_vitb14", None, latent_channels=32, image_size=256, encoder_size=224)


def stand_in_step(batch_size):
    """One stage-0 step: the stand-in classifier at demo size, cross-entropy, AdamW."""
    model = EncoderClassifier(load_dinov2("dinov2_vits14", **DEMO_ENCODER).config, 10, DEMO_TOKENIZER["encoder_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.rand(batch_size, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (batch_size,))

    def step():
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def achieved_fraction(step, count, repeats, peak=None):
    """(achieved FLOP/s, that over the yardstick): the float32 matmul measured now, or `peak`."""
    flops = count_flops(count)
    step_s = seconds(step, repeats)
    yardstick = peak if peak is not None else matmul_flops_per_s()
    return flops / step_s, flops / step_s / yardstick, step_s


#################################################################################
#                          Peak memory (one subprocess each)                    #
#################################################################################

def memory_child(args):
    """Runs one training step and prints this process's peak RSS in bytes."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    if args.model == "dit-xl":
        model = create_model("LightningDiT-XL/1", input_size=16, in_channels=32)
        model.grad_checkpoint = args.grad_checkpoint
        step, _ = dit_step(model, args.batch_size, device)
    else:   # stage 2 at DINOv2-L/14, 224 px, 256 px images
        model = AlignTok("dinov2_vitl14", None, latent_channels=32, image_size=256, encoder_size=224)
        model.encoder.grad_checkpoint = args.grad_checkpoint
        step = tokenizer_step(model, 2, args.batch_size, device)
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_rss(model, batch_size, grad_checkpoint):
    command = [sys.executable, os.path.join(ROOT, "bench.py"), "memory", "--model", model,
               "--batch-size", str(batch_size)] + (["--grad-checkpoint"] if grad_checkpoint else [])
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:] or f"exit {result.returncode} (killed for memory?)")
    return int(result.stdout.split()[-1])


def memory_rows(model, label):
    """Peak RSS at batch 1 and 2, with and without checkpointing, and the largest batch that
    fits 24 GB extrapolated linearly from the two."""
    rows = []
    for checkpointing in (False, True):
        flag = " --grad-checkpoint" if checkpointing else ""
        try:
            one, two = peak_rss(model, 1, checkpointing), peak_rss(model, 2, checkpointing)
        except RuntimeError as error:       # out of memory, most likely: the row says so, the table goes on
            rows.append((f"peak RSS, {label}, batch 1{flag}", "failed", str(error).splitlines()[-1][:200]))
            continue
        per_image = two - one
        # Where batch 2 adds under 1% the peak is the weights' and optimiser's, and a line
        # through two nearly equal points says nothing.
        fits = f"~{int((24e9 - one) // per_image) + 1}" if per_image > 0.01 * one else "not measurable"
        rows.append((f"peak RSS, {label}, batch 1{flag}", f"{one / 1e9:.2f} GB",
                     f"batch 2: {two / 1e9:.2f} GB; largest batch in 24 GB {fits} (linear from batch 1 and 2)"))
    return rows


#################################################################################
#                                  The CPU table                                #
#################################################################################

def dinov2_rows(args):
    """Our DINOv2-B/14 forward against transformers' Dinov2Model, same weights, at 224 and
    518 px (the native size)."""
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          image_size=518, patch_size=14, layer_norm_eps=1e-6)
    reference = Dinov2Model(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
        ours = load_dinov2("dinov2_vitb14", path).eval()
    rows = []
    for size, batch in ((224, 8), (518, 2)):
        x = torch.randn(batch, 3, size, size)
        ours_s, reference_s = time_ratio(lambda: ours.forward_features(x), lambda: reference(pixel_values=x),
                                         args.repeats)
        rows.append((f"DINOv2-B/14 forward, {size} px, batch {batch}: time ours / transformers",
                     f"{ours_s / reference_s:.2f}", f"ours {ours_s:.2f} s, transformers {reference_s:.2f} s"))
    return rows


def inception_row(args):
    """Pool3 features of our Inception against pytorch-fid's InceptionV3([3]) (built without
    downloading: its loader is handed our random weights)."""
    import pytorch_fid.inception as pytorch_fid_inception
    torch.manual_seed(0)
    ours = load_inception()
    state = ours.state_dict()
    original = pytorch_fid_inception.load_state_dict_from_url
    pytorch_fid_inception.load_state_dict_from_url = lambda *a, **k: {n: v.clone() for n, v in state.items()}
    try:
        reference = pytorch_fid_inception.InceptionV3([3]).eval()
    finally:
        pytorch_fid_inception.load_state_dict_from_url = original
    x = torch.rand(8, 3, 256, 256)
    ours_s, reference_s = time_ratio(lambda: ours(x), lambda: reference(x)[0], args.repeats)
    return ("FID Inception pool3, 256 px, batch 8: time ours / pytorch-fid", f"{ours_s / reference_s:.2f}",
            f"ours {ours_s:.2f} s, pytorch-fid {reference_s:.2f} s")


def sampling_rows(args, device):
    """sample.py at demo size: 50 Euler steps, guidance 3.0 from t = 0.1, the demo's samples a
    call, then the decoder; and one guided model step against one unguided."""
    torch.manual_seed(0)
    tok = demo_tokenizer().to(device).eval()
    model = create_model("LightningDiT-B/1", input_size=8, in_channels=16, num_classes=10, **DEMO_DIT).to(device)
    model.eval()
    batch = DEMO_BATCHES["sample"]
    noise, labels = torch.randn(batch, 16, 8, 8, device=device), torch.arange(batch, device=device) % 10

    @torch.no_grad()
    def sample_batch():
        tok.decode(tok.denormalize(sample(model, noise, labels, steps=50, cfg_scale=3.0, cfg_interval=0.1)))

    @torch.no_grad()
    def model_step(cfg_scale):
        guided_velocity(model, noise, torch.tensor(0.5, device=device), labels, cfg_scale, 0.1, None, 10)
    batch_s = seconds(sample_batch, max(1, args.repeats // 2))
    guided_s, unguided_s = seconds(lambda: model_step(3.0), 5 * args.repeats), \
        seconds(lambda: model_step(1.0), 5 * args.repeats)
    return [("sampling at demo size (sample.py's calls), images/s", f"{batch / batch_s:.0f}",
             f"50 Euler steps, guidance 3.0 from t = 0.1, batch {batch}, with decoding"),
            (f"guided step / unguided step, demo DiT, batch {batch}", f"{guided_s / unguided_s:.2f}",
             "ideally close to 2 (one model call on a doubled batch)")]


def demo_schedule():
    """(steps of stages 0, 1, 2, 3 and of the DiT, number of samples) as run_demo.sh has them."""
    with open(os.path.join(ROOT, "run_demo.sh")) as f:
        text = f.read()
    steps = [int(n) for n in re.findall(r'--steps "\$\(steps (\d+)\)"', text)]
    samples = int(re.search(r"DEMO_SAMPLES:-(\d+)", text).group(1))
    if len(steps) != 5:
        raise ValueError(f"run_demo.sh has {len(steps)} training commands, not 5 (stages 0-3 and the DiT)")
    return steps, samples


def demo_work_row():
    """The demo's counted work (every training step and the sampling; the evaluation is left
    out) and the time it would take at the float32 matmul FLOP/s measured now: a floor that
    no overhead fix can go under, only doing less work."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    (stage0, stage1, stage2, stage3, dit_steps), samples = demo_schedule()
    parts = {"stage 0": count_flops(stand_in_step(DEMO_BATCHES["stage0"])) * stage0}
    for stage, steps in ((1, stage1), (2, stage2), (3, stage3)):
        parts[f"stage {stage}"] = count_flops(tokenizer_step(demo_tokenizer(), stage, DEMO_BATCHES["tokenizer"],
                                                             cpu)) * steps
    model = create_model("LightningDiT-B/1", input_size=8, in_channels=16, num_classes=10, **DEMO_DIT)
    parts["DiT"] = count_flops(dit_step(model, DEMO_BATCHES["dit"], cpu)[1]) * dit_steps
    tok, batch = demo_tokenizer().eval(), DEMO_BATCHES["sample"]
    noise, labels = torch.randn(batch, 16, 8, 8), torch.arange(batch) % 10
    with torch.no_grad():
        parts["sampling"] = count_flops(lambda: tok.decode(tok.denormalize(
            sample(model.eval(), noise, labels, steps=50, cfg_scale=3.0, cfg_interval=0.1)))) * samples / batch
    total, peak = sum(parts.values()), matmul_flops_per_s()
    shares = ", ".join(f"{name} {flops / total:.0%}" for name, flops in parts.items())
    return ("run_demo.sh's counted work, and its time at the fp32 matmul FLOP/s", f"{total / 1e12:.0f} TFLOP",
            f"{total / peak:.0f} s at {peak / 1e9:.0f} GFLOP/s (goal: 600 s); {shares}")


def cpu_table(args):
    device = torch.device("cpu")
    rows = []
    print(f"# bench.py on {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    torch.manual_seed(0)
    for compiled in (False, True):
        model = create_model("LightningDiT-B/1", input_size=16, in_channels=32)
        step, count = dit_step(model, 16, device, compiled=compiled)
        rate, fraction, step_s = achieved_fraction(step, count, args.repeats)
        rows.append((f"LightningDiT-B/1 train step, 16x16x32, batch 16, {'inductor' if compiled else 'eager'}: "
                     f"FLOP/s / fp32 matmul FLOP/s", f"{fraction:.2f}",
                     f"{rate / 1e9:.0f} GFLOP/s, {step_s:.1f} s/step"))
        print(rows[-1], flush=True)

    for label, build, batch in (("demo size", demo_tokenizer, 64), ("DINOv2-B/14 224 px, 256 px images",
                                                                    vitb_tokenizer, 2)):
        for stage in (1, 2):
            torch.manual_seed(0)
            step = tokenizer_step(build(), stage, batch, device)
            rate, fraction, step_s = achieved_fraction(step, step, args.repeats)
            rows.append((f"tokenizer stage {stage} step, {label}, batch {batch}: FLOP/s / fp32 matmul FLOP/s",
                         f"{fraction:.2f}", f"{rate / 1e9:.0f} GFLOP/s, {step_s:.2f} s/step"))
            print(rows[-1], flush=True)

    rows += sampling_rows(args, device)
    print(rows[-1], flush=True)
    rows.append(demo_work_row())
    print(rows[-1], flush=True)
    if not args.skip_memory:
        rows += memory_rows("dit-xl", "LightningDiT-XL/1 train step (16x16x32)")
        rows += memory_rows("dinov2-l", "stage-2 step, DINOv2-L/14 224 px, 256 px images")
        print(rows[-1], flush=True)
    rows += dinov2_rows(args)
    rows.append(inception_row(args))
    print()
    table(rows)


#################################################################################
#                               The GPU suite                                   #
#################################################################################

# Dense bf16 peaks (never the sparse figure), by a word of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def run_scripts(commands, timeout=600):
    """Runs the pipeline's scripts (argument lists) at the same time, each in its own
    process (the dry run spends most of its time starting Python); returns ok or the
    error's last line for each."""
    processes = [subprocess.Popen([sys.executable] + argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT) for argv in commands]
    results = []
    for process in processes:
        _, stderr = process.communicate(timeout=timeout)
        lines = [line for line in stderr.splitlines() if "rror" in line] or stderr.splitlines()  # past tqdm's lines
        results.append("ok" if process.returncode == 0 else
                       "error: " + (lines[-1].strip() if lines else f"exit {process.returncode}"))
    return results


def write_stage1_checkpoint(folder, tokenizer):
    """A stage-1 tokenizer checkpoint with random weights, the --init of the stage-2 check."""
    path = os.path.join(folder, "stage1.pt")
    torch.save({"stage": 1, "tokenizer_config": tokenizer.config, "model": tokenizer.state_dict(),
                "ema": tokenizer.state_dict(), "step": 0}, path)
    return path


def write_random_lpips(folder):
    lpips = LPIPS()
    vgg, heads = os.path.join(folder, "vgg.pth"), os.path.join(folder, "lpips.pth")
    torch.save(lpips.vgg.state_dict(), vgg)
    torch.save(lpips.heads.state_dict(), heads)
    return vgg, heads


def correctness_rows(folder, dry_run):
    """The pipeline under GPU settings (bf16 autocast, --compile, GAN and LPIPS on) for a few
    steps with random weights; the dry run starts the same commands on CPU at tiny sizes,
    compiling with aot_eager (inductor's CPU compile of every graph would take minutes)."""
    if dry_run:
        tokenizer = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16),
                             latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2, 2), decoder_res_blocks=0,
                             image_size=16, encoder_size=16)
        sizes, num_images = ["--batch-size", "2", "--stats-images", "4"], "8"
        dit_sizes = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--batch-size", "2"]
        backend, device, steps = "aot_eager", "cpu", "2"
    else:
        tokenizer = AlignTok("dinov2_vitl14", None, latent_channels=32, image_size=256, encoder_size=224)
        sizes, num_images = ["--batch-size", "8", "--stats-images", "32"], "64"
        dit_sizes = ["--model", "LightningDiT-XL/1", "--batch-size", "8"]
        backend, device, steps = "inductor", "cuda", "3"
    init = write_stage1_checkpoint(folder, tokenizer)
    vgg, heads = write_random_lpips(folder)
    compile_flags = ["--compile", "--compile-backend", backend]
    stage2, dit_run = os.path.join(folder, "stage2"), os.path.join(folder, "dit")
    tokenizer_ckpt, dit_ckpt = os.path.join(stage2, "checkpoint.pt"), os.path.join(dit_run, "checkpoint.pt")
    dit_flags = ["--tokenizer", tokenizer_ckpt, "--steps", steps, "--num-images", num_images, "--sample-columns", "1",
                 "--sample-steps", "2", "--log-every", "1", "--cache-dir", os.path.join(folder, "latents"), *dit_sizes]
    [stage2_result] = run_scripts([
        ["train_tokenizer.py", "--stage", "2", "--init", init, "--out", stage2, "--steps", steps, *compile_flags,
         "--vgg-weights", vgg, "--lpips-weights", heads, "--disc-weight", "0.5", "--disc-start", "0",
         "--disc-layers", "2" if dry_run else "3", "--log-every", "1", "--num-images", num_images, *sizes]])
    [dit_result] = run_scripts([["train_diffusion.py", "--out", dit_run, *compile_flags, *dit_flags]])
    results = run_scripts(
        [["sample.py", "--ckpt", dit_ckpt, "--out", os.path.join(folder, f"samples-{precision}.npz"), "--num-samples",
          "4", "--steps", "2", "--cfg-scale", "2.0", "--batch-size", "4", "--precision", precision, "--device",
          device] for precision in ("bf16", "tf32")] +
        [["-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29561", "train_diffusion.py",
          "--out", os.path.join(folder, "dit-ddp"), *dit_flags]])
    names = ["stage-2 tokenizer run, bf16, --compile, GAN and LPIPS on", "LightningDiT run, bf16, --compile",
             "sample.py --precision bf16", "sample.py --precision tf32",
             "torchrun, 1 process (NCCL on GPU), LightningDiT run"]
    return [(name, result, f"{steps} steps" if "run" in name else "") for name, result in
            zip(names, [stage2_result, dit_result] + results)]


def inception_extraction_row(folder, device, dry_run):
    """Seconds to extract pool3 features of 50K 256 px images from an npz, extrapolated
    from a subset (read from the file batch by batch, as evaluate.py does)."""
    count, batch = (8, 4) if dry_run else (5000, 250)
    path = os.path.join(folder, "images.npz")
    np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (count, 256, 256, 3), dtype=np.uint8))
    model = load_inception().to(device)
    start = time.perf_counter()
    images = np.load(path)["arr_0"]
    with torch.no_grad():
        for i in range(0, count, batch):
            x = torch.from_numpy(images[i:i + batch]).to(device).permute(0, 3, 1, 2).float() / 255
            model(x)
    sync()
    elapsed = time.perf_counter() - start
    return ("Inception pool3 features of 50K 256 px images from an npz, s", f"{elapsed * 50000 / count:.0f}",
            f"extrapolated from {count} images in batches of {batch}")


def gpu_table(args):
    dry_run = args.dry_run
    device = torch.device("cpu" if dry_run else "cuda")
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("error: bench.py gpu needs a CUDA GPU; `bench.py gpu --dry-run` checks it on CPU")
    backend = "aot_eager" if dry_run else "inductor"
    if dry_run:
        peak, chip = matmul_flops_per_s(512, 2), "CPU (dry run; yardstick: fp32 matmul)"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        chip = torch.cuda.get_device_name()
        tflops = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in chip), None)
        if tflops is None:
            raise SystemExit(f"error: no dense bf16 peak known for {chip}; pass --peak-tflops")
        peak, chip = tflops * 1e12, f"{chip} (dense bf16 peak {tflops:.0f} TFLOP/s)"
    print(f"# bench.py gpu on {chip}" + (": tiny sizes, the figures mean nothing" if dry_run else ""), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        rows = correctness_rows(folder, dry_run)
        for row in rows:
            print(row, flush=True)

        torch.manual_seed(0)
        dit_config = dict(depth=1, hidden_size=64, num_heads=2) if dry_run else {}
        batch = 2 if dry_run else args.dit_batch_size
        model = create_model("LightningDiT-XL/1", input_size=16, in_channels=32, **dit_config).to(device)
        step, count = dit_step(model, batch, device, compiled=True, backend=backend)
        rate, mfu, step_s = achieved_fraction(step, count, 2 if dry_run else 20, peak)
        rows.append((f"LightningDiT-XL/1 train, 16x16x32, batch {batch}, bf16, compiled: images/s",
                     f"{batch / step_s:.1f}", f"MFU {mfu:.2f} (goal >= 0.45), {rate / 1e12:.1f} TFLOP/s"))
        del model, step, count

        torch.manual_seed(0)
        tokenizer = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16),
                             latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2, 2),
                             decoder_res_blocks=0, image_size=16, encoder_size=16) if dry_run else \
            AlignTok("dinov2_vitl14", None, latent_channels=32, image_size=256, encoder_size=224)
        batch = 2 if dry_run else args.tokenizer_batch_size
        step = tokenizer_step(tokenizer.to(device), 2, batch, device)
        rate, mfu, step_s = achieved_fraction(step, step, 2 if dry_run else 10, peak)
        rows.append((f"stage-2 tokenizer, DINOv2-L/14 224 px, 256 px images, batch {batch}, bf16 eager: images/s",
                     f"{batch / step_s:.1f}", f"MFU {mfu:.2f}"))
        del tokenizer, step

        rows.append(inception_extraction_row(folder, device, dry_run))
    print()
    table(rows)


#################################################################################
#                                     Main                                      #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="cpu", choices=["cpu", "gpu", "memory"],
                        help="cpu: the CPU table; gpu: the GPU suite; memory: one peak-RSS measurement "
                             "(what the cpu table runs in subprocesses)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median; our choice)")
    parser.add_argument("--skip-memory", action="store_true", help="cpu: leave out the peak-RSS rows "
                                                                   "(they need ~12 GB of RAM)")
    parser.add_argument("--dry-run", action="store_true", help="gpu: start every piece on CPU at tiny sizes")
    parser.add_argument("--peak-tflops", type=float, help="gpu: the chip's dense bf16 peak, if not in the table")
    parser.add_argument("--dit-batch-size", type=int, default=64, help="gpu: per-GPU DiT batch (our choice)")
    parser.add_argument("--tokenizer-batch-size", type=int, default=16, help="gpu: stage-2 batch (our choice)")
    parser.add_argument("--model", choices=["dit-xl", "dinov2-l"], help="memory: which step")
    parser.add_argument("--batch-size", type=int, default=1, help="memory: batch")
    parser.add_argument("--grad-checkpoint", action="store_true", help="memory: with activation checkpointing")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    {"cpu": cpu_table, "gpu": gpu_table, "memory": memory_child}[args.what](args)
