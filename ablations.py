r"""
The paper's ablation table, reproduced in shape on the embedded data. Every variant is a
set of flags of the existing scripts (train_tokenizer.py, train_diffusion.py, sample.py,
evaluate.py report); this driver only runs those commands, reuses what two variants share
(stage 0 and stage 1 of a seed, and equal stage-2 runs), and gathers the numbers.

    python ablations.py --out runs/ablations            # the full sweep (about 2 h on 2 CPU cores)
    python ablations.py --out runs/ablations --quick    # every variant end to end in minutes: plumbing only

Rerunning continues: a step whose output is complete is skipped. Writes, under --out:
results.json (every number), results.md (mean ± std over seeds beside the paper's
numbers, and the paper's claims checked in this world) and convergence.png (class
agreement and Frechet distance of the samples against DiT training steps). Each command
it runs is printed first, so any variant can be retyped by hand with one flag changed.
"""
import argparse
import json
import math
import os
import shlex
import signal
import time

import claims
import evaluate
import harness
from plot import draw_panels, mean_interval
import sample
import train_diffusion
import train_stand_in
import train_tokenizer


#################################################################################
#                          Variants and budgets                                 #
#################################################################################

# stage 2 flags (None: no stage 2), whether stage 3 runs, the stage-1 encoder, and the
# paper's ImageNet numbers (rFID / linear probe / gFID) for the table.
VARIANTS = {
    "full": dict(stage2=[], stage3=True, encoder="stand-in", paper="0.26 / 35.1% / 2.17"),
    "stages 1+2": dict(stage2=[], stage3=False, encoder="stand-in", paper="0.36 / 35.1% / 2.19"),
    "stage 1 only": dict(stage2=None, stage3=False, encoder="stand-in", paper="1.63 / 41.5% / 3.00"),
    "w_sp = 0": dict(stage2=["--sp-weight", "0"], stage3=True, encoder="stand-in", paper="0.33-0.36 / 9.5% / 3.05"),
    "w_sp = 5": dict(stage2=["--sp-weight", "5"], stage3=True, encoder="stand-in", paper="0.36-0.49 / 40.6% / 2.48"),
    "cosine L_sp": dict(stage2=["--sp-loss", "cosine"], stage3=True, encoder="stand-in", paper="0.37 / 38.0% / 2.23"),
    "L_sp before the adapter": dict(stage2=["--sp-placement", "features"], stage3=True, encoder="stand-in",
                                    paper="0.34 / 15.6% / 2.83"),
    # VA-VAE-like control: the same architecture from a random init, trained end to end on
    # reconstruction alone (stage 1 with the random encoder frozen, then stage 2 with no L_sp).
    "random encoder": dict(stage2=["--sp-weight", "0"], stage3=True, encoder="random", paper="0.37 / 33.6% / 3.16"),
}
HEADLINE = ("full", "w_sp = 0", "random encoder")     # these get every seed; the others the first

SIZES = dict(  # the demo's networks (run_demo.sh)
    encoder="--encoder-depth 4 --encoder-dim 128 --encoder-heads 4 --encoder-patch 4 --encoder-native-size 32",
    decoder="--latent-channels 16 --decoder-width 32 --decoder-multipliers 1 2 2 --decoder-res-blocks 1",
    dit="--depth 4 --hidden-size 128 --num-heads 2 --batch-size 32 --lr 1e-3 --ema-decay 0.999 --ema-warmup 10",
)
BUDGETS = {  # our choice: the demo's schedule with shorter DiT runs, so the sweep fits 2 h on 2 cores
    "full": dict(images=10000, stage0=800, stage1=800, stage2=400, stage3=400, dit=[500, 1000, 1500],
                 samples=300, eval_images=1000, seeds=3, tiny=""),
    "quick": dict(images=100, stage0=3, stage1=3, stage2=2, stage3=2, dit=[2, 4, 6], samples=20, eval_images=40,
                  seeds=2, tiny="--depth 1 --hidden-size 32 --num-heads 2 --batch-size 8"),
}


#################################################################################
#                               Running commands                                #
#################################################################################

def run(script, argv, log, done):
    """Runs one command of the pipeline in this process (no interpreter start-up per step),
    printed first and logged to commands.txt, so that it can be retyped by hand. done():
    whether the command finished its work; a script stopped by Ctrl-C or SIGTERM saves and
    returns harness.STOPPED, and the sweep stops there too."""
    line = shlex.join(["python", script] + argv)
    print(f"$ {line}", flush=True)
    with open(log, "a") as f:
        f.write(line + "\n")
    entry = {"train_stand_in.py": lambda a: train_stand_in.main(train_stand_in.parse_args(a)),
             "train_tokenizer.py": lambda a: train_tokenizer.main(train_tokenizer.parse_args(a)),
             "train_diffusion.py": lambda a: train_diffusion.main(train_diffusion.parse_args(a)),
             "sample.py": sample.main, "evaluate.py": evaluate.main}[script]
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = entry(argv)
    except SystemExit as error:
        status = error.code
        if status not in (None, 0, harness.STOPPED):
            raise SystemExit(f"error: this command failed: {line}\n{error}") from None
    finally:   # the scripts install their own signal handlers; the next command starts clean
        for number, handler in handlers.items():
            signal.signal(number, handler)
    if status == harness.STOPPED or not done():
        raise SystemExit(f"stopped during: {line}\nrerun the same ablations.py command to continue from there")


