"""ablations.py --quick: every variant runs end to end through the existing scripts, the
shared prefixes are trained once, a rerun does no work, every logged command is one a user
can retype, and the three outputs hold every variant."""
import json
import shlex

import numpy as np
import pytest

import ablations
import evaluate
import sample
import train_diffusion
import train_stand_in
import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_sweep_runs_every_variant_once(tmp_path):
    ablations.main(["--out", str(tmp_path), "--quick"])
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == set(ablations.VARIANTS)
    for name, seeds in results.items():
        assert len(seeds) == (2 if name in ablations.HEADLINE else 1), name
        assert [r["dit_steps"] for r in seeds[0]] == ablations.BUDGETS["quick"]["dit"]
        assert all(0 <= r["class_agreement_samples"] <= 1 and r["psnr"] > 0 for runs in seeds for r in runs)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ablations.VARIANTS) and "aligned latents" in table
    assert (tmp_path / "convergence.png").is_file()

    commands = (tmp_path / "commands.txt").read_text().splitlines()
    stage0 = [c for c in commands if "train_stand_in.py" in c]
    stage1 = [c for c in commands if "--stage 1" in c]
    assert len(stage0) == 2 and len(stage1) == 4          # per seed: one stand-in, one stage 1 per encoder
    parsers = {"train_stand_in.py": train_stand_in.parse_args, "train_tokenizer.py": train_tokenizer.parse_args, "train_diffusion.py": train_diffusion.parse_args,
               "sample.py": sample.parse_args, "evaluate.py": evaluate.build_parser().parse_args}
    for line in commands:
        words = shlex.split(line)
        assert words[0] == "python"
        parsers[words[1]](words[2:])                        # every logged command parses as typed

    ablations.main(["--out", str(tmp_path), "--quick"])      # rerun: everything is complete
    assert (tmp_path / "commands.txt").read_text().splitlines() == commands


def test_a_stopped_command_stops_the_sweep_and_restores_the_signal_handlers(tmp_path, monkeypatch):
    """A training script stopped by Ctrl-C saves and returns normally; the sweep must not
    go on to sample an unfinished run, and the script's handlers must not outlive it."""
    import signal
    before = signal.getsignal(signal.SIGINT)

    def stopped_early(argv):
        signal.signal(signal.SIGINT, lambda *_: None)      # as StopSignal does
    monkeypatch.setattr(ablations.evaluate, "main", stopped_early)
    with pytest.raises(SystemExit, match=r"^stopped during: python evaluate.py report\n.*rerun the same ablations.py"):
        ablations.run("evaluate.py", ["report"], str(tmp_path / "commands.txt"), lambda: False)
    assert signal.getsignal(signal.SIGINT) is before
    ablations.run("evaluate.py", ["report"], str(tmp_path / "commands.txt"), lambda: True)   # finished: goes on


def synthetic_results(effects, seeds=3, spread=3.0, noise=0.02):
    """results.json's layout for every variant: seed i shares a base value per metric (the
    between-seed spread), each variant adds its known effect and a little noise."""
    rng = np.random.default_rng(1)
    base = {key: rng.normal(0, spread, seeds) for key in ("psnr", "ssim", "fd_stand_in_reconstructions",
                                                          "linear_probe_latents", "class_agreement_samples",
                                                          "fd_stand_in_samples")}
    results = {}
    for name in ablations.VARIANTS:
        runs = []
        for s in range(seeds):
            curve = []
            for b, steps in enumerate((500, 1000, 1500)):
                value = {key: 10 + base[key][s] + effects.get((name, key), 0.0) + rng.normal(0, noise) + b
                         for key in base}
                curve.append(dict(value, dit_steps=steps))
            runs.append(curve)
        results[name] = runs
    return results


def test_the_claims_table_reads_known_effects_paired_by_seed(tmp_path):
    """0.5 below full under a 3-unit spread between seeds: found (paired); the opposite
    effect: contradicted; no effect: not resolved (the contrast) or equivalent (within the
    margin); a control one budget behind: a speed-up of 1.5."""
    effects = {("stage 1 only", "psnr"): -0.5, ("w_sp = 0", "linear_probe_latents"): +0.5,
               ("random encoder", "class_agreement_samples"): -1.0}
    rows, equivalences, ratios = ablations.claim_rows(synthetic_results(effects, noise=0.005),
                                                      {"dit": [500, 1000, 1500]})
    found = {claim: verdict for claim, verdict, _, _ in rows}
    assert found["stage 1 alone reconstructs worse"] == "reproduced"
    assert found["w_sp = 0 loses latent semantics"] == "contradicted"
    assert found["L_sp before the adapter generates worse"].startswith("not resolved at this power")
    assert [v for *_, v in equivalences] == ["equivalent", "equivalent"]       # no effect, margin 0.05
    assert found["aligned latents converge faster than the random-init control (shortest budget)"] == "reproduced"
    # the control ends 1 below full, which full's curve (+1 a budget) reaches one budget earlier
    assert ratios == pytest.approx([1500 / 1000] * 3, rel=0.02)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"budget": ablations.BUDGETS["quick"], "results": synthetic_results(effects)}))
    ablations.main(["--report", str(path), "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "results.md").read_text()
    assert table.index("Pre-registered") < table.index("| claim | verdict")      # stated before the numbers
    assert "| stage 1 alone reconstructs worse | reproduced |" in table
