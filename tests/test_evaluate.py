"""Tests for evaluate.py and inception.py: the FID Inception against pytorch-fid's, the
Frechet distance against pytorch-fid's, SSIM/PSNR against scikit-image, IS and
precision/recall on sets with known answers, the npz layouts, and the stats / metrics /
recon commands end to end. Random weights on CPU; nothing is downloaded."""
import json
import math
import os

import numpy as np
import pytest
import torch
import pytorch_fid.inception as pytorch_fid_inception
from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import evaluate
from evaluate import (dinov2_features, frechet_distance, inception_score, iter_npz_array, linear_probe,
                      load_reference, main, precision_recall, psnr, ssim)
from evaluate import feature_distance as fd_dinov2
from inception import INCEPTION_URL, load_inception, resize_tf1_bilinear
from harness import save_npz


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inception():
    """Our Inception with random weights whose activations are not degenerate: random
    batch-norm affine parameters, running statistics measured on random images (so every
    channel is normalised), a non-zero classifier bias."""
    torch.manual_seed(0)
    model = load_inception()
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in batch_norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
            bn.momentum = None                           # cumulative average over the pass
        model.fc.bias.normal_(0, 1)
        model.train()
        model(torch.rand(4, 3, 299, 299))
    for bn in batch_norms:
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def reference(inception):
    """pytorch-fid's FID Inception built without downloading: its weight loader returns
    our random state dict, which it loads strictly into torchvision's Inception3 with
    its FIDInceptionA/C/E blocks. Returns (InceptionV3([3]) wrapper, full network)."""
    state = inception.state_dict()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                      lambda *args, **kwargs: {k: v.clone() for k, v in state.items()})
        wrapper = pytorch_fid_inception.InceptionV3([3], use_fid_inception=True).eval()
        network = pytorch_fid_inception.fid_inception_v3().eval()
    return wrapper, network


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


#################################################################################
#                                   Inception                                   #
#################################################################################

@pytest.mark.parametrize("size", [(299, 299), (64, 96)])
def test_inception_matches_pytorch_fid(inception, reference, size):
    wrapper, network = reference
    torch.manual_seed(1)
    x = torch.rand(2, 3, *size)
    captured = {}
    hook = network.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o))
    with torch.no_grad():
        ours = inception.features(x)
        pool = wrapper(x)[0].flatten(1)                                  # pytorch-fid's FID path
        resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        logits = network(2 * resized - 1)
    hook.remove()
    # Non-degenerate: features vary between images and channels.
    assert pool.std() > 0.05 and (pool[0] - pool[1]).abs().max() > 0.05 * pool.abs().max()
    assert rel_err(ours["pool"], pool) < 1e-4
    assert rel_err(inception(x), pool) < 1e-4
    assert rel_err(ours["logits"], logits) < 1e-4
    assert rel_err(ours["logits_unbiased"], logits - network.fc.bias) < 1e-4
    spatial = captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)   # NHWC flatten, as ADM
    assert ours["spatial"].shape == (2, 2023)
    assert rel_err(ours["spatial"], spatial) < 1e-4


def test_inception_weight_file(inception, tmp_path):
    path = str(tmp_path / "inception.pth")
    state = inception.state_dict()
    # Old files lack the batch-norm step counters; they still load.
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_inception(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items()
               if not k.endswith("num_batches_tracked"))
    torch.save({k: v for k, v in state.items() if k != "Mixed_6d.branch1x1.bn.running_var"}, path)
    with pytest.raises(RuntimeError, match="Mixed_6d.branch1x1.bn.running_var") as error:
        load_inception(path)
    assert path in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        load_inception(str(tmp_path / "missing.pth"))
    assert INCEPTION_URL in str(error.value) and "--inception-weights" in str(error.value)


@pytest.mark.parametrize("size", [(32, 32), (256, 256), (64, 96), (400, 333), (299, 299)])
def test_tf1_resize_matches_torch_fidelity(size):
    """ADM's resize (the TF graph's) against torch-fidelity's port of TF1's bilinear kernel,
    up and down; pytorch-fid's half-pixel resize is measurably different."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, *size)).float()
    expected = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert (resize_tf1_bilinear(x, (299, 299)) - expected).abs().max() < 1e-3
    if size != (299, 299):
        half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        assert (half_pixel - expected).abs().max() > 1


@pytest.fixture(scope="module")
def torch_fidelity_inception(inception):
    """torch-fidelity's uint8-input FID Inception (TF1 resize, (x - 128) / 128 inside) built
    without downloading: its weight loader returns our random state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    state = inception.state_dict()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {k: v.clone() for k, v in state.items()})
        return fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])


