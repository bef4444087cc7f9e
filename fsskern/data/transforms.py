"""Episode transforms: PFENet's training augmentation and the three test-time resize rules.

Images arrive as uint8 (H, W, 3) RGB arrays and labels as int64 (H, W) arrays (255 = ignore), as
`Source.load` returns them. Resize, flip, pad and crop go through `torchvision.transforms.v2.functional`
on tv_tensors.Image / tv_tensors.Mask (bilinear for images, nearest for masks; resize on uint8). The
rotation and the blur of the training augmentation, and its foreground-keeping crop, are written here
(each says why); the image is normalised last. All label maps of one image (e.g. the episode mask and
the base-class label) travel stacked as one (L, H, W) mask so they see exactly the same geometry.

Conventions reproduced (see docs/evaluation.md and ../shared/notes/engine-anchors.md c5, c7):
- training: PFENet util/transform.py (RandScale, RandRotate p=0.5, RandomGaussianBlur p=0.5,
  RandomHorizontalFlip p=0.5, Crop 'rand' with the 85 % foreground retry), in that order;
- test "pfenet": PFENet `transform.Resize` (longer side to S, both sides floored to multiples of 8,
  top-left on an S x S canvas of raw pixel 0 / label 255), logits scored at the original label size;
- test "square": HSNet `transforms.Resize((S, S))`; test "original": no resize.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PFENet pads rotated/cropped images with the mean pixel on the 0..255 scale (it normalises to 0).
_MEAN_PIXEL_T = torch.tensor(IMAGENET_MEAN).mul(255).view(3, 1, 1)
_STD_PIXEL_T = torch.tensor(IMAGENET_STD).mul(255).view(3, 1, 1)
IGNORE_INDEX = 255
TEST_RULES = ("pfenet", "square", "original")


def _to_tensors(image: np.ndarray, labels: Sequence[np.ndarray]) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """(H, W, 3) uint8 + L x (H, W) int labels -> Image (3, H, W) uint8 (a channels-last view, no copy)
    and Mask (L, H, W), uint8 when every value fits (fast nearest kernels), int64 otherwise."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if not labels:
        raise ValueError("at least one label map is required")
    for label in labels:
        if label.shape != image.shape[:2]:
            raise ValueError(f"label shape {label.shape} does not match image {image.shape[:2]}")
    with warnings.catch_warnings():
        # Arrays decoded by PIL are read-only; nothing here writes into the input.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    stacked = torch.from_numpy(np.stack(labels))
    low, high = torch.aminmax(stacked)
    if int(low) >= 0 and int(high) <= 255:
        stacked = stacked.to(torch.uint8)
    return img, tv_tensors.Mask(stacked)


def _normalize(img: torch.Tensor) -> torch.Tensor:
    return F.normalize(F.to_dtype(img.as_subclass(torch.Tensor), torch.float32, scale=True),
                       list(IMAGENET_MEAN), list(IMAGENET_STD), inplace=True).contiguous()


def _split_labels(mask: torch.Tensor) -> list[torch.Tensor]:
    return [m.to(torch.int64) for m in mask.as_subclass(torch.Tensor)]


