"""ablations.py --quick: every variant runs end to end through the existing scripts, the
shared prefixes are trained once, a rerun does no work, every logged command is one a user
can retype, and the three outputs hold every variant."""
import json
import shlex

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
