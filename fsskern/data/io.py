"""File reading with one error type: every failure names the file or value that caused it.

Images decode to uint8 (H, W, 3) RGB; labels decode to int64 (H, W) *indices* (a palette PNG gives
its palette indices, as PIL mode "P" stores them, never the RGB colours).
"""
from pathlib import Path

import numpy as np
from PIL import Image


class DataError(ValueError):
    """Bad input data (missing, truncated or inconsistent files, impossible requests)."""


def read_image(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Raises DataError on a missing, truncated or unreadable file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            if im.mode.startswith("I"):  # 16-bit grey: convert("RGB") clips at 255; cv2.imread scales by 1/256
                grey = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if im.mode == "F":
                raise DataError(f"unsupported image file: {path} (floating-point pixels; save it as 8-bit RGB)")
            # np.array, not asarray: a writable copy (torch.from_numpy warns on read-only arrays);
            # convert only when needed (convert("RGB") of an RGB image is one more copy)
            return np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"missing image file: {path}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"unreadable or truncated image file: {path} ({e})") from None


def image_size(path) -> tuple:
    """(width, height) from the file header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"missing image file: {path}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"unreadable image file: {path} ({e})") from None


def read_label(path, channel: int = 0) -> np.ndarray:
    """(H, W) label indices in the file's integer dtype (uint8 for 8-bit PNGs; ``apply_lut`` makes them
    int64 class ids). A multi-channel PNG gives its ``channel``-th channel."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"missing label file: {path}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"unreadable or truncated label file: {path} ({e})") from None
    if a.ndim == 3:
        a = a[..., channel]
    if a.dtype == bool or a.dtype.kind not in "ui":
        a = a.astype(np.int64)
    return a


def check_same_size(image: np.ndarray, label: np.ndarray, image_path, label_path) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise DataError(f"image/label size mismatch: {image_path} is {image.shape[1]}x{image.shape[0]}, "
                        f"{label_path} is {label.shape[1]}x{label.shape[0]} (width x height)")


def apply_lut(raw: np.ndarray, lut: np.ndarray, path) -> np.ndarray:
    """Map raw label values through ``lut`` (int64, -1 = not a valid value); DataError names the
    first invalid value and the file."""
    if raw.size and raw.min() < 0:
        raise DataError(f"label value(s) [{int(raw.min())}] outside the dataset's classes in {path}")
    values = np.flatnonzero(np.bincount(raw.ravel()))  # one pass over the pixels, then the few values
    bad = [int(v) for v in values if v >= len(lut) or lut[v] < 0]
    if bad:
        raise DataError(f"label value(s) {bad} outside the dataset's classes in {path}")
    return lut[raw]


def under_root(path, root) -> Path:
    """A list or folder named in the config: as given when it is absolute or exists from the working directory,
    else under the dataset root (``data.train_list=lists/few.txt`` beside the images)."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else Path(root) / path


def read_lines(path, what: str = "list") -> list:
    """Non-empty, stripped lines; DataError when the file is missing or holds no entry."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {what} file: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataError(f"empty {what} file: {path}")
    return lines


def read_class_table(path) -> dict:
    """{id: name} from a class list: "id<TAB or space>name[...]" rows (a header row whose first
    field is not an integer is skipped) or one name a line (id = line number). Tab-separated rows keep a name's
    spaces ("10\ttraffic light", as python/prepare_data.py writes COCO's); space-separated rows take one word."""
    rows = read_lines(path, "class list")
    fields = [[f.strip() for f in r.split("\t")] if "\t" in r else r.split() for r in rows]
    header = not fields[0][0].lstrip("-").isdigit()
    table = fields[1:] if header else fields
    numbered = [len(f) >= 2 and f[0].isdigit() for f in table]
    if all(numbered):
        return {int(f[0]): f[1] for f in table}
    if sum(numbered) * 2 >= len(table):  # a table with a bad row, not a list of names: reading it as one would
        bad = rows[header + numbered.index(False)]  # shift every name by a line
        raise DataError(f"{path}: row {bad!r} is not 'id<TAB>name' with an id >= 0, as the other rows are")
    return {i: r for i, r in enumerate(rows)}
