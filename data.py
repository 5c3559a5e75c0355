"""
Data shared by the training and evaluation scripts: the embedded synthetic data set,
ImageFolder trees (ImageNet layout), and a batch sampler whose position is the step.

    build_dataset("synthetic", 32)            # generated on the fly, seeded, 10 classes
    build_dataset("/data/imagenet/train", 256)

Every data set yields (image, label) with image a float tensor (3, H, W) in [-1, 1].
"""
import os

import numpy as np
import torch
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
    array = np.asarray(image, dtype=np.uint8)
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


class ImageFolderData(torch.utils.data.Dataset):
    """A torchvision ImageFolder tree (one sub-folder per class), center-cropped and
    resized to image_size. A file that cannot be read stops with its path named."""

    def __init__(self, root, image_size):
        from torchvision.datasets import ImageFolder
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder not found: {root} (pass --data synthetic or an "
                                    f"ImageFolder tree with one sub-folder per class)")
        self.folder = ImageFolder(root)
        self.image_size = image_size
        self.classes = self.folder.classes
        self.targets = self.folder.targets

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, index):
        path, label = self.folder.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as error:
            raise RuntimeError(f"cannot read image {path}: {error} (remove or replace the file)") from None
        return to_tensor(center_crop_resize(image, self.image_size)), label


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


def step_loader(dataset, batch_size, rank, world_size, seed, start_step, workers, device):
    """An endless iterator over this rank's batches from `start_step` on (StepBatchSampler).
    Creating it draws the loader's base seed from the global RNG."""
    sampler = StepBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_step=start_step)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                            pin_memory=device.type == "cuda", persistent_workers=workers > 0))
