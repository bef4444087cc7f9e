"""Episode transforms: PFENet's training augmentation and the three test-time resize rules.

Images arrive as uint8 (H, W, 3) RGB arrays and labels as integer (H, W) arrays (255 = ignore), as
`Source.load` returns them. The training augmentation runs PFENet's own cv2 calls on uint8 (bilinear for
images, nearest for labels) and makes only the final crop float (`TrainTransform` says why not
torchvision). The test rules go through `torchvision.transforms.v2.functional` on tv_tensors.Image /
tv_tensors.Mask (resize on uint8). All label maps of one image (e.g. the episode mask and the base-class
label) see exactly the same geometry; the image is normalised last.

Conventions reproduced (see docs/evaluation.md and ../shared/notes/engine-anchors.md c5, c7):
- training: PFENet util/transform.py (RandScale, RandRotate p=0.5, RandomGaussianBlur p=0.5,
  RandomHorizontalFlip p=0.5, Crop 'rand' with the 85 % foreground retry), in that order;
- test "pfenet": PFENet `transform.Resize` (longer side to S, both sides floored to multiples of 8,
  top-left on an S x S canvas of raw pixel 0 / label 255), logits scored at the original label size;
- test "square": HSNet `transforms.Resize((S, S))`; test "original": no resize.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
TEST_RULES = ("pfenet", "square", "original")


def _check_inputs(image: np.ndarray, labels: Sequence[np.ndarray]) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if not labels:
        raise ValueError("at least one label map is required")
    for label in labels:
        if label.shape != image.shape[:2]:
            raise ValueError(f"label shape {label.shape} does not match image {image.shape[:2]}")


def _to_tensors(image: np.ndarray, labels: Sequence[np.ndarray]) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """(H, W, 3) uint8 + L x (H, W) int labels -> Image (3, H, W) uint8 (a channels-last view, no copy)
    and Mask (L, H, W), uint8 when every value fits (fast nearest kernels), int64 otherwise."""
    _check_inputs(image, labels)
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


# cv2 runs the training augmentation on uint8 in one thread, as PFENet's loader does (cv2.setNumThreads(0)):
# its thread pool would only add overhead on ~500 x 375 images and oversubscribe DataLoader workers.
cv2.setNumThreads(0)
# The rotation fill in uint8 (the float mean pixel is 123.675, 116.28, 103.53). The rotation carries an alpha
# channel (255 inside, 0 = fill): pixels with alpha 0 (all fill, also after the blur) are set to exactly 0 after
# normalisation; the rounding only touches pixels that mix fill and image (rotation or blur edges).
_FILL_RGBA = tuple(round(255 * m) for m in IMAGENET_MEAN) + (0,)
_BLUR_KSIZE = 5  # PFENet RandomGaussianBlur(radius=5): cv2.GaussianBlur(image, (5, 5), 0), sigma 1.1
# uint8 level -> ImageNet-normalised float32, one table per channel (cv2.LUT: one SIMD pass, no temporaries).
_NORMALIZE_LUT = [((np.arange(256) - 255 * m) / (255 * s)).astype(np.float32)[None]
                  for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]


def _label_stacks(labels: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The label maps packed 4 to a (H, W, 4) array (the last one padded with copies): one cv2 call then moves
    up to four maps, and a 4-channel nearest warp costs about one 1-channel warp (2 or 3 channels cost more).
    uint8, or uint16 when the ids need it (the dtypes cv2's nearest resize and warp take)."""
    high = 0
    for label in labels:
        if label.dtype.kind not in "ui":
            raise ValueError(f"training labels must be integer arrays, got {label.dtype}")
        # One reduction instead of min and max: negative values wrap to huge unsigned ones.
        high = max(high, int(label.view(f"u{label.dtype.itemsize}").max()))
    if high > 65535:
        raise ValueError(f"training labels must lie in 0..65535, got a value outside (max as unsigned: {high})")
    dtype = np.uint8 if high <= 255 else np.uint16
    planes = [label.astype(dtype, copy=False) for label in labels]
    planes += [planes[-1]] * (-len(planes) % 4)
    return [cv2.merge(planes[i:i + 4]) for i in range(0, len(planes), 4)]