def finished(folder, steps):
    """Whether the run in folder finished `steps` (then it is not run again): its checkpoint
    says so, which the scripts write last, after a stage's latent statistics and a DiT's
    samples; the metrics log is written earlier and would pass a run stopped in between."""
    path = os.path.join(folder, "checkpoint.pt")
    if not os.path.isfile(path):
        return False
    checkpoint = harness.load_checkpoint(path)
    return bool(checkpoint.get("finished")) and checkpoint["step"] >= steps


def tokenizer_stage(stage, folder, steps, flags, budget, seed, log):
    """Stage 0 (the stand-in, train_stand_in.py) or tokenizer stage 1-3 of a seed, unless done."""
    script, stage_flags = ("train_stand_in.py", []) if stage == 0 else \
        ("train_tokenizer.py", ["--stage", str(stage), "--perceptual-weight", "0", "--disc-weight", "0"])
    if not finished(folder, steps):
        run(script, [*stage_flags, "--out", folder, "--steps", str(steps), "--seed", str(seed), "--data", "synthetic",
                     "--image-size", "32", "--encoder-size", "32", "--num-images", str(budget["images"]), "--resume",
                     *flags], log, lambda: finished(folder, steps))
    return os.path.join(folder, "checkpoint.pt")


def tokenizer_of(name, seed_dir, budget, seed, log):
    """The variant's final tokenizer checkpoint, running (or reusing) its stages."""
    variant = VARIANTS[name]
    lr1 = ["--lr", "1e-3", "--batch-size", "64"]
    stand_in = tokenizer_stage(0, os.path.join(seed_dir, "stage0"), budget["stage0"], lr1 + SIZES["encoder"].split(),
                               budget, seed, log)
    weights = stand_in if variant["encoder"] == "stand-in" else "random"
    tag = "" if variant["encoder"] == "stand-in" else "-random"
    encoder = [] if variant["encoder"] == "stand-in" else SIZES["encoder"].split()   # random: same architecture
    checkpoint = tokenizer_stage(1, os.path.join(seed_dir, "stage1" + tag), budget["stage1"],
                                 ["--lr", "1e-3", "--encoder-weights", weights, *encoder, *SIZES["decoder"].split()],
                                 budget, seed, log)
    if variant["stage2"] is None:
        return checkpoint
    tag += "".join(variant["stage2"]).replace("--", "-") or "-default"
    checkpoint = tokenizer_stage(2, os.path.join(seed_dir, "stage2" + tag), budget["stage2"],
                                 ["--lr", "3e-4", "--encoder-lr", "1e-4", "--init", checkpoint, *variant["stage2"]],
                                 budget, seed, log)
    if not variant["stage3"]:
        return checkpoint
    return tokenizer_stage(3, os.path.join(seed_dir, "stage3" + tag), budget["stage3"],
                           ["--lr", "3e-4", "--init", checkpoint], budget, seed, log)


