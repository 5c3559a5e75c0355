"""
The latent cache: every training image and its horizontal flip encoded once by a trained
tokenizer, stored as one memory-mapped .npy that LightningDiT training reads batches from.
Its name is a hash of what the latents depend on (the tokenizer's encoder and adapter, the
data, the storage type), so a changed tokenizer or data set gets a new file and an
unchanged one is reused across runs.
"""
import errno
import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from data import ReportUnreadable
import harness
from training import autocast, barrier
from weights import hash_weights


def tokenizer_fingerprint(tokenizer):
    """sha256 of everything encode() depends on: the config without the decoder fields and
    the encoder and adapter weights. Hashing these rather than the file keeps the cache
    valid for a copied, moved or decoder-only (stage 3) checkpoint with the same latents,
    and rebuilds it whenever the latents could differ."""
    digest = hashlib.sha256()
    config = {k: v for k, v in tokenizer.config.items() if not k.startswith("decoder")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    hash_weights(digest, ((name, tensor) for name, tensor in tokenizer.state_dict().items()
                          if name.startswith(("encoder.", "adapter."))))
    return digest.hexdigest()


def data_fingerprint(args, dataset, image_size):
    """What pins the images: the synthetic set's size and seed, or an ImageFolder's file list
    and labels (relative paths, so a moved copy of the tree keeps its cache)."""
    fingerprint = dict(data=args.data if args.data == "synthetic" else "folder", num_images=len(dataset),
                       image_size=image_size, num_classes=len(dataset.classes))
    if args.data == "synthetic":
        fingerprint["seed"] = args.seed
    else:
        listing = "\n".join(f"{os.path.relpath(path, args.data)}\t{label}" for path, label in dataset.folder.samples)
        fingerprint["files"] = hashlib.sha256(listing.encode()).hexdigest()
    return fingerprint


def read_cache_header(path, fingerprint, shape):
    """The cache's header if latents and header exist and match, else None."""
    try:
        with open(path.removesuffix(".npy") + ".json") as f:
            header = json.load(f)
        latents = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    matches = (header.get("fingerprint") == json.loads(json.dumps(fingerprint))
               and latents.shape == tuple(shape) and str(latents.dtype) == fingerprint["dtype"])
    return header if matches else None


@torch.no_grad()
def cache_latents(tokenizer, dataset, args, rank, world_size, device, expected_key=None, stop=None):
    """Returns the path of the latent cache of `dataset` under `tokenizer`, building it if needed.

    Layout: <cache-dir>/latents-<key>.npy, an array (N, 2, C, h, w) of --cache-dtype, where
    [:, 0] is the raw latent z of image i and [:, 1] that of its horizontal flip. Raw, not
    normalised: the tokenizer's latent_mean / latent_std are applied when batches are drawn,
    so the statistics are never baked into the cache. Beside it, latents-<key>.json holds
    the header: the fingerprint (tokenizer_fingerprint, data_fingerprint, dtype), whose
    sha256 is the <key>, plus the tokenizer and data paths for reference. Several tokenizers
    can share one cache folder; a changed tokenizer or data set gets a new key, so a new file.
    Labels are not stored: the fingerprint pins the data set, whose targets give them.

    Under torchrun each rank encodes a contiguous block of images into its rows of one
    temporary file and leaves a done mark; rank 0 waits for the marks, renames the file into
    place and writes the header last (the header is the commit mark, which the other ranks
    wait for). The cache folder must be visible to every rank.
    expected_key (a resumed run's) stops with an error before anything is encoded if the
    tokenizer or data differ from the run's. stop (a StopSignal): a signal stops the build
    within one batch, since an ImageNet build takes longer than a scheduler's grace period;
    the build is not resumable, so the next run starts it again.
    The .npy is memory-mapped for training, so ImageNet's cache (1.28M x 2 x 32 x 16 x 16,
    42 GB in float16) is shared by the ranks through the page cache instead of loaded 8 times.
    """
    folder = args.cache_dir or os.path.join(args.out, "latents")
    channels, (h, w) = tokenizer.latent_mean.numel(), tokenizer.grid_size
    shape = (len(dataset), 2, channels, h, w)
    fingerprint = dict(tokenizer=tokenizer_fingerprint(tokenizer),
                       data=data_fingerprint(args, dataset, tokenizer.image_size), dtype=args.cache_dtype)
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(folder, f"latents-{key}.npy")
    if expected_key is not None and key != expected_key:
        raise SystemExit(f"error: the checkpoint in {args.out} was trained on other latents (key {expected_key}, "
                         f"this command gives {key}); resume with the run's own --tokenizer and data flags "
                         f"(they are in the checkpoint's args)")
    found = [read_cache_header(path, fingerprint, shape) is not None]
    if world_size > 1:  # rank 0 decides, so that no rank skips the barriers the others wait at
        torch.distributed.broadcast_object_list(found, src=0)
    if found[0]:
        if rank == 0:
            print(f"latent cache: reusing {path}")
        return path, key

    # Every rank writes its contiguous block of images straight into its rows of one file
    # that rank 0 creates, so nothing is merged afterwards (a merge of ImageNet's 42 GB kept the other
    # ranks at a barrier long enough to time out). One token per run folder, so that two
    # jobs building the same cache do not write the same file.
    token = hashlib.sha256(os.path.abspath(args.out).encode()).hexdigest()[:8]
    temporary = f"{path}.{token}.partial"
    done_marks = [f"{temporary}.rank{r}of{world_size}.done" for r in range(world_size)]
    stop_mark = f"{temporary}.stopped"          # left by a rank that got a signal: the others stop waiting
    header_path = path.removesuffix(".npy") + ".json"
    if rank == 0:
        # One builder per cache at a time (two would write one file); other caches in the
        # folder are free to build. The lock is held until this process ends.
        harness.lock_folder(folder, "--cache-dir", name=f".latents-{key}.lock")
        # A memmap that meets a full disk ends in a bus error, not an exception.
        harness.check_free_space(folder, int(np.prod(shape)) * np.dtype(args.cache_dtype).itemsize, "the latent cache",
                         "--cache-dir")
        for stale in [header_path, stop_mark] + done_marks:        # left by an interrupted build
            if os.path.exists(stale):
                os.remove(stale)
        try:
            np.lib.format.open_memmap(temporary, mode="w+", dtype=args.cache_dtype, shape=shape).flush()
            with open(temporary, "r+b") as f:    # reserve the blocks now, not at the first write into a hole
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(temporary))
        except OSError as error:             # the disk filled since the check (another job writing to it)
            if os.path.exists(temporary):
                os.remove(temporary)
            if error.errno != errno.ENOSPC:
                raise
            raise harness.no_space_left(folder, temporary) from None
    barrier(world_size)                                  # the ranks arrive together: only the cache check ran
    start, end = rank * len(dataset) // world_size, (rank + 1) * len(dataset) // world_size
    data_offset = np.load(temporary, mmap_mode="r").offset          # bytes before row 0
    row_bytes = int(np.prod(shape[1:])) * np.dtype(args.cache_dtype).itemsize
    # Plain positioned writes, not a shared memmap: the ranks' blocks meet inside pages,
    # and ranks on other nodes only see whole closed writes on a network file system.
    with open(temporary, "r+b") as cache_file:
        loader = torch.utils.data.DataLoader(ReportUnreadable(torch.utils.data.Subset(dataset, range(start, end))),
                                             batch_size=args.cache_batch_size, num_workers=args.workers)
        offset, unreadable = start, []
        for images, _, problems in tqdm(loader, desc=f"encoding latents (rank 0 of {world_size})", disable=rank != 0,
                              dynamic_ncols=True):
            images = images.to(device)
            with autocast(device):
                z = tokenizer.encode(torch.cat((images, images.flip(-1)))).float()   # (2n, C, h, w)
            pairs = torch.stack(z.chunk(2), dim=1).cpu().numpy().astype(args.cache_dtype)  # (n, 2, C, h, w)
            if not np.isfinite(pairs).all():
                raise SystemExit(f"error: the tokenizer gave non-finite latents (or they overflow {args.cache_dtype}; "
                                 f"try --cache-dtype float32); check --tokenizer {args.tokenizer}")
            cache_file.seek(data_offset + offset * row_bytes)
            cache_file.write(np.ascontiguousarray(pairs).data)
            offset += len(pairs)
            unreadable += [problem for problem in problems if problem]
            if stop is not None and stop.name is not None:   # this rank's own signal: no collective here
                open(stop_mark, "w").close()
                print(f"stopped by {stop.name} while encoding the latent cache ({offset - start} of {end - start} "
                      f"images of rank {rank}); no training step was lost. Rerun the same command (with --resume "
                      f"if the run has a checkpoint) to build the cache again", flush=True)
                raise SystemExit(harness.STOPPED)
    if unreadable:   # every image has a row: name them all, and leave the cache uncommitted
        raise SystemExit(f"error: {len(unreadable)} images of --data cannot be read (remove or replace them, then "
                         f"run again): {'; '.join(unreadable)}")
    open(done_marks[rank], "w").close()
    # The ranks' blocks differ by at most one image, but encoding times still vary; the waits
    # go through the file system (harness.wait_for_files), which no process-group timeout cuts short.
    if rank == 0:
        harness.wait_for_files(done_marks, "latent cache parts", stop_mark, args.wait_timeout, stop)
        os.replace(temporary, path)
        header = dict(fingerprint=fingerprint, shape=list(shape), tokenizer_path=os.path.abspath(args.tokenizer),
                      data_path=args.data if args.data == "synthetic" else os.path.abspath(args.data),
                      layout="(N, 2, C, h, w): [:, 0] image i, [:, 1] its horizontal flip; raw z, not normalised")
        with harness.atomic_path(header_path) as temporary_header, open(temporary_header, "w") as f:
            json.dump(header, f, indent=1)
        for mark in done_marks:
            os.remove(mark)
        print(f"latent cache: wrote {path}")
    else:
        harness.wait_for_files([header_path], "latent cache header", stop_mark, args.wait_timeout, stop)
    return path, key


class LatentPairs(torch.utils.data.Dataset):
    """Item i: (the cached latent pair (2, C, h, w) as float32, label i). The .npy is opened
    lazily in each process: a memmap handed to a worker would be pickled as a full copy."""

    def __init__(self, path, targets):
        self.path, self.targets, self.latents = path, list(targets), None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        if self.latents is None:
            self.latents = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(self.latents[index].astype(np.float32)), self.targets[index]