def _rotate(image: np.ndarray, stacks: list[np.ndarray], angle: float):
    """PFENet RandRotate: cv2.warpAffine about (w/2, h/2) (pixel indices), size kept, angle counter-clockwise in
    degrees; image bilinear with the mean pixel as fill, labels nearest with 255. The image comes back RGBA
    (alpha 0 where filled): cv2's 4-channel bilinear warp is also twice as fast as its 3-channel one."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    image = cv2.warpAffine(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), matrix, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=_FILL_RGBA)
    stacks = [cv2.warpAffine(st, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=(IGNORE_INDEX,) * 4) for st in stacks]
    return image, stacks


class TrainTransform:
    """PFENet's training augmentation (dvlab-research/PFENet util/transform.py, train.py order).

    Steps: [square: resize to size x size, the aspect not kept (PANet's Resize; cv2 bilinear where PANet's PIL
    filters a downscale)] -> RandScale(scale) -> RandRotate(+-rotate deg, p=0.5, image fill = the mean pixel, label fill
    255) -> Gaussian blur (p=0.5, 5x5, sigma 1.1 as cv2 derives it, border reflect-101) -> horizontal flip
    (p=0.5) -> pad to size (centred, mean pixel / 255) -> random size x size crop, redrawn (up to 30 more
    times) while less than 85 % of labels[0]'s foreground (values not 0/255) survives; the last draw is
    kept, as in PFENet. All randomness comes from the `generator` argument, so the augmentation of an
    episode is a pure function of its seed.

    The steps are PFENet's own cv2 calls (cv2.resize INTER_LINEAR / INTER_NEAREST, warpAffine,
    GaussianBlur, flip), run on uint8 instead of PFENet's float32 (cv2's 8-bit kernels round to the nearest
    level). Only the size x size crop is made float: normalised with the ImageNet mean/std through a lookup
    table, with the crop padding and the rotation's filled corners set to 0 (= the mean pixel, as PFENet
    fills them). Not torchvision.transforms.v2 (used for the test rules) nor hand-written torch: on float
    tensors they were the loader's bottleneck. Thread CPU time, one thread, AMD EPYC (2 vCPUs shared with
    other jobs, so best of 3 interleaved rounds of 15), a 500 x 375 VOC image + 2 label maps at 473:
    no branch 8.4 -> 3.6 ms, rotate 15.9 -> 6.1, blur 10.9 -> 4.4, all three 20.7 -> 6.7 (torch/v2 -> this).
    The pieces (same machine): cv2's bilinear warp 0.6 ms on RGBA vs 1.7 on RGB (hence the alpha channel),
    GaussianBlur 0.3 ms, resize 0.4 ms.

    Returns (image (3, size, size) float32 ImageNet-normalised, [label (size, size) int64, ...]).
    """

    FG_KEEP = 0.85
    CROP_RETRIES = 30

    def __init__(self, size: int, scale=(0.9, 1.1), rotate: float = 10.0, blur: bool = True, flip: bool = True,
                 square: bool = False):
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be 0 < min <= max, got {scale}")
        self.size = int(size)
        self.square = bool(square)
        self.scale = (float(scale[0]), float(scale[1]))
        self.rotate = float(rotate)
        self.blur = bool(blur)
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, rotate={self.rotate}, "
                f"blur={self.blur}, flip={self.flip}, square={self.square})")

    def __call__(self, image: np.ndarray, labels: Sequence[np.ndarray], generator: torch.Generator):
        _check_inputs(image, labels)
        stacks = _label_stacks(labels)
        # A fixed number of draws per call, whatever branches are taken: the crop offsets are the only
        # other draw and come last.
        u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()

        if self.square:  # PANet's Resize: size x size whatever the aspect, so nothing is padded or cropped at scale 1
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
            stacks = [cv2.resize(st, (self.size, self.size), interpolation=cv2.INTER_NEAREST) for st in stacks]
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        h, w = image.shape[:2]
        new_wh = (max(1, round(w * s)), max(1, round(h * s)))  # what cv2.resize(fx=fy=s) computes
        image = cv2.resize(image, new_wh, interpolation=cv2.INTER_LINEAR)
        stacks = [cv2.resize(st, new_wh, interpolation=cv2.INTER_NEAREST) for st in stacks]
        if self.rotate > 0 and u[1] < 0.5:
            image, stacks = _rotate(image, stacks, -self.rotate + 2 * self.rotate * u[2])
        if self.blur and u[3] < 0.5:
            image = cv2.GaussianBlur(image, (_BLUR_KSIZE, _BLUR_KSIZE), 0)  # border reflect-101, as PFENet
        if self.flip and u[4] < 0.5:
            image, stacks = cv2.flip(image, 1), [cv2.flip(st, 1) for st in stacks]
        # Contiguous planes from here on: numpy and cv2 run 5-10x slower on channel views.
        planes = [plane for st in stacks for plane in cv2.split(st)][:len(labels)]

        # Pad (centred) and crop together: the window is drawn in the padded frame and only its part inside
        # the image is copied, onto a canvas of the fill values.
        h, w = image.shape[:2]
        pad_top, pad_left = max(self.size - h, 0) // 2, max(self.size - w, 0) // 2
        top, left = self._crop_offsets(planes[0], pad_top, pad_left, generator)
        rows, canvas_rows = _window(top - pad_top, self.size, h)
        cols, canvas_cols = _window(left - pad_left, self.size, w)
        img = self._normalized_crop(image[rows, cols], canvas_rows, canvas_cols)
        return img, [self._label_crop(plane[rows, cols], canvas_rows, canvas_cols) for plane in planes]

    def _normalized_crop(self, crop: np.ndarray, canvas_rows: slice, canvas_cols: slice) -> torch.Tensor:
        """uint8 (h, w, 3) crop, or (h, w, 4) with alpha from the rotation -> (3, size, size) float32 canvas of
        zeros (the normalised mean pixel) with the normalised crop at (canvas_rows, canvas_cols); pixels of
        alpha 0 (rotation fill) are 0 too."""
        out = np.zeros((3, self.size, self.size), np.float32)
        planes = cv2.split(np.ascontiguousarray(crop))  # the copy first: split is 4x slower on a strided view
        for c in range(3):
            region = out[c, canvas_rows, canvas_cols]
            cv2.LUT(planes[c], _NORMALIZE_LUT[c], dst=region)  # written in place (a strided view is accepted)
            if len(planes) == 4:
                np.multiply(region, planes[3] != 0, out=region)
        return torch.from_numpy(out)

    def _label_crop(self, crop: np.ndarray, canvas_rows: slice, canvas_cols: slice) -> torch.Tensor:
        out = np.full((self.size, self.size), IGNORE_INDEX, crop.dtype)
        out[canvas_rows, canvas_cols] = crop
        return torch.from_numpy(out).to(torch.int64)

    def _crop_offsets(self, label: np.ndarray, pad_top: int, pad_left: int,
                      generator: torch.Generator) -> tuple[int, int]:
        """PFENet's foreground-preserving random crop, in the frame padded to at least size x size.
        v2.RandomCrop draws one window from the global RNG and has no acceptance rule, so the offsets are
        drawn here: first window, then up to CROP_RETRIES redraws while the window keeps < 85 % of the
        foreground; the last draw wins. All draws are made up front (a fixed number per call); windows are
        counted only until one is accepted (the padding holds no foreground, so on the unpadded label)."""
        h, w = label.shape
        s, n = self.size, 1 + self.CROP_RETRIES
        tops = torch.randint(0, max(h, s) - s + 1, (n,), generator=generator).tolist()
        lefts = torch.randint(0, max(w, s) - s + 1, (n,), generator=generator).tolist()
        fg = (label != 0) & (label != IGNORE_INDEX)
        total = np.count_nonzero(fg)
        if total == 0:
            return tops[0], lefts[0]
        for top, left in zip(tops, lefts):
            rows, _ = _window(top - pad_top, s, h)
            cols, _ = _window(left - pad_left, s, w)
            if np.count_nonzero(fg[rows, cols]) >= self.FG_KEEP * total:
                break
        return top, left


def _window(start: int, size: int, n: int) -> tuple[slice, slice]:
    """The part of [start, start + size) inside [0, n), as (slice of the image, slice of the size-long canvas)."""
    lo, hi = max(start, 0), min(start + size, n)
    return slice(lo, hi), slice(lo - start, hi - start)


class TestTransform:
    """Test-time resize rules (engine-anchors c5). Returns (image (3, h, w) float32 normalised,
    [label (h, w) int64, ...], restore) where `restore` is a plain dict of ints/strings:
    rule, orig_h, orig_w, content_h, content_w (the resized content inside the canvas), size, score_at.

    - "pfenet" (PFENet `transform.Resize`): longer side -> size with the aspect kept (the shorter side
      truncated with int()), then both sides floored to multiples of 8 (so 473 -> 472); image bilinear
      (no antialias, as cv2.INTER_LINEAR) pasted top-left on a size x size canvas of raw pixel 0 (after
      normalisation -mean/std), labels nearest on a canvas of 255.
    - "square" (HSNet `transforms.Resize((S, S))`): image bilinear (antialiased, as PIL) squashed to
      size x size, labels nearest; ``antialias=False`` as cv2.resize (HDMNet's ``resized_val``).
    - "original": nothing resized (h, w = the original size).
    score_at="original" (default) scores at the original label size through `restore_logits`;
    score_at="input" (HSNet's default) scores against the transformed label at the input size.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, size: int, rule: str = "pfenet", score_at: str = "original", antialias: bool = True):
        if rule not in TEST_RULES:
            raise ValueError(f"unknown test resize rule {rule!r}; expected one of {TEST_RULES}")
        if score_at not in ("original", "input"):
            raise ValueError(f"score_at must be 'original' or 'input', got {score_at!r}")
        self.size, self.rule, self.score_at, self.antialias = int(size), rule, score_at, bool(antialias)

    def __repr__(self) -> str:
        return (f"TestTransform(size={self.size}, rule={self.rule!r}, score_at={self.score_at!r}, "
                f"antialias={self.antialias})")

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
            img = F.resize(img, [s, s], interpolation=InterpolationMode.BILINEAR, antialias=self.antialias)
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


AUGMENT_OFF = {"scale": (1.0, 1.0), "rotate": 0.0, "blur": False, "flip": False, "square": False}


def from_config(cfg_data, train: bool, rule: str | None = None, score_at: str = "original"):
    """Build the transform a data config asks for: TrainTransform(train_size, **augment) when training,
    TestTransform(test_size, rule) otherwise (rule defaults to "pfenet"; a protocol passes its own).

    The config's final ``augment`` mapping lists what to apply: a key missing from it is off (scale 1, no
    rotation, blur or flip), so ``{scale: [0.5, 2.0], flip: true}`` is a DeepLab-style recipe, not PFENet's with
    rotation and blur added. (``base:`` files and ``key=value`` overrides merge mappings key by key, so a key is
    missing only when no file in the chain names it; a phase's ``data.augment`` replaces the mapping.)"""
    if train:
        augment = getattr(cfg_data, "augment", None) or {}
        if not isinstance(augment, Mapping):
            augment = vars(augment)
        unknown = set(augment) - set(AUGMENT_OFF)
        if unknown:
            raise ValueError(f"unknown augment keys {sorted(unknown)}; expected {', '.join(AUGMENT_OFF)}")
        given = {k: (tuple(v) if k == "scale" else v) for k, v in augment.items()}
        return TrainTransform(cfg_data.train_size, **{**AUGMENT_OFF, **given})
    return TestTransform(cfg_data.test_size, rule or "pfenet", score_at=score_at)
