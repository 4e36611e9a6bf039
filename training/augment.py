"""Patch sampling and augmentation on tensors, seeded by a torch.Generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Sample


@dataclass
class AugmentConfig:
    flips: bool = True
    rot90: bool = True
    affine: bool = True
    max_rotation_deg: float = 15.0
    max_scale: float = 0.1
    intensity: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.1
    #: per-channel shifts and gains (in standard deviations): the colour balance of
    #: another camera; 0 leaves the channels together
    colour: float = 0.0
    #: largest Gaussian blur sigma (pixels), applied to half the patches: a softer lens or
    #: a photograph resized up; 0: none
    blur: float = 0.0
    #: largest standard deviation of added Gaussian noise (in standard deviations); 0: none
    noise: float = 0.0
    #: share of patches passed through a JPEG encoder and back (8x8 block edges, ringing and,
    #: for colour, halved chroma): photographs saved as JPEG by the camera or a PACS; 0: none
    jpeg: float = 0.0
    #: lowest and highest JPEG quality drawn for those patches
    jpeg_quality: tuple[int, int] = (30, 90)


class PatchSampler:
    """Random patches (or whole images) from samples, drawn with a seeded generator.

    Patches are centred anywhere the field of view covers at least one pixel of the
    patch, as DRIVE's random 64x64 patches are in the paper.
    """

    def __init__(self, samples: list[Sample], patch_size: int | None, generator: torch.Generator):
        self.samples, self.patch_size, self.generator = samples, patch_size, generator
        weights = [float(getattr(s, "weight", 1.0)) for s in samples]
        # equal weights draw as they always have (a run's draws stay what they were)
        self.weights = None if len(set(weights)) <= 1 else torch.tensor(weights, dtype=torch.float64)
        self.images = [torch.from_numpy(s.image).permute(2, 0, 1).contiguous() for s in samples]
        self.masks = [torch.from_numpy(s.mask.astype(np.float32))[None] for s in samples]
        self.fovs = [torch.from_numpy(s.fov.astype(np.float32))[None] for s in samples]
        if patch_size is not None:
            for s in samples:
                if min(s.mask.shape) < patch_size:
                    raise ValueError(
                        f"{s.name}: image {s.mask.shape} is smaller than the patch size {patch_size}"
                    )

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.generator))

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images B,C,P,P; masks B,1,P,P; fov B,1,P,P)."""
        xs, ys, fs = [], [], []
        for _ in range(batch_size):
            i = (
                self._randint(len(self.samples))
                if self.weights is None
                else int(torch.multinomial(self.weights, 1, generator=self.generator))
            )
            image, mask, fov = self.images[i], self.masks[i], self.fovs[i]
            if self.patch_size is not None:
                p = self.patch_size
                for _attempt in range(20):
                    y, x = self._randint(image.shape[1] - p + 1), self._randint(image.shape[2] - p + 1)
                    if fov[0, y + p // 2, x + p // 2] > 0:
                        break
                image, mask, fov = (t[:, y : y + p, x : x + p] for t in (image, mask, fov))
            xs.append(image)
            ys.append(mask)
            fs.append(fov)
        return torch.stack(xs), torch.stack(ys), torch.stack(fs)


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment(
    images: torch.Tensor,
    masks: torch.Tensor,
    fov: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Geometric transforms on image, mask and FOV alike; intensity on the image only."""
    n = images.shape[0]
    stacked = torch.cat((images, masks, fov), dim=1)
    if config.flips:
        flip = torch.rand(n, generator=generator) < 0.5
        stacked[flip] = stacked[flip].flip(-1)
        flip = torch.rand(n, generator=generator) < 0.5
        stacked[flip] = stacked[flip].flip(-2)
    if config.rot90 and stacked.shape[-1] == stacked.shape[-2]:
        turns = torch.randint(0, 4, (n,), generator=generator)
        stacked = torch.stack([torch.rot90(s, int(k), dims=(-2, -1)) for s, k in zip(stacked, turns)])
    if config.affine:
        angle = _uniform(generator, n, -1, 1) * math.radians(config.max_rotation_deg)
        scale = 1 + _uniform(generator, n, -config.max_scale, config.max_scale)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = F.affine_grid(theta, list(stacked.shape), align_corners=False)
        stacked = F.grid_sample(
            stacked, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
    c = images.shape[1]
    images, masks, fov = (
        stacked[:, :c],
        (stacked[:, c : c + 1] > 0.5).float(),
        (stacked[:, c + 1 :] > 0.5).float(),
    )
    if config.intensity:
        shape = (n, 1, 1, 1)
        contrast = 1 + _uniform(generator, n, -config.contrast, config.contrast).view(shape)
        brightness = _uniform(generator, n, -config.brightness, config.brightness).view(shape)
        images = images * contrast + brightness
        gamma = torch.exp(_uniform(generator, n, -config.gamma, config.gamma)).view(shape)
        # gamma on a standardized image: applied to its sign-preserving magnitude
        images = torch.sign(images) * images.abs().pow(gamma)
    # camera differences, each drawn only when asked for (a config without them draws as before)
    if config.colour:
        shape = (n, c, 1, 1)
        gain = 1 + _uniform(generator, n * c, -config.colour, config.colour).view(shape)
        shift = _uniform(generator, n * c, -config.colour, config.colour).view(shape)
        images = images * gain + shift
    if config.blur:
        images = _blur(
            images, _uniform(generator, n, 0, config.blur), torch.rand(n, generator=generator) < 0.5
        )
    if config.noise:
        sigma = _uniform(generator, n, 0, config.noise).view(n, 1, 1, 1)
        images = images + sigma * torch.randn(images.shape, generator=generator)
    if config.jpeg:
        chosen = torch.rand(n, generator=generator) < config.jpeg
        low, high = config.jpeg_quality
        qualities = torch.randint(int(low), int(high) + 1, (n,), generator=generator)
        images = _jpeg(images, qualities, chosen)
    return images.contiguous(), masks, fov


def _jpeg(images: torch.Tensor, qualities: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The chosen (standardized) images through a JPEG round trip at their quality: each is
    mapped to 0-255 by its own range, encoded, decoded and mapped back, so only the codec's
    losses remain. One or three channels (others are left as they are)."""
    import io

    from PIL import Image

    c = images.shape[1]
    if c not in (1, 3):
        return images
    out = images.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        image = images[i].float()
        low, high = float(image.min()), float(image.max())
        if high - low < 1e-6:
            continue
        pixels = ((image - low) * (255.0 / (high - low))).round().clamp(0, 255).to(torch.uint8)
        array = pixels.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if c == 1 else array).save(
            buffer, format="JPEG", quality=int(qualities[i])
        )
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32)
        decoded = torch.from_numpy(decoded.reshape(array.shape)).permute(2, 0, 1)
        out[i] = (decoded * ((high - low) / 255.0) + low).to(images.dtype)
    return out


def _blur(images: torch.Tensor, sigmas: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of the chosen images, each with its own sigma (separable, reflected edges)."""
    out = images.clone()
    for i in torch.nonzero(chosen & (sigmas > 0.1)).flatten().tolist():
        sigma = float(sigmas[i])
        radius = max(1, math.ceil(3 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=images.dtype)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        c = images.shape[1]
        image = F.pad(images[i : i + 1], (radius, radius, radius, radius), mode="reflect")
        image = F.conv2d(image, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        out[i : i + 1] = F.conv2d(image, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return out