def denormalize(img: torch.Tensor) -> torch.Tensor:
    """Inverse of the ImageNet normalisation for visualisation: (..., 3, H, W) float -> uint8 0..255."""
    mean = torch.tensor(IMAGENET_MEAN, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device).view(3, 1, 1)
    return (img * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def _gaussian_kernel(ksize: int) -> list[float]:
    # cv2.GaussianBlur(img, (k, k), 0) derives sigma from the kernel size this way (1.1 for k = 5).
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return (k / k.sum()).tolist()


def _blur(img: torch.Tensor, kernel: list[float]) -> torch.Tensor:
    """Separable Gaussian blur of a float (C, H, W) image, border reflect-101 as cv2's default.
    Hand-written: v2.functional.gaussian_blur runs a dense k x k depthwise conv2d; on a 3x412x550 image with
    one core here (interleaved runs, best of 15) it took 13.8 ms against 3.7 ms for these two passes."""
    r = len(kernel) // 2
    for dim in (-1, -2):
        n = img.shape[dim]
        padded = nnf.pad(img[None], (r, r, 0, 0) if dim == -1 else (0, 0, r, r), mode="reflect")[0]
        out = padded.narrow(dim, 0, n) * kernel[0]
        for i in range(1, len(kernel)):
            out.add_(padded.narrow(dim, i, n), alpha=kernel[i])
        img = out
    return img


def _rotation_grid(h: int, w: int, angle: float) -> torch.Tensor:
    """grid_sample grid (1, h, w, 2) of cv2.warpAffine with getRotationMatrix2D((w/2, h/2), angle, 1):
    the output pixel (x, y) reads the input at R^-1 ((x, y) - c) + c, angle counter-clockwise in degrees.
    Built as one broadcast sum of an x term (w, 2) and a y term (h, 2) (affine_grid's batched matmul
    costs 3 ms at 375 x 500)."""
    rad = math.radians(angle)
    cos, sin = math.cos(rad), math.sin(rad)
    cx, cy = w / 2, h / 2
    # align_corners=True: pixel index i sits at -1 + 2 i / (n - 1).
    nx, ny = 2 / max(w - 1, 1), 2 / max(h - 1, 1)
    xs = torch.arange(w, dtype=torch.float32) - cx
    ys = torch.arange(h, dtype=torch.float32) - cy
    x_term = torch.stack((cos * nx * xs, sin * ny * xs), dim=-1)  # (w, 2)
    y_term = torch.stack(((-sin * ys + cx) * nx - 1, (cos * ys + cy) * ny - 1), dim=-1)  # (h, 2)
    return (x_term[None, :, :] + y_term[:, None, :])[None]


class TrainTransform:
    """PFENet's training augmentation (dvlab-research/PFENet util/transform.py, train.py order).

    Steps: RandScale(scale) -> RandRotate(+-rotate deg, p=0.5, image fill = the mean pixel, label fill
    255) -> Gaussian blur (p=0.5, 5x5, sigma 1.1 as cv2 derives it) -> horizontal flip (p=0.5) ->
    pad to size (centred, mean pixel / 255) -> random size x size crop, redrawn (up to 30 more
    times) while less than 85 % of labels[0]'s foreground (values not 0/255) survives; the last draw
    is kept, as in PFENet. All randomness comes from the `generator` argument, so the augmentation of
    an episode is a pure function of its seed.

    The resize runs on uint8 (torchvision's native uint8 bilinear kernel, antialiased: it differs from
    cv2.INTER_LINEAR only when downscaling); the image is then made float with the mean pixel
    subtracted, so every later fill (rotation corners, crop padding) is exactly the mean pixel, as in
    PFENet's float32 pipeline, and normalises to 0.

    Returns (image (3, size, size) float32 ImageNet-normalised, [label (size, size) int64, ...]).
    """

    FG_KEEP = 0.85
    CROP_RETRIES = 30
    BLUR_KERNEL = 5

    def __init__(self, size: int, scale=(0.9, 1.1), rotate: float = 10.0, blur: bool = True, flip: bool = True):
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be 0 < min <= max, got {scale}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.rotate = float(rotate)
        self.blur = bool(blur)
        self.flip = bool(flip)
        self._kernel = _gaussian_kernel(self.BLUR_KERNEL)

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, rotate={self.rotate}, "
                f"blur={self.blur}, flip={self.flip})")

    def __call__(self, image: np.ndarray, labels: Sequence[np.ndarray], generator: torch.Generator):
        img, mask = _to_tensors(image, labels)
        # A fixed number of draws per call, whatever branches are taken: the crop offsets are the only
        # other draw and come last.
        u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()

        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        h, w = mask.shape[-2:]
        new_hw = [max(1, round(h * s)), max(1, round(w * s))]  # cv2.resize(fx=fy=s) rounds the same way
        img = F.resize(img, new_hw, interpolation=InterpolationMode.BILINEAR, antialias=True)
        mask = F.resize(mask, new_hw, interpolation=InterpolationMode.NEAREST)
        img = img.as_subclass(torch.Tensor).to(torch.float32, memory_format=torch.contiguous_format)
        img = img.sub_(_MEAN_PIXEL_T)

        if self.rotate > 0 and u[1] < 0.5:
            img, mask = self._rotate(img, mask, -self.rotate + 2 * self.rotate * u[2])
        if self.blur and u[3] < 0.5:
            img = _blur(img, self._kernel)
        if self.flip and u[4] < 0.5:
            img, mask = F.horizontal_flip(img), F.horizontal_flip(mask)

        mask, pad_top, pad_left = self._pad_mask_to_size(mask)
        top, left = self._crop_offsets(mask[0], generator)
        mask = F.crop(mask, top, left, self.size, self.size)
        # The image is not padded first: a window reaching outside it is zero-filled by crop, and zero is
        # the mean pixel here (one copy of the crop instead of a padded copy of the whole image).
        img = F.crop(img, top - pad_top, left - pad_left, self.size, self.size)
        return torch.div(img, _STD_PIXEL_T), _split_labels(mask)

    @staticmethod
    def _rotate(img: torch.Tensor, mask: tv_tensors.Mask, angle: float):
        """Rotation about the centre, size kept (cv2.warpAffine as PFENet's RandRotate). Hand-written on
        grid_sample: v2.functional.rotate converts to float, appends a fill channel and builds its grid with
        affine_grid, once per tensor; for a 3x412x550 image and its mask with one core here (interleaved
        runs, best of 15) it took 31.8 ms against 9.8 ms for this one shared grid. Zero padding is the fill:
        the image is mean-subtracted (fill = mean pixel) and the labels are shifted by -255 around the
        sampling (fill = 255)."""
        h, w = img.shape[-2:]
        grid = _rotation_grid(h, w, angle)
        img = nnf.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        shifted = mask.as_subclass(torch.Tensor).float().sub_(IGNORE_INDEX)
        rotated = nnf.grid_sample(shifted[None], grid, mode="nearest", padding_mode="zeros", align_corners=True)[0]
        return img, tv_tensors.Mask(rotated.add_(IGNORE_INDEX).to(mask.dtype))

    def _pad_mask_to_size(self, mask: tv_tensors.Mask) -> tuple[tv_tensors.Mask, int, int]:
        """Pad the labels with 255 to at least size x size; returns them and the top/left padding. PFENet
        centres the image in the padded frame (cv2.copyMakeBorder with half on each side)."""
        h, w = mask.shape[-2:]
        pad_h, pad_w = max(self.size - h, 0), max(self.size - w, 0)
        if pad_h == 0 and pad_w == 0:
            return mask, 0, 0
        padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]  # left, top, right, bottom
        return F.pad(mask, padding, fill=IGNORE_INDEX), pad_h // 2, pad_w // 2

    def _crop_offsets(self, label: torch.Tensor, generator: torch.Generator) -> tuple[int, int]:
        """PFENet's foreground-preserving random crop. v2.RandomCrop draws one window from the global RNG
        and has no acceptance rule, so the offsets are drawn here: first window, then up to CROP_RETRIES
        redraws while the window keeps < 85 % of the foreground; the last draw wins. All draws are made
        up front (a fixed number per call); windows are counted only until one is accepted."""
        h, w = label.shape
        n = 1 + self.CROP_RETRIES
        tops = torch.randint(0, h - self.size + 1, (n,), generator=generator).tolist()
        lefts = torch.randint(0, w - self.size + 1, (n,), generator=generator).tolist()
        label = label.as_subclass(torch.Tensor)
        fg = (label != 0) & (label != IGNORE_INDEX)
        total = int(fg.sum())
        if total == 0:
            return tops[0], lefts[0]
        s = self.size
        for top, left in zip(tops, lefts):
            if int(fg[top:top + s, left:left + s].sum()) >= self.FG_KEEP * total:
                break
        return top, left