@pytest.mark.parametrize("size", [(256, 256), (64, 96)])
def test_adm_preprocessing_matches_torch_fidelity(inception, torch_fidelity_inception, size):
    import copy
    adm = copy.deepcopy(inception)
    adm.preprocess_mode = "adm"
    torch.manual_seed(2)
    images = torch.randint(0, 256, (2, *size, 3), dtype=torch.uint8)             # as stored in an npz
    with torch.no_grad():
        pool, logits = torch_fidelity_inception(images.permute(0, 3, 1, 2))
        ours = evaluate.extract(adm, [images], "cpu", keys=("pool", "logits_unbiased"))
        other = evaluate.extract(inception, [images], "cpu", keys=("pool",))["pool"]
    assert pool.std() > 0.05
    assert rel_err(torch.from_numpy(ours["pool"]), pool) < 1e-4
    assert rel_err(torch.from_numpy(ours["logits_unbiased"]), logits) < 1e-4
    assert rel_err(torch.from_numpy(other), pool) > 1e-3                       # pytorch-fid's input is not ADM's


def test_metrics_follow_the_reference_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma, pool = np.zeros(4), np.eye(4), rng.standard_normal((5, 4)).astype(np.float32)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    layouts = {"adm_batch": (dict(arr_0=images, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma), "adm"),
               "adm_images_only": (dict(arr_0=images), "adm"),
               "adm_statistics_only": (dict(mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma), "adm"),
               "pytorch_fid": (dict(mu=mu, sigma=sigma), "pytorch-fid"),
               "ours_before_the_key": (dict(mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma, pool=pool), "pytorch-fid"),
               "ours_adm": (dict(mu=mu, sigma=sigma, pool=pool, preprocess=np.array("adm")), "adm")}
    for name, (arrays, expected) in layouts.items():
        path = str(tmp_path / f"{name}.npz")
        save_npz(path, **arrays)
        assert evaluate.reference_preprocess(path) == expected, name
    samples = str(tmp_path / "samples.npz")
    save_npz(samples, arr_0=images, arr_1=np.arange(3))
    with pytest.raises(SystemExit, match="--preprocess adm"):
        main(["metrics", "--samples", samples, "--ref", str(tmp_path / "ours_adm.npz"), "--preprocess", "pytorch-fid",
              "--device", "cpu"])


#################################################################################
#                                    Metrics                                    #
#################################################################################

def covariances(rng, n, dim=32):
    a = rng.standard_normal((n, dim))
    b = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.3 + 0.5
    return (a.mean(0), np.cov(a, rowvar=False)), (b.mean(0), np.cov(b, rowvar=False))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("n", [500, 12])          # full rank; rank 11 of 32 (near-singular)
def test_frechet_distance_matches_pytorch_fid(n):
    (mu1, s1), (mu2, s2) = covariances(np.random.default_rng(n), n)
    expected = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_frechet_distance_retry_and_imaginary(monkeypatch):
    (mu1, s1), (mu2, s2) = covariances(np.random.default_rng(0), 12)
    sqrtm, calls = evaluate.linalg.sqrtm, []

    def failing_first(matrix, *args, **kwargs):       # every other call is non-finite
        calls.append(matrix)
        result = sqrtm(matrix, *args, **kwargs)         # pytorch-fid asks for (root, error)
        if len(calls) % 2 == 0:
            return result
        nan = np.full_like(matrix, np.nan)
        return (nan, result[1]) if isinstance(result, tuple) else nan

    monkeypatch.setattr(evaluate.linalg, "sqrtm", failing_first)
    ours = frechet_distance(mu1, s1, mu2, s2)
    offset = np.eye(len(s1)) * 1e-6
    assert len(calls) == 2 and np.allclose(calls[1], (s1 + offset) @ (s2 + offset))
    assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-9)

    for imaginary, raises in ((1e-5, False), (1e-2, True)):
        monkeypatch.setattr(evaluate.linalg, "sqrtm", lambda m, *a, **k: sqrtm(m) + 1j * imaginary * np.eye(len(m)))
        if raises:
            with pytest.raises(ValueError, match="imaginary"):
                frechet_distance(mu1, s1, mu2, s2)
        else:
            monkeypatch.setattr(evaluate.linalg, "sqrtm", sqrtm)
            exact = frechet_distance(mu1, s1, mu2, s2)
            monkeypatch.setattr(evaluate.linalg, "sqrtm", lambda m, *a, **k: sqrtm(m) + 1j * imaginary * np.eye(len(m)))
            assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-9)


