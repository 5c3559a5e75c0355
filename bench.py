"""
Speed of our networks against the reference implementations, measured in one process
on the same weights and inputs, reported as a time ratio (ours / reference; <= 1.0 means
ours is not slower). Needs the test requirements (requirements-dev.txt).

    python bench.py dinov2        # our vitl14 vs transformers' Dinov2Model, batch 8 at 224 px
    python bench.py inception     # our FID Inception vs pytorch-fid's
"""
import argparse
import os
import tempfile
import time

import torch


#################################################################################
#                               Timing helper                                   #
#################################################################################

@torch.no_grad()
def time_ratio(ours, reference, repeats):
    """Median seconds of ours() and reference(), interleaved so that both see the same
    machine load; one warm-up call each first."""
    ours(), reference()
    ours_times, reference_times = [], []
    for _ in range(repeats):
        for fn, times in ((ours, ours_times), (reference, reference_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    median = lambda xs: sorted(xs)[len(xs) // 2]
    return median(ours_times), median(reference_times)


def report(name, ours_s, reference_s):
    print(f"{name}: ours {ours_s * 1000:.1f} ms, reference {reference_s * 1000:.1f} ms, "
          f"ratio ours/reference {ours_s / reference_s:.3f}")


#################################################################################
#                                   DINOv2                                      #
#################################################################################

def bench_dinov2(args):
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model
    from tokenizer import load_dinov2

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096, image_size=518, patch_size=14, layer_norm_eps=1e-6)
    reference = Dinov2Model(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
        ours = load_dinov2("dinov2_vitl14", path).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    ours_s, reference_s = time_ratio(lambda: ours.forward_features(x),
                                     lambda: reference(pixel_values=x), args.repeats)
    report(f"DINOv2 vitl14 forward, batch {args.batch_size} at 224 px", ours_s, reference_s)


#################################################################################
#                                 FID Inception                                 #
#################################################################################

def bench_inception(args):
    """Pool3 feature extraction of our Inception against pytorch-fid's InceptionV3([3])
    (built without downloading: its loader is handed our random weights)."""
    import pytorch_fid.inception as pytorch_fid_inception
    from inception import load_inception

    torch.manual_seed(0)
    ours = load_inception()
    state = ours.state_dict()
    original = pytorch_fid_inception.load_state_dict_from_url
    pytorch_fid_inception.load_state_dict_from_url = lambda *a, **k: {n: v.clone() for n, v in state.items()}
    try:
        reference = pytorch_fid_inception.InceptionV3([3]).eval()
    finally:
        pytorch_fid_inception.load_state_dict_from_url = original
    x = torch.rand(args.batch_size, 3, 256, 256)        # ImageNet samples: both resize to 299
    with torch.no_grad():
        expected = reference(x)[0].flatten(1)
        error = ((ours(x) - expected).abs().max() / expected.abs().max()).item()
    ours_s, reference_s = time_ratio(lambda: ours(x), lambda: reference(x)[0], args.repeats)
    report(f"FID Inception pool3, batch {args.batch_size} at 256 px (max rel. difference {error:.1e})",
           ours_s, reference_s)


#################################################################################
#                                     Main                                      #
#################################################################################

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["dinov2", "inception", "all"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.what in ("dinov2", "all"):
        bench_dinov2(args)
    if args.what in ("inception", "all"):
        bench_inception(args)
