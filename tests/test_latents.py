"""The latent cache built by two gloo ranks under torchrun when one rank's encoding takes
longer than the process-group timeout: the ranks write into one file and wait for each
other on the file system, and the cache equals a single process's."""
import argparse
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import build_dataset
from latents import cache_latents
from tokenizer import AlignTok, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = """
import argparse, os, sys, time
sys.path.insert(0, {root!r})
import tokenizer
from data import build_dataset
from latents import cache_latents
from training import cleanup_distributed, setup_distributed

rank, world_size, device = setup_distributed("cpu", timeout=4)
encode = tokenizer.AlignTok.encode
def slow_on_rank_0(self, images):
    if rank == 0:
        time.sleep(3)                                      # 2 batches: 6 s of extra work on rank 0
    return encode(self, images)
tokenizer.AlignTok.encode = slow_on_rank_0
args = argparse.Namespace(**{args!r})
dataset = build_dataset("synthetic", 32, "train", 17, 0)   # 17 over 2 ranks: blocks of 8 and 9
cache_latents(tokenizer.load_tokenizer(args.tokenizer), dataset, args, rank, world_size, device)
cleanup_distributed()
"""


def test_two_ranks_build_one_cache_without_a_merge(tmp_path):
    torch.manual_seed(0)
    tok = AlignTok("dinov2_vits14", dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32),
                   latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2, 2, 2), decoder_res_blocks=1,
                   image_size=32, encoder_size=32)
    tok_path = str(tmp_path / "tok.pt")
    torch.save({"tokenizer_config": tok.config, "ema": tok.state_dict()}, tok_path)
    settings = dict(data="synthetic", seed=0, cache_dtype="float32", cache_batch_size=4, workers=0, tokenizer=tok_path,
                    wait_timeout=600)
    script = tmp_path / "build_cache.py"
    script.write_text(SCRIPT.format(root=ROOT, args=dict(settings, out=str(tmp_path / "run"),
                                                          cache_dir=str(tmp_path / "two"))))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29547", str(script)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    [two] = glob.glob(str(tmp_path / "two" / "latents-*.npy"))
    assert sorted(os.listdir(tmp_path / "two")) == sorted([os.path.basename(two), os.path.basename(two)[:-4] + ".json",
                                                           f".{os.path.basename(two)[:-4]}.lock"])   # the builder's lock

    args = argparse.Namespace(**settings, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "one"))
    one, _ = cache_latents(load_tokenizer(tok_path), build_dataset("synthetic", 32, "train", 17, 0), args, 0, 1,
                           torch.device("cpu"))
    assert os.path.basename(one) == os.path.basename(two)                 # the same key
    np.testing.assert_allclose(np.load(two), np.load(one), rtol=1e-5, atol=1e-5)
    # every row written, the remainder of 17 // 2 included (not rank * (N // world_size) blocks)
    assert (np.abs(np.load(two)).reshape(17, -1).max(1) > 0).all()