class TestTransform:
    """Test-time resize rules (engine-anchors c5). Returns (image (3, h, w) float32 normalised,
    [label (h, w) int64, ...], restore) where `restore` is a plain dict of ints/strings:
    rule, orig_h, orig_w, content_h, content_w (the resized content inside the canvas), size, score_at.

    - "pfenet" (PFENet `transform.Resize`): longer side -> size with the aspect kept (the shorter side
      truncated with int()), then both sides floored to multiples of 8 (so 473 -> 472); image bilinear
      (no antialias, as cv2.INTER_LINEAR) pasted top-left on a size x size canvas of raw pixel 0 (after
      normalisation -mean/std), labels nearest on a canvas of 255.
    - "square" (HSNet `transforms.Resize((S, S))`): image bilinear (antialiased, as PIL) squashed to
      size x size, labels nearest.
    - "original": nothing resized (h, w = the original size).
    score_at="original" (default) scores at the original label size through `restore_logits`;
    score_at="input" (HSNet's default) scores against the transformed label at the input size.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, size: int, rule: str = "pfenet", score_at: str = "original"):
        if rule not in TEST_RULES:
            raise ValueError(f"unknown test resize rule {rule!r}; expected one of {TEST_RULES}")
        if score_at not in ("original", "input"):
            raise ValueError(f"score_at must be 'original' or 'input', got {score_at!r}")
        self.size, self.rule, self.score_at = int(size), rule, score_at

    def __repr__(self) -> str:
        return f"TestTransform(size={self.size}, rule={self.rule!r}, score_at={self.score_at!r})"

    @staticmethod
    def pfenet_hw(h: int, w: int, size: int) -> tuple[int, int]:
        """PFENet's find_new_hw: longer side -> size, shorter side int(side * ratio), both floored to x8."""
        if h >= w:
            new_h, new_w = size, int(w * (size / h))
        else:
            new_h, new_w = int(h * (size / w)), size
        return new_h // 8 * 8, new_w // 8 * 8

    def __call__(self, image: np.ndarray, labels: Sequence[np.ndarray]):
        img, mask = _to_tensors(image, labels)
        h, w = mask.shape[-2:]
        s = self.size
        if self.rule == "pfenet":
            ch, cw = self.pfenet_hw(h, w, s)
            img = F.resize(img, [ch, cw], interpolation=InterpolationMode.BILINEAR, antialias=False)
            mask = F.resize(mask, [ch, cw], interpolation=InterpolationMode.NEAREST)
            img = F.pad(img, [0, 0, s - cw, s - ch], fill=0)
            mask = F.pad(mask, [0, 0, s - cw, s - ch], fill=IGNORE_INDEX)
        elif self.rule == "square":
            ch, cw = s, s
            img = F.resize(img, [s, s], interpolation=InterpolationMode.BILINEAR, antialias=True)
            mask = F.resize(mask, [s, s], interpolation=InterpolationMode.NEAREST)
        else:
            ch, cw = h, w
        restore = {"rule": self.rule, "orig_h": int(h), "orig_w": int(w), "content_h": int(ch),
                   "content_w": int(cw), "size": s, "score_at": self.score_at}
        return _normalize(img), _split_labels(mask), restore