def test_inception_score_known_answers():
    # Two samples, p(y|x) = (0.9, 0.1) and (0.1, 0.9): p(y) is uniform.
    logits = np.log([[0.9, 0.1], [0.1, 0.9]])
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert inception_score(logits)[0] == pytest.approx(math.exp(kl), rel=1e-12)
    # Confident and balanced over 10 classes in each of 2 chunks: IS = 10, std 0.
    confident = np.eye(10)[np.arange(20) % 10] * 100.0
    mean, std = inception_score(confident, split_size=10)
    assert mean == pytest.approx(10, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    assert inception_score(np.zeros((20, 10)), split_size=10)[0] == pytest.approx(1, rel=1e-12)


def adm_inception_score(logits, split_size=5000):
    """ADM's evaluator (compute_inception_score) in plain numpy: float32 softmax, consecutive
    chunks of split_size, the last partial chunk included, the mean over chunks."""
    logits = logits.astype(np.float32)
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


@pytest.mark.parametrize("n, expected", [(50000, 5.0), (10000, 5.0), (12000, 4.0)])
def test_inception_score_uses_adm_chunks_of_5000(n, expected):
    # Confident predictions whose class changes every 1000 samples (10 classes in turn):
    # a chunk of 5000 sees 5 classes equally often (IS 5); ten equal splits of 10K would
    # see one class each (IS 1); at 12K the last partial chunk of 2000 sees 2 classes
    # (IS 2), and ADM keeps it: (5 + 5 + 2) / 3 = 4.
    logits = np.eye(10, dtype=np.float32)[(np.arange(n) // 1000) % 10] * 50.0
    mean, _ = inception_score(logits)
    assert mean == pytest.approx(expected, rel=1e-6)
    assert mean == pytest.approx(adm_inception_score(logits), rel=1e-5)


def test_inception_score_matches_adm_on_random_logits():
    logits = np.random.default_rng(0).standard_normal((12345, 20)) * 3
    assert inception_score(logits)[0] == pytest.approx(adm_inception_score(logits), rel=1e-5)


def adm_precision_recall(ref, sam, k=3):
    """ADM's evaluator in plain numpy (squared distances, k-th neighbour counting self)."""
    def sq(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0)
    r_ref, r_sam = np.sort(sq(ref, ref), 1)[:, k], np.sort(sq(sam, sam), 1)[:, k]
    d = sq(ref, sam)
    return (d <= r_ref[:, None]).any(0).mean(), (d <= r_sam[None, :]).any(1).mean()


def test_precision_recall_known_answers():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 8)).astype(np.float32)
    assert precision_recall(ref, ref) == (1.0, 1.0)
    assert precision_recall(ref, ref + 1000) == (0.0, 0.0)
    # Half the references sit in a far cluster no sample reaches; half the samples are
    # copies of the near references, the other half far away from everything.
    ref_half = np.concatenate([ref[:20], ref[20:] + 500])
    samples = np.concatenate([ref[:20], ref[20:] - 1000])
    assert precision_recall(ref_half, samples) == (0.5, 0.5)
    # Overlapping clouds, distances in small batches, against ADM's algorithm.
    sam = (rng.standard_normal((50, 8)) * 1.3 + 0.4).astype(np.float32)
    expected = adm_precision_recall(ref.astype(np.float64), sam.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(ref, sam, batch_size=7, fp16=False) == pytest.approx(expected, abs=1e-9)


def test_precision_recall_distances_in_float16_as_adm():
    # References on a line at 0, 1, 2, 3 (k = 3: the ball of 0 has squared radius 9) and a
    # sample at -3.0005, whose squared distance to 0 is 9.003 in float32, but in float16 the
    # sample rounds to -3 and lies on the ball's edge, inside: ADM counts it (float16
    # distances), float32 does not. The other samples are far from everything.
    ref = np.zeros((4, 2), dtype=np.float32)
    ref[:, 0] = [0, 1, 2, 3]
    sam = np.zeros((4, 2), dtype=np.float32)
    sam[:, 0] = [-3.0005, 100, 101, 102]
    assert precision_recall(ref, sam)[0] == 0.25
    assert precision_recall(ref, sam, fp16=False)[0] == 0.0
    # Squared distances beyond float16's range (65504) are computed again in float32, so
    # the answers are float32's, not those of infinite distances.
    big_ref, big_sam = ref * 1000, sam * 1000
    assert precision_recall(big_ref, big_sam) == precision_recall(big_ref, big_sam, fp16=False) == (0.0, 1.0)


def test_ssim_and_psnr_match_scikit_image():
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 10), size=(40, 50), mode="bicubic",
                                             align_corners=False).clamp(0, 1)
    noisy = (smooth + 0.08 * torch.randn_like(smooth)).clamp(0, 1)
    pairs = [(smooth, noisy), (torch.rand(3, 3, 40, 50), torch.rand(3, 3, 40, 50))]
    for x, y in pairs:
        for data_range in (1.0, 255.0):
            xs, ys = x * data_range, y * data_range
            ours_ssim, ours_psnr = ssim(xs, ys, data_range), psnr(xs, ys, data_range)
            for i in range(len(x)):
                a, b = xs[i].permute(1, 2, 0).double().numpy(), ys[i].permute(1, 2, 0).double().numpy()
                expected = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=data_range,
                                                 use_sample_covariance=False, channel_axis=-1)
                assert abs(ours_ssim[i].item() - expected) < 1e-4
                mse = np.mean((a - b) ** 2)
                assert ours_psnr[i].item() == pytest.approx(10 * np.log10(data_range ** 2 / mse), rel=1e-9)
                assert ours_psnr[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=data_range), rel=1e-9)
    assert 0.5 < ssim(smooth, noisy).mean() < 0.99     # the smooth pair is in SSIM's useful range
    assert ssim(smooth, smooth).min() == pytest.approx(1, abs=1e-5)


