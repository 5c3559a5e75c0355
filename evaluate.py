"""
Evaluation: FID, sFID, Inception Score and precision/recall (the numbers of ADM's evaluator
and pytorch-fid, from the FID Inception of inception.py), PSNR, SSIM, the linear probe on
latents and FD_DINOv2, with the commands that compute them:

    python evaluate.py stats --data /data/imagenet/val --out ref.npz --inception-weights pt_inception.pth
    python evaluate.py metrics --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --out metrics.json
    python evaluate.py recon --tokenizer tok.pt --data /data/imagenet/val
    python evaluate.py report ...      # the embedded demo's summary (run_demo.sh)
    python evaluate.py pca --tokenizer tok.pt --data synthetic --out pca.png   # the latent's top 3 PCs as RGB

Sample batches come from sample.py. File layouts (numpy .npz):
    statistics  mu, sigma (pytorch-fid) and mu_s, sigma_s (ADM's sFID keys), plus `pool`:
                the (N, 2048) float32 pool3 features, which precision/recall need, and
                `preprocess`, the Inception input mode they were made with (ADM's own
                reference batches hold the images as arr_0 instead; both are accepted).

The Inception's input mode (--preprocess, see inception.py): "adm" (TF1 bilinear resize of
0..255 pixels, as ADM's evaluator) or "pytorch-fid". By default (auto) `metrics` uses the
mode of its reference: the one our stats file records; "adm" for ADM's reference batches
(arr_0 images, or mu_s/sigma_s without `pool`), whose statistics the TF graph made;
"pytorch-fid" for a file of mu and sigma alone (pytorch-fid's) and for our older stats
files. `stats` and `recon` default to "pytorch-fid" (our choice). Exactly ADM's numbers:
`metrics` against ADM's own reference batch with the defaults.
    samples     arr_0: uint8 (N, H, W, 3) images, arr_1: int64 (N,) labels (ADM's layout).
"""
import argparse
import json
import math
import os
import signal
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from data import ReportUnreadable, build_dataset
import harness
from inception import INCEPTION_FILE, INCEPTION_HELP, INCEPTION_URL, PREPROCESS, download_inception, load_inception
from tokenizer import encoder_input, load_dinov2, load_stand_in
from training import psnr
from vae import load_tokenizer_or_vae


#################################################################################
#                              Feature extraction                               #
#################################################################################