def _restore_list(restore, batch: int) -> list[dict]:
    """Accept one dict, a list of dicts, or a default_collate'd dict of lists/tensors."""
    if isinstance(restore, Mapping):
        if isinstance(restore["rule"], str):
            return [dict(restore)] * batch
        return [{k: (v[i].item() if torch.is_tensor(v) else v[i]) for k, v in restore.items()} for i in range(batch)]
    restores = list(restore)
    if len(restores) != batch:
        raise ValueError(f"{len(restores)} restore dicts for a batch of {batch} logits")
    return restores


def _restore_one(logits: torch.Tensor, r: Mapping) -> torch.Tensor:
    if r.get("score_at", "original") == "input":
        return logits
    h0, w0 = int(r["orig_h"]), int(r["orig_w"])
    if r["rule"] == "pfenet":
        # PFENet (ori_resize): the whole size x size canvas upsampled to L x L, L = max(H0, W0), scored
        # against the original label padded with 255 to L x L; the padded part is all ignore, so cropping
        # [:H0, :W0] gives the same counts.
        side = max(h0, w0)
        out = nnf.interpolate(logits[None], size=(side, side), mode="bilinear", align_corners=True)[0]
        return out[:, :h0, :w0]
    if r["rule"] == "square":
        # HSNet --use_original_imgsize.
        return nnf.interpolate(logits[None], size=(h0, w0), mode="bilinear", align_corners=True)[0]
    if r["rule"] == "original":
        return logits[:, :h0, :w0]  # drop any padding a collate added on the bottom/right
    raise ValueError(f"unknown restore rule {r['rule']!r}")


def restore_logits(logits: torch.Tensor, restore):
    """Map logits from the network input back to where they are scored.

    logits (C, h, w) with one restore dict -> (C, H0, W0); logits (B, C, h, w) with a list of B restore
    dicts (or a collated dict) -> a list of B tensors (C, H0_i, W0_i) (sizes differ between images).
    With score_at="input" the logits are returned unchanged (scored against the transformed label).
    Works for any batch size (PFENet's own code assumes batch 1).
    """
    if logits.dim() == 3:
        return _restore_one(logits, restore if isinstance(restore, Mapping) else _restore_list(restore, 1)[0])
    if logits.dim() != 4:
        raise ValueError(f"logits must be (C, h, w) or (B, C, h, w), got {tuple(logits.shape)}")
    return [_restore_one(lg, r) for lg, r in zip(logits, _restore_list(restore, logits.shape[0]))]


def from_config(cfg_data, train: bool, rule: str | None = None, score_at: str = "original"):
    """Build the transform a data config asks for: TrainTransform(train_size, **augment) when training,
    TestTransform(test_size, rule) otherwise (rule defaults to "pfenet"; a protocol passes its own)."""
    if train:
        augment = getattr(cfg_data, "augment", None) or {}
        if not isinstance(augment, Mapping):
            augment = vars(augment)
        unknown = set(augment) - {"scale", "rotate", "blur", "flip"}
        if unknown:
            raise ValueError(f"unknown augment keys {sorted(unknown)}; expected scale, rotate, blur, flip")
        return TrainTransform(cfg_data.train_size, **{k: (tuple(v) if k == "scale" else v) for k, v in augment.items()})
    return TestTransform(cfg_data.test_size, rule or "pfenet", score_at=score_at)