def test_linear_probe():
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    separable = rng.standard_normal((300, 6)) + 4 * np.eye(6)[labels]
    assert linear_probe(separable, labels) == 1.0
    chance = linear_probe(rng.standard_normal((300, 6)), labels)
    assert chance < 0.6


def test_fd_dinov2():
    from tokenizer import IMAGENET_MEAN, IMAGENET_STD, load_dinov2
    torch.manual_seed(0)
    encoder = load_dinov2("dinov2_vits14", depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=32).eval()
    images = torch.rand(12, 3, 30, 30)
    features = dinov2_features(encoder, images, size=31)               # 31 -> 32, a multiple of 4
    resized = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", antialias=True,
                                              align_corners=False)
    normalised = (resized - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(features, encoder(normalised), atol=1e-5)
    other = dinov2_features(encoder, images.flip(-1) ** 2, size=32)
    assert fd_dinov2(features.numpy(), features.numpy()) == pytest.approx(0, abs=1e-4)
    assert fd_dinov2(features.numpy(), other.numpy()) > 1e-3


#################################################################################
#                                     Files                                     #
#################################################################################

def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((10, 2048)).astype(np.float32)
    mu, sigma = evaluate.statistics(pool)
    stats = str(tmp_path / "stats.npz")
    save_npz(stats, mu=mu, sigma=sigma, mu_s=mu[:2023], sigma_s=sigma[:2023, :2023], pool=pool)
    assert os.listdir(tmp_path) == ["stats.npz"]                        # no temporary left behind
    m, s = compute_statistics_of_path(stats, None, 1, 2048, "cpu")     # pytorch-fid reads it
    assert np.array_equal(m, mu) and np.array_equal(s, sigma)
    ref = load_reference(stats, None, "cpu", 4)                         # no network needed
    assert np.array_equal(ref["pool"], pool) and np.array_equal(ref["sigma_s"], sigma[:2023, :2023])
    images = rng.integers(0, 256, (7, 16, 12, 3), dtype=np.uint8)
    for compressed in (False, True):
        path = str(tmp_path / f"samples{compressed}.npz")
        (np.savez_compressed if compressed else save_npz)(path, arr_0=images, arr_1=np.arange(7))
        assert np.array_equal(np.concatenate(list(iter_npz_array(path, "arr_0", 3))), images)
        with np.load(path) as f:
            assert np.array_equal(f["arr_1"], np.arange(7))


#################################################################################
#                                    Commands                                   #
#################################################################################

def synthetic_uint8(n, size=32):
    from data import build_dataset
    dataset = build_dataset("synthetic", size, split="val", num_images=n)
    images = torch.stack([dataset[i][0] for i in range(n)])
    return torch.round((images + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy(), np.array(dataset.targets)


def test_stats_and_metrics_end_to_end(inception, tmp_path, monkeypatch, capsys):
    weights, ref, out = (str(tmp_path / n) for n in ("inception.pth", "ref.npz", "metrics.json"))
    torch.save(inception.state_dict(), weights)
    common = ["--inception-weights", weights, "--batch-size", "4", "--device", "cpu"]
    main(["stats", "--data", "synthetic", "--num-images", "8", "--image-size", "32", "--workers", "0",
          "--out", ref, *common])
    with np.load(ref) as f:
        stats = {k: f[k] for k in f.files}
    assert stats["pool"].shape == (8, 2048) and stats["sigma"].shape == (2048, 2048)
    assert stats["mu_s"].shape == (2023,) and stats["sigma_s"].shape == (2023, 2023)
    assert str(stats["preprocess"]) == "pytorch-fid"                   # stats records its Inception input
    images, labels = synthetic_uint8(8)
    with torch.no_grad():
        direct = inception(torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 255)
    assert rel_err(torch.from_numpy(stats["pool"][:2]), direct) < 1e-4
    assert np.allclose(stats["mu"], stats["pool"].mean(0), rtol=1e-5, atol=1e-6)

    # The samples are the reference images themselves: precision = recall = 1, and the
    # statistics handed to the Frechet distance must be the reference's (the sqrtm of
    # 2048-d covariances takes a minute on a busy CPU, so it is checked on small matrices
    # above and only recorded here).
    samples = str(tmp_path / "samples.npz")
    save_npz(samples, arr_0=images, arr_1=labels)
    calls, scored = [], []
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *s: calls.append(s) or float(len(calls)))
    monkeypatch.setattr(evaluate, "inception_score", lambda logits, *a: scored.append(logits) or inception_score(
        logits, *a))
    main(["metrics", "--samples", samples, "--ref", ref, "--out", out, *common])
    with open(out) as f:
        results = json.load(f)
    assert results["fid"] == 1.0 and results["sfid"] == 2.0 and results["num_samples"] == 8
    assert results["preprocess"] == "pytorch-fid"
    assert results["precision"] == 1.0 and results["recall"] == 1.0
    # IS from the logits without the classifier's bias (as ADM and torch-fidelity): the
    # samples are the reference images, so their pool features are the reference's
    [logits] = scored
    unbiased = stats["pool"].astype(np.float64) @ inception.fc.weight.detach().double().numpy().T
    assert np.abs(np.asarray(logits) - unbiased).max() < 1e-3 * np.abs(unbiased).max() + 1e-6
    assert inception.fc.bias.abs().max() > 0.5                           # the bias would show
    (mu1, s1, mu2, s2), (mu1_s, s1_s, mu2_s, s2_s) = calls
    def close(a, b):
        return np.linalg.norm(a - b) < 1e-4 * np.linalg.norm(b)
    assert close(mu1, stats["mu"]) and close(s1, stats["sigma"]) and np.array_equal(mu2, stats["mu"])
    assert close(mu1_s, stats["mu_s"]) and close(s1_s, stats["sigma_s"]) and np.array_equal(s2_s, stats["sigma_s"])

    # ADM's reference batch layout: arr_0 images plus its own statistics, used as given.
    capsys.readouterr()
    adm = str(tmp_path / "adm.npz")
    save_npz(adm, arr_0=images, mu=stats["mu"] + 1, sigma=stats["sigma"], mu_s=stats["mu_s"], sigma_s=stats["sigma_s"])
    calls.clear()
    main(["metrics", "--samples", samples, "--ref", adm, *common])
    assert np.array_equal(calls[0][2], stats["mu"] + 1) and np.array_equal(calls[1][2], stats["mu_s"])
    printed = json.loads(capsys.readouterr().out.split("\n", 1)[1])     # after "computing reference ..."
    assert printed["precision"] == 1.0 and printed["recall"] == 1.0
    assert printed["preprocess"] == "adm"                               # ADM's statistics: ADM's input

    with pytest.raises(SystemExit):
        main(["metrics", "--samples", samples, "--ref", ref, "--device", "cpu"])
    message = capsys.readouterr().out
    assert INCEPTION_URL in message and "--inception-weights" in message


from test_sample import tiny_checkpoints  # noqa: E402  (shared with the sample tests)


def test_recon_end_to_end(tmp_path, capsys):
    _, _, tok_path, _ = tiny_checkpoints(tmp_path)
    out = str(tmp_path / "recon.json")
    main(["recon", "--tokenizer", tok_path, "--data", "synthetic", "--num-images", "10", "--batch-size", "5",
          "--workers", "0", "--device", "cpu", "--dinov2-size", "32", "--out", out])
    message = capsys.readouterr().out
    assert "rFID skipped" in message and INCEPTION_URL in message
    with open(out) as f:
        results = json.load(f)
    assert results["num_images"] == 10 and math.isfinite(results["psnr"]) and -1 < results["ssim"] < 1
    assert results["fd_tokenizer_encoder"] > 0 and 0 <= results["linear_probe"] <= 1


def reference_pca(z, percentile=0.0):
    """The top three principal components by numpy's SVD, made independently of latent_pca:
    signs so that the largest-|loading| entry is positive, percentile scaling, (N, h, w, 3)."""
    N, C, h, w = z.shape
    x = z.double().numpy().transpose(0, 2, 3, 1).reshape(-1, C)
    x = x - x.mean(0)
    vh = np.linalg.svd(x, full_matrices=False)[2][:3]
    vh = vh * np.sign(vh[np.arange(3), np.abs(vh).argmax(1)])[:, None]
    p = x @ vh.T
    low, high = np.percentile(p, percentile, axis=0), np.percentile(p, 100 - percentile, axis=0)
    return np.clip((p - low) / (high - low), 0, 1).reshape(N, h, w, 3), vh


def test_pca_picture_matches_numpy_svd(tmp_path):
    from PIL import Image
    tok, _, tok_path, _ = tiny_checkpoints(tmp_path)
    out = str(tmp_path / "pca.png")
    main(["pca", "--tokenizer", tok_path, "--data", "synthetic", "--num-images", "5", "--batch-size", "2",
          "--workers", "0", "--device", "cpu", "--out", out])
    args = evaluate.build_parser().parse_args(["pca", "--tokenizer", tok_path, "--data", "synthetic",
                                               "--num-images", "5", "--out", out])
    images = torch.stack([image for image, _ in evaluate.data_from_args(args, 32)])       # (5, 3, 32, 32)
    with torch.no_grad():
        z = tok.encode(images)                                                            # (5, 4, 8, 8)
    expected, _ = reference_pca(z)
    expected = np.repeat(np.repeat(expected, 4, axis=1), 4, axis=2)                       # nearest, 8 -> 32 px
    with Image.open(out) as image:
        pixels = np.asarray(image).astype(int)
    assert pixels.shape == (2 + 2 * 34, 2 + 5 * 34, 3)                 # inputs over PCA maps
    for i in range(5):
        inputs = pixels[2:34, 2 + 34 * i:34 * (i + 1)]
        maps = pixels[36:68, 2 + 34 * i:34 * (i + 1)]
        assert np.abs(inputs - np.floor((images[i].permute(1, 2, 0).numpy() + 1) / 2 * 255 + 0.5)).max() <= 1
        assert np.abs(maps - np.floor(expected[i] * 255 + 0.5)).max() <= 1, i
    assert pixels[36:68].std() > 20                                    # the maps span the colour range


def test_pca_signs_scaling_and_channel_order():
    z = torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = z * torch.tensor([3.0, 0.5, 2.0, 1.0, 0.2, 1.5], dtype=torch.float64).view(1, -1, 1, 1)
    maps, components = evaluate.latent_pca(z)
    largest = components[torch.arange(3), components.abs().argmax(1)]
    assert (largest > 0).all()                                         # the sign convention
    expected, vh = reference_pca(z)
    np.testing.assert_allclose(components.numpy(), vh, atol=1e-10)
    np.testing.assert_allclose(maps.permute(0, 2, 3, 1).numpy(), expected, atol=1e-6)
    assert maps.amin(dim=(0, 2, 3)).tolist() == [0, 0, 0] and maps.amax(dim=(0, 2, 3)).tolist() == [1, 1, 1]
    clipped, _ = evaluate.latent_pca(z, percentile=10)
    np.testing.assert_allclose(clipped.permute(0, 2, 3, 1).numpy(), reference_pca(z, 10)[0], atol=1e-6)
    permuted, _ = evaluate.latent_pca(z[:, [4, 2, 0, 5, 1, 3]])       # channel order is arbitrary
    np.testing.assert_allclose(permuted.numpy(), maps.numpy(), atol=1e-6)