def diffusion_curve(name, tokenizer, seed_dir, budget, seed, log):
    """The DiT trained on the variant's latents, measured at each budget: a list of the
    evaluate.py report results, one per budget."""
    folder = os.path.join(seed_dir, "dit-" + name.replace(" ", "").replace("=", "").replace("+", "-"))
    stand_in = os.path.join(seed_dir, "stage0", "checkpoint.pt")
    reports = []
    for steps in budget["dit"]:
        report = os.path.join(folder, f"report-{steps}.json")
        if not os.path.isfile(report):
            if not finished(folder, steps):
                run("train_diffusion.py", ["--tokenizer", tokenizer, "--out", folder, "--steps",
                     str(steps), "--seed", str(seed), "--num-images", str(budget["images"]), *SIZES["dit"].split(),
                     *budget["tiny"].split(), "--sample-every", str(budget["dit"][-1]), "--log-every",
                     str(max(1, budget["dit"][0] // 5)), "--resume"], log, lambda: finished(folder, steps))
            samples = os.path.join(folder, f"samples-{steps}.npz")
            run("sample.py", ["--ckpt", os.path.join(folder, "checkpoint.pt"), "--out", samples,
                 "--num-samples", str(budget["samples"]), "--steps", "50", "--cfg-scale", "3.0", "--cfg-interval",
                 "0.1", "--batch-size", "100", "--device", "cpu"], log, lambda: os.path.isfile(samples))
            run("evaluate.py", ["report", "--stand-in", stand_in, "--tokenizer", tokenizer,
                 "--samples", samples, "--data", "synthetic", "--num-images", str(budget["eval_images"]),
                 "--workers", "0", "--device", "cpu", "--recon-png", os.path.join(folder, "recon.png"),
                 "--samples-png", os.path.join(folder, f"samples-{steps}.png"), "--out", report], log,
                lambda: os.path.isfile(report))
        with open(report) as f:
            reports.append(dict(json.load(f), dit_steps=steps))
    return reports


#################################################################################
#                                  The report                                   #
#################################################################################

RECON = [("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("fd_stand_in_reconstructions", "rFD"),
         ("linear_probe_latents", "linear probe")]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def cell(values, digits=3):
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})" if len(values) > 1 else f"{mean:.{digits}f}"


# The pre-registered primary contrasts, stated in results.md before any number: (claim,
# variant a, variant b, metric, budget index, the sign the paper claims for a - b). Each is
# read on the per-seed differences a - b (the variants of a seed share its stand-in, stage 1,
# data and noise), and the family is Holm-corrected.
CONTRASTS = [
    ("stage 1 alone reconstructs worse", "stage 1 only", "full", "psnr", -1, -1),
    ("w_sp = 0 loses latent semantics", "w_sp = 0", "full", "linear_probe_latents", -1, -1),
    ("L_sp before the adapter generates worse", "L_sp before the adapter", "full", "class_agreement_samples", -1, -1),
    ("aligned latents converge faster than the random-init control (shortest budget)", "full", "random encoder",
     "class_agreement_samples", 0, +1),
]
# "About equal" claims, tested for equivalence (TOST) within a margin of the metric (our choice).
EQUIVALENCES = [
    ("cosine L_sp generates as well as L2", "cosine L_sp", "full", "class_agreement_samples", -1, 0.05),
    ("stage 3 keeps generation", "stages 1+2", "full", "class_agreement_samples", -1, 0.05),
]


def per_seed(results, name, key, budget_index):
    return [runs[budget_index][key] for runs in results.get(name, [])]


def paired(results, a, b, key, budget_index):
    """The per-seed values of a and b over the seeds both have (seed i is seed i in both)."""
    x, y = per_seed(results, a, key, budget_index), per_seed(results, b, key, budget_index)
    return x[:len(y)], y[:len(x)]


def claim_rows(results, budget, alpha=0.05):
    """The contrasts' rows (claim, verdict, paired difference with its 95% interval, raw
    and Holm-corrected p, n), the equivalences' rows, and the speed-up of full over the
    random-init control as per-seed steps-to-threshold ratios."""
    present = [c for c in CONTRASTS if c[1] in results and c[2] in results]
    differences = [claims.paired_difference(*paired(results, a, b, key, i)) for _, a, b, key, i, _ in present]
    adjusted = claims.holm([d["p"] for d in differences])
    rows = [(claim, claims.verdict(d, p, sign, alpha), d, p) for (claim, *_, sign), d, p in
            zip(present, differences, adjusted)]
    equivalences = []
    for claim, a, b, key, i, margin in EQUIVALENCES:
        if a in results and b in results:
            x, y = paired(results, a, b, key, i)
            p = claims.equivalence(x, y, margin)
            equivalences.append((claim, margin, claims.paired_difference(x, y), p,
                                 "equivalent" if p < alpha else f"not resolved at this power (n={len(x)})"))
    ratios = []   # threshold: the seed's control's class agreement at the final budget
    for full, control in zip(results.get("full", []), results.get("random encoder", [])):
        threshold = control[-1]["class_agreement_samples"]
        reach = [claims.steps_to_threshold(budget["dit"], [r["class_agreement_samples"] for r in runs], threshold)
                 for runs in (full, control)]
        ratios.append(reach[1] / reach[0])
    return rows, equivalences, ratios


def write_report(results, budget, out):
    final = {name: [runs[-1] for runs in seeds] for name, seeds in results.items()}
    value = lambda name, key: [r[key] for r in final.get(name, [])]
    lines = ["# Ablations on the embedded data", "",
             f"Budget: {budget['images']} images; tokenizer stages {budget['stage1']}/{budget['stage2']}/"
             f"{budget['stage3']} steps after a {budget['stage0']}-step stand-in; the same small LightningDiT on each "
             f"variant's normalised latents for {budget['dit']} steps; {budget['samples']} class-balanced samples "
             f"(50 Euler steps, guidance 3.0); metrics in the stand-in encoder's features. Mean ± std over seeds.", "",
             "| variant | " + " | ".join(label for _, label in RECON) + " | class agreement | sample FD | "
             "paper: rFID / probe / gFID |", "|---" * (len(RECON) + 4) + "|"]
    for name in results:
        row = [cell(value(name, key)) for key, _ in RECON]
        row += [cell(value(name, "class_agreement_samples")), cell(value(name, "fd_stand_in_samples"))]
        lines.append(f"| {name} | " + " | ".join(row) + f" | {VARIANTS[name]['paper']} |")
    rows, equivalences, ratios = claim_rows(results, budget)
    lines += ["", "## The paper's claims", "",
              "Pre-registered primary contrasts (stated before the numbers; each on the per-seed paired "
              "difference a - b, two-sided t test, Holm-corrected over the family; final budget unless named):", ""]
    lines += [f"{k + 1}. {claim}: {a} vs {b}, {key}, claimed sign of a - b: {'+' if sign > 0 else '-'}"
              for k, (claim, a, b, key, _, sign) in enumerate(CONTRASTS)]
    lines += ["", "| claim | verdict | a - b (95% interval) | p | p (Holm) | seeds |", "|---|---|---|---|---|---|"]
    for claim, found, d, p_holm in rows:
        interval = f"{d['mean']:+.3f} ({d['low']:+.3f}, {d['high']:+.3f})" if d["n"] > 1 else f"{d['mean']:+.3f}"
        lines.append(f"| {claim} | {found} | {interval} | {d['p']:.3g} | {p_holm:.3g} | {d['n']} |")
    if equivalences:
        lines += ["", "Equivalence claims (two one-sided tests within the margin; our choice of margin):", "",
                  "| claim | margin | a - b | TOST p | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {claim} | {margin} | {d['mean']:+.3f} | {p:.3g} | {found} |"
                  for claim, margin, d, p, found in equivalences]
    if ratios:
        lines += ["", "Speed-up: the DiT training steps the random-init control needs to reach its own final "
                  "class agreement, over the steps full needs to reach the same value, per seed (interpolated "
                  "between the budgets; a lower bound when full is already past it at the first budget): "
                  + ", ".join(f"{r:.2f}" for r in ratios) + "."]
    with harness.atomic_path(os.path.join(out, "results.md")) as temporary, open(temporary, "w") as f:
        f.write("\n".join(lines) + "\n")

    panels = []
    for key, title, ylabel in (("class_agreement_samples", "class agreement of the samples", "agreement (fraction)"),
                               ("fd_stand_in_samples", "Frechet distance of the samples (stand-in)",
                                "Frechet distance (stand-in features)")):
        series = []
        for name, seeds in results.items():
            steps = [r["dit_steps"] for r in seeds[0]]
            per_step = [[runs[i][key] for runs in seeds] for i in range(len(steps))]
            mean, low, high = zip(*(mean_interval(v) for v in per_step))   # 95% interval of the mean over seeds
            series.append(dict(label=name, x=steps, y=list(mean), low=list(low), high=list(high),
                               points=[(s, v) for s, vs in zip(steps, per_step) for v in vs]))
        panels.append(dict(title=title, xlabel="LightningDiT training steps", ylabel=ylabel, series=series))
    with harness.atomic_path(os.path.join(out, "convergence.png")) as temporary:
        draw_panels(panels, columns=1).save(temporary)


#################################################################################
#                                     Main                                      #
#################################################################################

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablations", help="folder for every run and the results")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing, not the results")
    parser.add_argument("--seeds", type=int, help="seeds of the headline variants (default: 3; --quick: 2)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to run (default: all)")
    parser.add_argument("--report", type=harness.input_path(),
                        help="only rewrite results.md and convergence.png in --out from this results.json "
                             "(for example docs/ablations/results.json), running nothing")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            stored = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        write_report(stored["results"], stored["budget"], os.path.abspath(args.out))
        print(f"wrote {args.out}/results.md and convergence.png from {args.report}")
        return
    budget = dict(BUDGETS["quick" if args.quick else "full"])
    budget["seeds"] = args.seeds or budget["seeds"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    log, start = os.path.join(out, "commands.txt"), time.time()
    results = {}
    for name in args.variants:
        for seed in range(budget["seeds"] if name in HEADLINE else 1):
            seed_dir = os.path.join(out, f"seed{seed}")
            tokenizer = tokenizer_of(name, seed_dir, budget, seed, log)
            results.setdefault(name, []).append(diffusion_curve(name, tokenizer, seed_dir, budget, seed, log))
    harness.save_json(os.path.join(out, "results.json"),
                      dict(budget=budget, results=results, wall_seconds=time.time() - start))
    write_report(results, budget, out)
    print(f"wrote {out}/results.md, results.json and convergence.png ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