def to_unit(images):
    """uint8 (N, H, W, 3) array/tensor -> float (N, 3, H, W) in [0, 1]."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def extract(model, batches, device, keys=("pool", "logits_unbiased", "spatial")):
    """Runs the Inception on batches of [0, 1] float images (N, 3, H, W) or uint8 images
    (N, H, W, 3), converted on the device; returns float32 numpy arrays of the requested
    feature keys, concatenated over batches."""
    outputs = {key: [] for key in keys}
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        features = model.features(to_unit(batch) if batch.dtype == torch.uint8 else batch.float())
        for key in keys:
            outputs[key].append(features[key].float().cpu().numpy())
    if not outputs[keys[0]]:
        raise ValueError("no images to evaluate (the data set or the npz file is empty)")
    return {key: np.concatenate(value) for key, value in outputs.items()}


def statistics(features):
    """Mean and covariance as pytorch-fid and ADM compute them (np.cov: unbiased,
    float64); the mean in float64 too."""
    features = np.asarray(features)
    return features.mean(axis=0, dtype=np.float64), np.cov(features, rowvar=False)


def dataset_batches(dataset, batch_size, workers, labels=None):
    """Yields [0, 1] image batches from a data.py data set (items in [-1, 1]); labels,
    when a list is given, are appended to it. Statistics need every image, so an unreadable
    one is not skipped: the pass goes on, and at its end one error names every such file."""
    loader = torch.utils.data.DataLoader(ReportUnreadable(dataset), batch_size=batch_size, num_workers=workers,
                                         pin_memory=torch.cuda.is_available())
    unreadable = []
    for images, targets, problems in loader:
        unreadable += [problem for problem in problems if problem]
        if labels is not None:
            labels.extend(targets.tolist())
        yield (images + 1) / 2
    if unreadable:
        raise SystemExit(f"error: {len(unreadable)} of {len(dataset)} images of --data cannot be read (remove or "
                         f"replace them; the measures need every image): {'; '.join(unreadable)}")


#################################################################################
#                                    Metrics                                    #
#################################################################################

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), computed as
    pytorch-fid and ADM do: scipy's sqrtm of the product; if that is not finite, retry
    with eps on both diagonals; a complex root is accepted only if the imaginary part of
    its diagonal (what enters the trace) is below 1e-3."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimension: mean {mu1.shape} vs {mu2.shape}, "
                         f"covariance {sigma1.shape} vs {sigma2.shape} (were they made with the same network?)")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        print(f"frechet_distance: singular product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: the matrix square root has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are too ill-conditioned "
                             f"(use more images)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) on consecutive chunks of split_size samples, the last
    partial chunk included; returns the (mean, std) over chunks. This is ADM's evaluator
    (compute_inception_score, split_size=5000; it reports the mean only), so that any N
    gives ADM's number, not only 50K."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = []
    for part in torch.split(logits, split_size):
        log_p = torch.log_softmax(part, dim=1)                      # (n, K)
        log_marginal = torch.logsumexp(log_p, dim=0) - math.log(part.shape[0])
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def pairwise_sq_distances(u, v, fp16=True):
    """Squared Euclidean distances (n, m) as ADM's evaluator: |u|^2 - 2 u.v + |v|^2,
    clamped at zero, computed in float16 and returned as float32; a block with a
    non-finite float16 distance is computed again in float32 (ADM's tf.cond). fp16=False
    computes every block in float32."""
    def distances(a, b):
        return ((a * a).sum(1, keepdim=True) - 2 * a @ b.t() + (b * b).sum(1).unsqueeze(0)).clamp_min(0)
    if fp16:
        d = distances(u.half(), v.half())
        if torch.isfinite(d).all():
            return d.float()
    return distances(u.float(), v.float())


def manifold_radii(features, k=3, batch_size=10000, fp16=True):
    """Squared distance of each point to its k-th nearest neighbour in the same set
    (the point itself counts as the 0th, as in ADM's evaluator)."""
    radii = []
    for start in range(0, len(features), batch_size):
        d = torch.cat([pairwise_sq_distances(features[start:start + batch_size], features[s:s + batch_size], fp16)
                       for s in range(0, len(features), batch_size)], dim=1)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


@torch.no_grad()
def precision_recall(ref_features, sample_features, k=3, batch_size=10000, device="cpu", fp16=True):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as in ADM's evaluator:
    precision = fraction of samples inside some reference k-NN ball, recall = fraction
    of references inside some sample k-NN ball. Distances in blocks of batch_size rows
    and columns (ADM's 10000), in float16 unless fp16=False (see pairwise_sq_distances)."""
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    sam = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    if min(len(ref), len(sam)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images in each set")
    ref_radii, sam_radii = manifold_radii(ref, k, batch_size, fp16), manifold_radii(sam, k, batch_size, fp16)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sam_covered = torch.zeros(len(sam), dtype=torch.bool, device=device)
    for i in range(0, len(ref), batch_size):
        for j in range(0, len(sam), batch_size):
            d = pairwise_sq_distances(ref[i:i + batch_size], sam[j:j + batch_size], fp16)    # (n, m)
            sam_covered[j:j + batch_size] |= (d <= ref_radii[i:i + batch_size, None]).any(0)
            ref_covered[i:i + batch_size] |= (d <= sam_radii[None, j:j + batch_size]).any(1)
    return sam_covered.double().mean().item(), ref_covered.double().mean().item()


def gaussian_window(size=11, sigma=1.5):
    # scipy's gaussian_filter with truncate=3.5 (skimage's call) has radius
    # int(3.5 * 1.5 + 0.5) = 5, i.e. these 11 taps.
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(x, y, data_range=1.0, size=11, sigma=1.5):
    """Per-image SSIM (N,) of float images (N, C, H, W), as scikit-image's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    channel_axis=...): Gaussian-weighted local statistics, K1=0.01, K2=0.03, mean over
    the map without its (size - 1) / 2 border (skimage filters with reflection and then
    crops that border, so a valid convolution gives the same values)."""
    N, C, H, W = x.shape
    window = gaussian_window(size, sigma).to(x.device, torch.float32)
    x, y = x.float(), y.float()
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)                  # (N, 5C, H, W)
    stack = F.conv2d(stack, window.view(1, 1, size, 1).expand(5 * C, 1, size, 1), groups=5 * C)
    stack = F.conv2d(stack, window.view(1, 1, 1, size).expand(5 * C, 1, 1, size), groups=5 * C)
    mu_x, mu_y, xx, yy, xy = stack.chunk(5, dim=1)                        # each (N, C, h, w)
    var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).double().mean(1)


def linear_probe(features, labels, holdout=0.2, ridge=1e-3, seed=0):
    """Held-out accuracy of a closed-form ridge regression from features (N, D) to
    one-hot labels. Features are standardised on the training part; ridge is added to
    the diagonal of the Gram matrix divided by the number of training samples."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(holdout * len(x))))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
    x = (x - mean) / std
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)      # bias column
    targets = F.one_hot(y, int(y.max()) + 1).to(x.dtype)
    gram = x[train].t() @ x[train] / len(train) + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, x[train].t() @ targets[train] / len(train))
    return ((x[test] @ weights).argmax(1) == y[test]).double().mean().item()


@torch.no_grad()
def dinov2_features(encoder, images, size=224):
    """CLS features (N, D) of a DINOv2-type encoder (forward_features, patch_size) for
    [0, 1] images (N, 3, H, W): bicubic resize to `size` rounded to a multiple of the
    patch size (224 as in Stein et al. 2023), ImageNet normalisation."""
    size = max(1, round(size / encoder.patch_size)) * encoder.patch_size
    return encoder.forward_features(encoder_input(2 * images.float() - 1, size))["x_norm_clstoken"]


def feature_distance(features1, features2):
    """Frechet distance between two feature sets (N, D), whichever network made them:
    FD_DINOv2 for DINOv2 features, rFID for Inception pool features."""
    return frechet_distance(*statistics(np.asarray(features1)), *statistics(np.asarray(features2)))


#################################################################################
#                                     Files                                     #
#################################################################################

def npz_keys(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file not found: {path}")
    with np.load(path) as f:
        return list(f.files)


def iter_npz_array(path, key, batch_size):
    """Yields row batches of one array of an .npz file without loading it whole (a 50K
    256px batch is 10 GB); plain or compressed npz."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        shape, fortran, dtype = read_header(f) if read_header else (None, True, None)
        if fortran or dtype.hasobject:           # rare layouts: load it whole
            with np.load(path) as data:
                array = data[key]
            for start in range(0, len(array), batch_size):
                yield array[start:start + batch_size]
            return
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            yield np.frombuffer(f.read(n * row), dtype=dtype).reshape(n, *shape[1:])


def npz_image_batches(path, batch_size, key="arr_0"):
    """uint8 image batches (N, H, W, 3) as tensors from an ADM-layout npz array."""
    for batch in iter_npz_array(path, key, batch_size):
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"{path}: {key} must be uint8 (N, H, W, 3) images as in ADM's sample "
                             f"batches, got {batch.dtype} {batch.shape[1:]}")
        yield torch.from_numpy(batch.copy())


def reference_keys(path):
    """The keys of a --ref npz, or one error line when it holds no usable reference."""
    keys = npz_keys(path)
    if "arr_0" not in keys and not {"mu", "sigma"} <= set(keys):
        raise SystemExit(f"error: --ref {path} holds {sorted(keys)}: neither mu and sigma nor arr_0 images; make it "
                         f"with `python evaluate.py stats` or pass ADM's reference batch")
    return keys


def reference_preprocess(path):
    """The Inception input mode a reference file's statistics were made with (module doc)."""
    keys = reference_keys(path)
    if "preprocess" in keys:
        with np.load(path) as f:
            return str(f["preprocess"])
    if "pool" not in keys and ("arr_0" in keys or "mu_s" in keys):
        return "adm"
    return "pytorch-fid"


def load_reference(path, model, device, batch_size):
    """Reference statistics and pool features from our stats file, a pytorch-fid file
    (mu, sigma) or an ADM reference batch (arr_0 images and mu, sigma, mu_s, sigma_s).
    Anything missing but computable from arr_0 is computed; what stays missing is None."""
    keys = reference_keys(path)
    ref = {k: None for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")}
    with np.load(path) as f:
        for k in ref:
            if k in keys:
                ref[k] = f[k]
    if "arr_0" in keys and (ref["pool"] is None or ref["mu"] is None or ref["mu_s"] is None):
        print(f"computing reference features from the images in {path}")
        features = extract(model, npz_image_batches(path, batch_size), device, keys=("pool", "spatial"))
        ref["pool"] = features["pool"] if ref["pool"] is None else ref["pool"]
        if ref["mu"] is None:
            ref["mu"], ref["sigma"] = statistics(features["pool"])
        if ref["mu_s"] is None:
            ref["mu_s"], ref["sigma_s"] = statistics(features["spatial"])
    if ref["mu"] is None:
        raise ValueError(f"{path} holds neither mu/sigma nor arr_0 images; make it with "
                         f"`python evaluate.py stats` or pass ADM's reference batch")
    return ref


#################################################################################
#                      Reconstructions (the one measuring loop)                 #
#################################################################################

@torch.no_grad()
def measure_reconstructions(tok, dataset, args, feature_fns, probe="mean", quantize=True, grid_path=None):
    """Encodes and decodes every image of `dataset` once and measures the pairs.

    feature_fns: name -> function of [0, 1] images (N, 3, H, W) giving features (N, D),
    applied to the images and to their reconstructions. quantize rounds reconstructions to
    8 bits first, as a saved image would be. grid_path: the first ten images over their
    reconstructions. Returns a dict with labels, per-image psnr and ssim, the latents for
    the linear probe (spatial mean or flattened) and {name: (real, reconstructed)} features."""
    labels, psnrs, ssims, latents = [], [], [], []
    features = {name: ([], []) for name in feature_fns}
    for images in dataset_batches(dataset, args.batch_size, args.workers, labels):
        images = images.to(args.device)                                   # (N, 3, H, W) in [0, 1]
        z = tok.encode(2 * images - 1)                                    # (N, C, h, w)
        recon = ((tok.decode(z) + 1) / 2).clamp(0, 1)
        if quantize:
            recon = torch.round(recon * 255) / 255
        psnrs.append(psnr(images, recon).cpu())
        ssims.append(ssim(images, recon).cpu())
        latents.append((z.mean(dim=(2, 3)) if probe == "mean" else z.flatten(1)).cpu())
        for name, fn in feature_fns.items():
            features[name][0].append(fn(images).cpu())
            features[name][1].append(fn(recon).cpu())
        if grid_path and len(psnrs) == 1:
            harness.save_grid(torch.cat((images[:10], recon[:10])) * 2 - 1, grid_path, nrow=min(10, len(images)))
    return {"labels": labels, "psnr": torch.cat(psnrs), "ssim": torch.cat(ssims), "latents": torch.cat(latents),
            "features": {name: (torch.cat(real), torch.cat(fake)) for name, (real, fake) in features.items()}}


#################################################################################
#                          The latent's principal components                    #
#################################################################################

def latent_pca(z, percentile=0.0):
    """The top three principal components of latents z (N, C, h, w), taken over all N*h*w
    positions, as RGB maps (N, 3, h, w) in [0, 1], and the components (3, C). An SVD's
    signs are arbitrary: each component is turned so that its largest-|loading| entry is
    positive. Each is scaled from its percentile-th to its (100 - percentile)-th percentile
    over all positions (0: min to max) to [0, 1], clipped."""
    N, C, h, w = z.shape
    if C < 3 or N * h * w < 3:
        raise SystemExit(f"error: a PCA picture needs at least 3 latent channels and 3 positions, got {C} and "
                         f"{N * h * w}; pass a tokenizer with more channels or more images")
    x = z.permute(0, 2, 3, 1).reshape(-1, C).double()                     # (N*h*w, C)
    x = x - x.mean(0)
    components = torch.linalg.svd(x, full_matrices=False).Vh[:3]          # (3, C)
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))
    components = components * largest.sign()
    p = x @ components.t()                                                 # (N*h*w, 3)
    low, high = torch.quantile(p, torch.tensor([percentile / 100, 1 - percentile / 100], dtype=p.dtype), dim=0)
    p = ((p - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    return p.reshape(N, h, w, 3).permute(0, 3, 1, 2).float(), components


#################################################################################
#                                   Commands                                    #
#################################################################################

def inception_from_args(args, needed_for, preprocess="pytorch-fid"):
    """The Inception on args.device with the given input mode, or None after saying which
    file the metrics need."""
    weights = args.inception_weights
    if weights is None and args.download:
        weights = download_inception()
    if weights is None or not os.path.isfile(weights):
        problem = "no Inception weights given" if weights is None else f"Inception weights not found: {weights}"
        print(f"{needed_for} skipped: {problem}; {INCEPTION_HELP}")
        return None
    return load_inception(weights, preprocess).to(args.device)


def data_from_args(args, image_size):
    """The --data set at image_size; with --num-images, at most that many items, evenly
    spaced so that every class of a sorted ImageFolder is represented."""
    n = args.num_images
    dataset = build_dataset(args.data, image_size, split=args.split, **({"num_images": n} if n else {}))
    if not n or n >= len(dataset):
        return dataset
    indices = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    return torch.utils.data.Subset(dataset, indices)


def cmd_stats(args):
    preprocess = "pytorch-fid" if args.preprocess == "auto" else args.preprocess
    model = inception_from_args(args, "reference statistics (FID, sFID, precision/recall)", preprocess)
    if model is None:
        raise SystemExit(1)
    dataset = data_from_args(args, args.image_size)
    features = extract(model, dataset_batches(dataset, args.batch_size, args.workers), args.device,
                       keys=("pool", "spatial"))
    mu, sigma = statistics(features["pool"])
    mu_s, sigma_s = statistics(features["spatial"])
    harness.save_npz(args.out, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=features["pool"],
             preprocess=np.array(preprocess))
    print(f"wrote statistics of {len(features['pool'])} images to {args.out}")




def cmd_metrics(args):
    for path, what in ((args.samples, "--samples"), (args.ref, "--ref")):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {what} file not found: {path}")
    preprocess = reference_preprocess(args.ref)
    if args.preprocess != "auto":
        if "preprocess" in npz_keys(args.ref) and args.preprocess != preprocess:
            raise SystemExit(f"error: {args.ref} was made with --preprocess {preprocess}; pass that mode (or auto), "
                             f"or rebuild the reference with `evaluate.py stats --preprocess {args.preprocess}`")
        preprocess = args.preprocess
    model = inception_from_args(args, "FID, sFID, IS, precision and recall", preprocess)
    if model is None:
        raise SystemExit(1)
    samples = extract(model, npz_image_batches(args.samples, args.batch_size), args.device)
    ref = load_reference(args.ref, model, args.device, args.batch_size)
    results = {"num_samples": len(samples["pool"]), "preprocess": preprocess}
    results["fid"] = frechet_distance(*statistics(samples["pool"]), ref["mu"], ref["sigma"])
    if ref["mu_s"] is not None:
        results["sfid"] = frechet_distance(*statistics(samples["spatial"]), ref["mu_s"], ref["sigma_s"])
    else:
        print(f"sFID skipped: {args.ref} has no mu_s/sigma_s or images")
    results["inception_score"], results["inception_score_std"] = inception_score(samples["logits_unbiased"],
                                                                                 args.is_split_size)
    if ref["pool"] is not None:
        results["precision"], results["recall"] = precision_recall(
            ref["pool"], samples["pool"], k=args.k, batch_size=args.pr_batch_size, device=args.device,
            fp16=args.pr_precision == "fp16")
    else:
        print(f"precision/recall skipped: {args.ref} has no pool features or images")
    report(results, args.out)


def report(results, out):
    print(json.dumps(results, indent=2))
    if out:
        harness.save_json(out, results)


def cmd_recon(args):
    tok = harness.read_or_exit(load_tokenizer_or_vae, args.tokenizer, "--tokenizer").to(args.device)
    inception = inception_from_args(args, "rFID", "pytorch-fid" if args.preprocess == "auto" else args.preprocess)
    if inception is not None:
        name, fn = "rfid", inception
    else:
        if args.dinov2_weights:
            encoder, name = load_dinov2(args.dinov2, args.dinov2_weights).to(args.device).eval(), "fd_dinov2"
        else:
            print(f"computing the Frechet distance in the tokenizer's own (fine-tuned) encoder features instead; "
                  f"pass --dinov2-weights {args.dinov2}_pretrain.pth for FD_DINOv2 proper")
            encoder, name = tok.encoder, "fd_tokenizer_encoder"
        fn = lambda images: dinov2_features(encoder, images, args.dinov2_size)
    measured = measure_reconstructions(tok, data_from_args(args, tok.image_size), args, {name: fn},
                                       probe=args.probe_features, quantize=args.quantize)
    results = {"num_images": len(measured["labels"]), "psnr": measured["psnr"].mean().item(),
               "ssim": measured["ssim"].mean().item(), name: feature_distance(*measured["features"][name]),
               "linear_probe": linear_probe(measured["latents"], measured["labels"], args.probe_holdout,
                                            args.probe_ridge)}
    report(results, args.out)


@torch.no_grad()
def report_samples(classifier, real, args):
    """The stand-in's Frechet distance of the samples to the real images and how often it
    sees the conditioning class in a sample; writes samples.png, one row per class."""
    with np.load(args.samples) as samples:
        sample_labels = samples["arr_1"]
    features, agreement, rows = [], [], {}
    for start, batch in zip(range(0, len(sample_labels), args.batch_size),
                            npz_image_batches(args.samples, args.batch_size)):
        images = 2 * to_unit(batch).to(args.device) - 1                   # (N, 3, H, W) in [-1, 1]
        targets = torch.as_tensor(sample_labels[start:start + len(images)], device=args.device)
        features.append(classifier.features(images))                      # (N, 2D)
        agreement.append((classifier.head(features[-1]).argmax(1) == targets).cpu())
        for image, label in zip(images.cpu(), targets.tolist()):
            rows.setdefault(label, []).append(image)
    columns = min(args.grid_columns, *(len(row) for row in rows.values()))
    harness.save_grid(torch.cat([torch.stack(rows[label][:columns]) for label in sorted(rows)]), args.samples_png,
                      nrow=columns)
    return {"num_samples": len(sample_labels),
            "fd_stand_in_samples": feature_distance(real, torch.cat(features).cpu()),
            "class_agreement_samples": torch.cat(agreement).float().mean().item()}


@torch.no_grad()
def cmd_report(args):
    """The embedded demo's summary: reconstruction and sample quality measured in the
    stage-0 stand-in encoder's features (no Inception or DINOv2 weights needed), the
    latents' linear probe, and how often the stand-in classifier sees in a sample the
    class it was conditioned on. Writes metrics.json, recon.png and samples.png."""
    classifier = harness.read_or_exit(load_stand_in, args.stand_in, "--stand-in").to(args.device)
    tok = harness.read_or_exit(load_tokenizer_or_vae, args.tokenizer, "--tokenizer").to(args.device)
    measured = measure_reconstructions(tok, data_from_args(args, tok.image_size), args,
                                       {"stand_in": lambda images: classifier.features(2 * images - 1)},
                                       grid_path=args.recon_png)
    real, reconstructed = measured["features"]["stand_in"]
    labels = torch.tensor(measured["labels"])
    results = {"num_images": len(labels), "psnr": measured["psnr"].mean().item(),
               "ssim": measured["ssim"].mean().item(),
               "fd_stand_in_reconstructions": feature_distance(real, reconstructed),
               "linear_probe_latents": linear_probe(measured["latents"], measured["labels"]),
               "stand_in_accuracy_real": (classifier.head(real.to(args.device)).argmax(1).cpu() == labels)
               .float().mean().item(),
               "stand_in_accuracy_reconstructions": (classifier.head(reconstructed.to(args.device)).argmax(1).cpu()
                                                     == labels).float().mean().item()}
    results.update(report_samples(classifier, real, args))
    report(results, args.out)


@torch.no_grad()
def cmd_pca(args):
    """The row of input images over the row of their latents' top three principal
    components as RGB (latent_pca over all positions of all the images), each map
    upsampled (nearest) to the image size."""
    if args.percentile >= 50:
        raise SystemExit(f"error: --percentile {args.percentile} leaves no range to scale; pass less than 50")
    tok = harness.read_or_exit(load_tokenizer_or_vae, args.tokenizer, "--tokenizer").to(args.device)
    images, latents = [], []
    for batch in dataset_batches(data_from_args(args, tok.image_size), args.batch_size, args.workers):
        images.append(batch)                                               # (n, 3, H, W) in [0, 1]
        latents.append(tok.encode(2 * batch.to(args.device) - 1).float().cpu())   # (n, C, h, w)
    images = torch.cat(images)
    maps = F.interpolate(latent_pca(torch.cat(latents), args.percentile)[0], size=images.shape[-2:], mode="nearest")
    harness.save_grid(torch.cat((images, maps)) * 2 - 1, args.out, nrow=len(images))
    print(f"wrote {len(images)} images over their latents' top 3 principal components to {args.out}")


#################################################################################
#                                 Command line                                  #
#################################################################################

def add_common(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=harness.positive_int, default=100, help="images per network call")
    parser.add_argument("--out", default=None, help="output file")


def add_inception(parser):
    parser.add_argument("--inception-weights", default=None, type=harness.input_path(),
                        help=f"pytorch-fid's {INCEPTION_FILE} (from {INCEPTION_URL})")
    parser.add_argument("--download", action="store_true",
                        help="download the Inception weights into the torch hub cache if --inception-weights is not "
                             "given")
    parser.add_argument("--preprocess", default="auto", choices=("auto",) + PREPROCESS,
                        help="Inception input: adm (TF1 bilinear resize of 0..255 pixels, ADM's evaluator) or "
                             "pytorch-fid; auto: metrics follows its reference (adm for ADM's reference batches), "
                             "stats and recon use pytorch-fid (our choice)")
    parser.add_argument("--allow-tf32", action="store_true",
                        help="allow TF32 convolutions/matmuls on GPU (faster, not bit-comparable; off by default)")


def add_data(parser):
    parser.add_argument("--workers", type=harness.non_negative_int, default=4, help="data loader workers")
    parser.add_argument("--data", required=True, type=harness.input_path("synthetic"),
                        help="'synthetic' or an ImageFolder tree")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="split of the synthetic set")
    parser.add_argument("--num-images", type=harness.positive_int, default=None,
                        help="use at most this many images, evenly spaced over the set (default: all; "
                             "the synthetic set's size)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    stats = commands.add_parser("stats", help="reference statistics of a data set")
    add_common(stats)
    add_inception(stats)
    add_data(stats)
    stats.add_argument("--image-size", type=harness.positive_int, default=256, help="center-crop size (ADM's crop)")

    metrics = commands.add_parser("metrics", help="FID, sFID, IS, precision, recall of a sample batch")
    add_common(metrics)
    add_inception(metrics)
    metrics.add_argument("--samples", required=True, type=harness.input_path(),
                         help="npz with arr_0 uint8 (N, H, W, 3)")
    metrics.add_argument("--ref", required=True, type=harness.input_path(),
                         help="our stats npz, a pytorch-fid npz or ADM's reference batch")
    metrics.add_argument("--k", type=harness.positive_int, default=3,
                         help="nearest neighbours for precision/recall (ADM: 3)")
    metrics.add_argument("--pr-batch-size", type=harness.positive_int, default=10000, help="rows per distance block")
    metrics.add_argument("--pr-precision", default="fp16", choices=("fp16", "fp32"),
                         help="precision/recall distances in float16 with a float32 retry where not finite "
                              "(ADM's evaluator), or all in float32")
    metrics.add_argument("--is-split-size", type=harness.positive_int, default=5000,
                         help="Inception Score on consecutive chunks of this many samples, the last partial chunk "
                              "included (ADM's evaluator: 5000)")

    recon = commands.add_parser("recon", help="rFID / FD_DINOv2, PSNR, SSIM and linear probe of a tokenizer")
    add_common(recon)
    add_inception(recon)
    add_data(recon)
    recon.add_argument("--tokenizer", required=True, type=harness.input_path(),
                       help="tokenizer checkpoint or diffusers AutoencoderKL folder")
    recon.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True,
                       help="round reconstructions to 8 bits before the metrics, as saved images would be")
    recon.add_argument("--dinov2-size", type=harness.positive_int, default=224,
                       help="FD_DINOv2 input size (rounded to the patch size)")
    recon.add_argument("--dinov2", default="dinov2_vitl14",
                       help="FD_DINOv2 encoder architecture (Stein et al.: ViT-L/14)")
    recon.add_argument("--dinov2-weights", type=harness.input_path(),
                       help="official DINOv2 weights for FD_DINOv2 when no Inception weights are "
                            "given (default: the tokenizer's own encoder)")
    recon.add_argument("--probe-features", default="mean", choices=("mean", "flatten"),
                       help="linear probe on spatially averaged or flattened latents")
    recon.add_argument("--probe-holdout", type=harness.unit_interval, default=0.2,
                       help="held-out fraction for the probe")
    recon.add_argument("--probe-ridge", type=harness.non_negative_float, default=1e-3,
                       help="ridge strength of the probe")

    summary = commands.add_parser("report", help="the embedded demo's metrics.json, recon.png and samples.png, "
                                                 "measured with the stage-0 stand-in encoder")
    add_common(summary)
    add_data(summary)
    summary.add_argument("--stand-in", required=True, type=harness.input_path(),
                         help="stage-0 checkpoint (stand-in encoder + classifier)")
    summary.add_argument("--tokenizer", required=True, type=harness.input_path(),
                       help="tokenizer checkpoint or diffusers AutoencoderKL folder")
    summary.add_argument("--samples", required=True, type=harness.input_path(),
                         help="samples.npz of the sample command (arr_0, arr_1)")
    summary.add_argument("--recon-png", required=True, help="where to write originals over reconstructions")
    summary.add_argument("--samples-png", required=True, help="where to write the samples, one row per class")
    summary.add_argument("--grid-columns", type=harness.positive_int, default=10,
                         help="samples per class in samples.png")

    pca = commands.add_parser("pca", help="input images over their latents' top 3 principal components as RGB")
    add_common(pca)
    add_data(pca)
    pca.set_defaults(num_images=8)
    pca.add_argument("--tokenizer", required=True, type=harness.input_path(),
                       help="tokenizer checkpoint or diffusers AutoencoderKL folder")
    pca.add_argument("--percentile", type=harness.non_negative_float, default=0.0,
                     help="scale each component from this percentile to 100 minus it over all positions to [0, 1], "
                          "clipped (our choice: 0, min to max; 1 keeps outliers from washing out the colours); "
                          "--num-images defaults to 8 here")
    return parser


COMMANDS = {"stats": cmd_stats, "metrics": cmd_metrics, "recon": cmd_recon, "report": cmd_report, "pca": cmd_pca}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in ("stats", "pca") and not args.out:
        raise SystemExit(f"{args.command}: pass --out PATH")
    if getattr(args, "out", None):
        harness.check_writable(args.out)
    if not getattr(args, "allow_tf32", False):
        # TF32 rounds convolution inputs to 10-bit mantissas; keep the features exact
        # float32 so that the numbers compare with pytorch-fid's and ADM's.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    # Nothing here is worth saving half-way: a signal ends the command at once, and since
    # every output is written atomically, each is either whole or absent.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        raise SystemExit(f"stopped by a signal: evaluate.py {args.command} wrote nothing unfinished; rerun the "
                         f"same command") from None


if __name__ == "__main__":
    main()
