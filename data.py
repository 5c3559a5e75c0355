"""
Data shared by the training and evaluation scripts: the embedded synthetic data set,
ImageFolder trees (ImageNet layout), and a batch sampler whose position is the step.

    build_dataset("synthetic", 32)            # generated on the fly, seeded, 10 classes
    build_dataset("/data/imagenet/train", 256)

Every data set yields (image, label) with image a float tensor (3, H, W) in [-1, 1].
"""
import os
import signal

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


#################################################################################
#                        The embedded synthetic data set                        #
#################################################################################

SYNTHETIC_CLASSES = ("disk", "square", "triangle", "ring", "plus",
                     "horizontal-stripes", "vertical-stripes", "checkerboard", "diamond", "cross")


def _shape_mask(name, u, v):
    """Inside-mask of a shape in coordinates (u, v) scaled so the shape spans about [-1, 1]."""
    box = np.maximum(np.abs(u), np.abs(v))
    if name == "disk":
        return u ** 2 + v ** 2 <= 1
    if name == "square":
        return box <= 0.8
    if name == "triangle":
        return (v >= -0.9) & (v <= 0.8) & (np.abs(u) <= (v + 0.9) * 0.56)
    if name == "ring":
        radius = np.sqrt(u ** 2 + v ** 2)
        return (radius >= 0.55) & (radius <= 1)
    if name == "plus":
        return ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (box <= 1)
    if name == "horizontal-stripes":
        return (box <= 1) & (np.floor((v + 1) * 2.5) % 2 == 0)
    if name == "vertical-stripes":
        return (box <= 1) & (np.floor((u + 1) * 2.5) % 2 == 0)
    if name == "checkerboard":
        return (box <= 1) & ((np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 0)
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if name == "cross":
        return ((np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4)) & (box <= 1)
    raise ValueError(name)


def render_synthetic(label, rng, size):
    """One image (size, size, 3) uint8 of class `label`: a coloured shape at a random
    place and scale on a shaded background, drawn at 2x and averaged for anti-aliasing."""
    big = 2 * size
    y, x = np.mgrid[0:big, 0:big].astype(np.float32) + 0.5
    cx, cy = rng.uniform(0.38, 0.62, size=2) * big
    radius = rng.uniform(0.24, 0.34) * big
    mask = _shape_mask(SYNTHETIC_CLASSES[label], (x - cx) / radius, (y - cy) / radius)
    # Bright saturated foreground over a dark background, so shape, not colour, is the class.
    foreground = rng.uniform(0.2, 0.6, size=3)
    foreground[rng.integers(3)] = rng.uniform(0.85, 1.0)
    background = rng.uniform(0.0, 0.3, size=3)
    ramp = rng.uniform(-0.1, 0.1) * (x / big - 0.5) + rng.uniform(-0.1, 0.1) * (y / big - 0.5)
    image = np.where(mask[..., None], foreground, background + ramp[..., None])
    image = image.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


class SyntheticShapes(torch.utils.data.Dataset):
    """A labelled, seeded data set generated on the fly: image i of a split is always the
    same picture. Classes cycle with the index, so every class is equally frequent."""

    def __init__(self, image_size=32, num_images=10000, split="train", seed=0):
        self.image_size, self.num_images, self.seed = image_size, num_images, seed
        self.split_id = {"train": 0, "val": 1}[split]
        self.classes = list(SYNTHETIC_CLASSES)
        self.targets = [i % len(SYNTHETIC_CLASSES) for i in range(num_images)]
        # Rendered images, kept: drawing one costs ~1 ms, and the demo draws each image up to
        # 5 times a stage (stage 0: 800 steps of 64 of 10,000); 3 KB an image at 32 px.
        self.rendered = {}

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        label = self.targets[index]
        if index not in self.rendered:
            rng = np.random.default_rng([self.seed, self.split_id, index])
            self.rendered[index] = render_synthetic(label, rng, self.image_size)
        return to_tensor(self.rendered[index]), label


#################################################################################
#                          ImageFolder (real data)                              #
#################################################################################

def to_tensor(image):
    """uint8 (H, W, 3) array or PIL image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.array(image, dtype=np.uint8)     # a copy: PIL's buffer is read-only, which torch warns about
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1


def center_crop_resize(image, size):
    """ADM's center crop: halve with a box filter while large, resize the short side to
    `size` with bicubic, then crop the center square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


# Limits checked on the header, before any pixel is decoded (our choice): a 957-byte PNG of
# 300000x1 px is small on disk, but resizing its short side to 32 px made 2.2 GB of pixels.
MAX_PIXELS = 2 ** 27          # 134M pixels, 16K x 8K (Pillow itself refuses beyond 179M)
MAX_ASPECT = 32               # long side / short side


def to_rgb(image):
    """8-bit RGB. Pillow's convert("RGB") clips 16-bit and 32-bit images at 255 (they turn
    white), so those are scaled here: 16-bit by 65535 (a 32-bit integer image whose values
    fit 16 bits is a 16-bit PNG as older Pillows open it), other 32-bit integers by 2^31 - 1,
    and float images taken as [0, 1] (our choice)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0
    else:
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else 2.0 ** 31 - 1
    gray = (np.clip(array / top, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


def read_image(path, size):
    """The image file at `path` as `size` px RGB (center_crop_resize), or an exception
    whose text says what is wrong with it."""
    with Image.open(path) as image:
        width, height = image.size
        if width * height > MAX_PIXELS or max(width, height) > MAX_ASPECT * min(width, height):
            raise ValueError(f"{width}x{height} px is beyond our limits ({MAX_PIXELS} pixels, sides at most "
                             f"{MAX_ASPECT}:1), refused before decoding it")
        image.load()
        return center_crop_resize(to_rgb(image), size)


class ImageFolderData(torch.utils.data.Dataset):
    """A torchvision ImageFolder tree (one sub-folder per class), center-cropped and
    resized to image_size. A file that cannot be read stops with its path named; training
    reads it through SkipUnreadable instead."""

    def __init__(self, root, image_size):
        from torchvision.datasets import ImageFolder
        if not os.path.isdir(root):
            raise SystemExit(f"error: data folder not found: {root} (pass --data synthetic or an "
                             f"ImageFolder tree with one sub-folder per class)")
        try:
            self.folder = ImageFolder(root)
        except FileNotFoundError as error:       # no class folders, or no image in any of them
            raise SystemExit(f"error: --data {root}: {error} (an ImageFolder tree has one sub-folder of images "
                             f"per class)") from None
        self.image_size = image_size
        self.classes = self.folder.classes
        self.targets = self.folder.targets

    def __len__(self):
        return len(self.folder)

    def read(self, index):
        path, label = self.folder.samples[index]
        return to_tensor(read_image(path, self.image_size)), label

    def __getitem__(self, index):
        try:
            return self.read(index)
        except Exception as error:
            raise RuntimeError(f"cannot read image {self.folder.samples[index][0]}: {error} "
                               f"(remove or replace the file)") from None


class SkipUnreadable(torch.utils.data.Dataset):
    """ImageFolderData for training: an unreadable image (truncated, empty, not an image,
    beyond the size limits) is replaced by the next readable one, so the data order stays a
    function of the step and a resumed run draws the same batches. Items are (image, label,
    the skipped files as "path: reason" lines); step_loader takes the third part off and logs it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        skipped = []
        for i in range(index, index + len(self.dataset)):
            try:
                return (*self.dataset.read(i % len(self.dataset)), "\n".join(skipped))
            except Exception as error:
                skipped.append(f"{self.dataset.folder.samples[i % len(self.dataset)][0]}: {error}")
        raise SystemExit(f"error: no image of --data {self.dataset.folder.root} can be read ({skipped[0]})")


class ReportUnreadable(torch.utils.data.Dataset):
    """For commands that must see every image (evaluate.py stats and recon): an unreadable
    image of an ImageFolderData (or a Subset of one) becomes a blank item carrying its
    "path: reason", so that the caller can name every unreadable file, not only the first.
    Items are (image, label, "" or "cannot read image PATH: reason")."""

    def __init__(self, dataset):
        self.dataset = dataset
        inner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
        self.image_size = inner.image_size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return (*self.dataset[index], "")
        except RuntimeError as error:
            if not str(error).startswith("cannot read image"):
                raise
            return torch.zeros(3, self.image_size, self.image_size), -1, str(error)


def skipping_unreadable(dataset):
    """What training reads: an ImageFolderData through SkipUnreadable, any other data set as it is."""
    return SkipUnreadable(dataset) if isinstance(dataset, ImageFolderData) else dataset


def build_dataset(data, image_size, split="train", num_images=10000, seed=0):
    """'synthetic' for the embedded data set, else the path of an ImageFolder tree."""
    if data == "synthetic":
        return SyntheticShapes(image_size, num_images, split, seed)
    return ImageFolderData(data, image_size)


#################################################################################
#                      Batches whose position is the step                       #
#################################################################################

class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches forever, starting at `start_step`.

    Epoch e is a permutation seeded by (seed, e); global batch b of that epoch is split
    across ranks. Batch s depends only on (seed, s), so resuming at step s continues the
    same data order, whatever the number of workers.
    """

    def __init__(self, dataset_size, batch_size, rank=0, world_size=1, seed=0, start_step=0):
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.rank, self.world_size, self.seed, self.start_step = rank, world_size, seed, start_step
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = dataset_size // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data set has {dataset_size} images, fewer than one global batch "
                             f"of {self.global_batch}; lower --batch-size")

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, position = divmod(step, self.steps_per_epoch)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
            for b in range(position, self.steps_per_epoch):
                start = b * self.global_batch + self.rank * self.batch_size
                yield order[start:start + self.batch_size].tolist()
            step = (epoch + 1) * self.steps_per_epoch


class StepLoader:
    """The batches (inputs, labels) of a step_loader. Unreadable images that SkipUnreadable
    replaced are printed once each, counted (bad_images in metrics.jsonl, kept in the
    checkpoint so that a resumed run goes on counting), and stop the run with one line when
    more than max_bad_images of the data set is unreadable: over all ranks, checked whenever
    the ranks gather their counts (each logged step and checkpoint), and at once when one
    rank's own count is past the bound."""

    def __init__(self, batches, dataset_size, max_bad_images, known_bad=()):
        self.batches, self.dataset_size, self.max_bad_images = batches, dataset_size, max_bad_images
        self.bad = dict.fromkeys(known_bad)             # "path: reason" -> None, in the order found

    def __next__(self):
        batch = next(self.batches)
        if len(batch) == 2:
            return batch
        for line in "\n".join(batch[2]).splitlines():
            if line and line not in self.bad:
                self.bad[line] = None
                print(f"skipped unreadable image {line}", flush=True)
        self.check_bound(self.bad)
        return batch[0], batch[1]

    def check_bound(self, bad):
        if len(bad) > self.max_bad_images * self.dataset_size:
            raise SystemExit(f"error: {len(bad)} unreadable images (one: {next(iter(bad))}), more than "
                             f"--max-bad-images {self.max_bad_images} of {self.dataset_size}; fix the data set "
                             f"or raise --max-bad-images, then --resume")

    def bad_images(self, world_size):
        """Every unreadable image found so far by any rank, before a resume too, as sorted
        "path: reason" lines (all ranks call it, and all stop together past the bound)."""
        if world_size == 1:
            return sorted(self.bad)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, list(self.bad))
        bad = sorted(set().union(*gathered))
        self.check_bound(bad)
        return bad


def _ignore_stop_signals(worker_id):
    # Ctrl-C and SLURM's SIGTERM reach the workers too; only the main process handles them (it
    # stops after the step, then ends the workers). A worker killed first would crash the save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def step_loader(dataset, batch_size, rank, world_size, seed, start_step, workers, device, max_bad_images=0.0,
                known_bad=()):
    """An endless iterator over this rank's batches from `start_step` on (StepBatchSampler).
    Images of a folder that cannot be read are skipped (SkipUnreadable, StepLoader);
    known_bad: those a resumed run had found.
    Creating it draws the loader's base seed from the global RNG."""
    dataset = skipping_unreadable(dataset)
    sampler = StepBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_step=start_step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                         worker_init_fn=_ignore_stop_signals if workers > 0 else None)
    return StepLoader(iter(loader), len(dataset), max_bad_images, known_bad)
