"""The image-dataset contract: an .npz or a zip of PNG/JPEG files -> an `ImageDataset` in [-1, 1].

    images  float32 [N, C, H, W], C in {1, 3}, H = W = image_size, values x = u / 127.5 - 1 for u in 0..255
    labels  int64 [N] in 0..K-1, or None (unconditional); class_names[k] names label k

npz: `images` [N, H, W] or [N, H, W, C] (C in {1, 3}), uint8 (0..255) or float (in [0, 1] when its minimum
is >= 0, else in [-1, 1]); optional `labels` [N] (any integers, mapped to 0..K-1 in sorted order) and
optional `class_names` [K] (one per distinct label, in that order).
zip: one folder per class (`cat/001.png`; class = folder name, sorted), or every file at the top level
(unconditional); one common root folder above them is allowed and ignored. `__MACOSX/` entries and
`.DS_Store` files are skipped; anything else that is not a PNG or JPEG is refused.

Guards run before anything is decompressed or decoded: member count, declared uncompressed size (per
member and total; reads are capped too, so a lying header gains nothing), paths (no symlinks, absolute
paths or `..`), and the pixel count read from the image header. Every refusal is an `ImageDataError`
whose message names the member. Then each image is resized (shorter side -> image_size, antialiased)
and centre-cropped; grayscale stays 1 channel unless any image has colour (then all are RGB); exact
duplicates (same label, same pixels after resizing) are dropped; every class needs >= 2 images.
"""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from workers.images.hyperparameters import auto_image_size

MAX_MEMBERS = 100_000  # files in one archive
MAX_MEMBER_BYTES = 64 * 2**20  # declared uncompressed size of one member
MAX_TOTAL_BYTES = 2 * 2**30  # declared uncompressed size of the whole archive
MAX_IMAGE_PIXELS = 4096 * 4096  # width * height of one image, read from its header
MIN_IMAGES_PER_CLASS = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")
_SKIPPED_PREFIXES = ("__MACOSX/",)
_SKIPPED_NAMES = (".DS_Store",)
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")

# What PIL raises for a file it cannot decode: a truncated or corrupt chunk surfaces as SyntaxError,
# EOFError, struct.error or zlib.error, not only OSError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL's own bomb check as a second line behind ours


class ImageDataError(ValueError):
    """An image dataset that cannot be used; the message names the offending member or field."""


@dataclass
class ImageDataset:
    """Images in [-1, 1] with optional class labels."""

    images: torch.Tensor  # float32 [N, C, H, W], values in [-1, 1]
    labels: torch.Tensor | None  # int64 [N] in 0..K-1; None when unconditional
    class_names: list[str] = field(default_factory=list)  # K names; [] when unconditional
    duplicates_dropped: int = 0  # exact duplicates removed while reading

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """K, or 0 for an unconditional dataset."""
        return 0 if self.labels is None else len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def read_npz(source: bytes | str | Path, image_size: int) -> ImageDataset:
    """Read an .npz (bytes or a path) into an `ImageDataset` of image_size x image_size images."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:  # an .npz is a zip of .npy members
        _check_members(archive.infolist())
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise ImageDataError("images.npy: the .npz has no `images` array")
            images = _npz_images(npz["images"])
            raw_labels = npz["labels"] if "labels" in npz.files else None
            names = [str(n) for n in npz["class_names"]] if "class_names" in npz.files else None
    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as error:
        if isinstance(error, ImageDataError):
            raise
        raise ImageDataError(f"the .npz cannot be read: {error}") from error
    n = images.shape[0]
    labels, class_names = None, []
    if raw_labels is not None:
        if raw_labels.shape != (n,) or not np.issubdtype(raw_labels.dtype, np.integer):
            raise ImageDataError(f"labels.npy: expected {n} integer labels, got {raw_labels.dtype} {raw_labels.shape}")
        values, labels = np.unique(raw_labels, return_inverse=True)
        class_names = names if names is not None else [str(v) for v in values]
        if len(class_names) != len(values):
            raise ImageDataError(f"class_names.npy: {len(class_names)} names for {len(values)} distinct labels")
    # images: float32 [N, C, H, W] in [-1, 1]
    resized = torch.cat([_resize_crop(images[i : i + 256], image_size) for i in range(0, n, 256)])
    return _finish(resized, labels, class_names, member_names=[f"images.npy[{i}]" for i in range(n)])


def read_zip(path: str | Path | io.BytesIO, image_size: int) -> ImageDataset:
    """Read a zip of PNG/JPEG files (one folder per class, or all at the top level) into an `ImageDataset`."""
    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if not i.is_dir() and not _skipped(i.filename)]
        _check_members(infos)
        for info in infos:
            if PurePosixPath(info.filename).suffix.lower() not in IMAGE_SUFFIXES:
                raise ImageDataError(f"{info.filename}: not a PNG or JPEG file")
        classes = _class_of_members([i.filename for i in infos])
        headers = [(info, _read_capped(archive, info)) for info in infos]
    opened = []
    for info, data in headers:
        image = _open_header(info.filename, data)
        opened.append((info.filename, image))
    colour = any(image.mode not in _GRAY_MODES for _, image in opened)
    mode = "RGB" if colour else "L"
    arrays = []
    for name, image in opened:
        try:
            arrays.append(_pil_resize_crop(image.convert(mode), image_size))
        except DECODE_ERRORS as error:
            raise ImageDataError(f"{name}: cannot decode the image: {error}") from error
    # stacked: uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1]
    stacked = np.stack([a if a.ndim == 3 else a[:, :, None] for a in arrays])
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    names = [name for name, _ in opened]
    if classes is None:
        return _finish(images, None, [], member_names=names)
    class_names = sorted(set(classes))
    labels = np.array([class_names.index(c) for c in classes], dtype=np.int64)
    return _finish(images, labels, class_names, member_names=names)


def read_dataset(data: bytes, image_size: int | None) -> tuple[ImageDataset, int | None]:
    """An uploaded dataset (an .npz, or a zip of pictures) at image_size (None: choose it); returns the
    dataset and the shorter side of its images when the file says it cheaply (an .npz), else None."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise ImageDataError("the file is neither a zip of PNG/JPEG images nor an .npz")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = [i.filename for i in archive.infolist() if not i.is_dir() and not _skipped(i.filename)]
    if members and all(name.endswith(".npy") for name in members):
        side = _npz_side(data)
        return read_npz(data, image_size or auto_image_size(side)), side
    return read_zip(io.BytesIO(data), image_size or auto_image_size(None)), None


def _npz_side(data: bytes) -> int:
    """The shorter side of an .npz's images, from the `images` member's header (nothing else decoded)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        _check_members(archive.infolist())
        if "images.npy" not in archive.namelist():
            raise ImageDataError("images.npy: the .npz has no `images` array")
        with archive.open("images.npy") as member:
            try:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, _ = read_header(member)
            except ValueError as error:
                raise ImageDataError(f"images.npy: not a NumPy array: {error}") from error
    if len(shape) not in (3, 4) or min(shape[1:3]) < 1:
        raise ImageDataError(f"images.npy: expected [N, H, W] or [N, H, W, C], got shape {tuple(shape)}")
    return int(min(shape[1:3]))


def decode_image(data: bytes, image_size: int, channels: int, name: str = "image") -> torch.Tensor:
    """One uploaded PNG/JPEG as float32 [1, channels, S, S] in [-1, 1], resized and centre-cropped as
    training images are; ImageDataError (naming `name`) for anything unreadable or too large."""
    image = _open_header(name, data)
    try:
        array = _pil_resize_crop(image.convert("RGB" if channels == 3 else "L"), image_size)
    except DECODE_ERRORS as error:
        raise ImageDataError(f"{name}: cannot decode the image: {error}") from error
    array = np.array(array if array.ndim == 3 else array[:, :, None])  # [S, S, C], writable
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def split(dataset: ImageDataset, valid_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, valid), stratified: each class puts round(n * valid_fraction) images, clamped to 1..n-1, in valid."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.zeros(len(dataset), dtype=np.int64) if dataset.labels is None else dataset.labels.numpy()
    train_idx, valid_idx = [], []
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        n_valid = min(max(round(len(members) * valid_fraction), 1), len(members) - 1)
        valid_idx.append(members[:n_valid])
        train_idx.append(members[n_valid:])
    return _subset(dataset, np.sort(np.concatenate(train_idx))), _subset(dataset, np.sort(np.concatenate(valid_idx)))


def _subset(dataset: ImageDataset, index: np.ndarray) -> ImageDataset:
    idx = torch.from_numpy(index)
    labels = None if dataset.labels is None else dataset.labels[idx]
    return ImageDataset(dataset.images[idx], labels, list(dataset.class_names))


def _skipped(name: str) -> bool:
    return name.startswith(_SKIPPED_PREFIXES) or PurePosixPath(name).name in _SKIPPED_NAMES


def _check_members(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse an archive by its directory alone: counts, declared sizes, paths, symlinks."""
    if len(infos) > MAX_MEMBERS:
        raise ImageDataError(f"{infos[MAX_MEMBERS].filename}: the archive has over {MAX_MEMBERS} members")
    total = 0
    for info in infos:
        name = info.filename
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ImageDataError(f"{name}: symbolic links are not allowed")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
            raise ImageDataError(f"{name}: absolute paths and '..' are not allowed")
        if info.file_size > MAX_MEMBER_BYTES:
            raise ImageDataError(f"{name}: declares {info.file_size} bytes uncompressed, over {MAX_MEMBER_BYTES}")
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise ImageDataError(f"{name}: the archive's uncompressed size passes {MAX_TOTAL_BYTES} bytes here")


def _read_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The member's bytes, refusing one that inflates past its declared size (or the member limit)."""
    limit = min(info.file_size, MAX_MEMBER_BYTES)
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise ImageDataError(f"{info.filename}: inflates past its declared {info.file_size} bytes")
    return data


def _class_of_members(names: list[str]) -> list[str] | None:
    """Each member's class (its folder), or None when every file sits at the top level."""
    split_names = [PurePosixPath(n).parts for n in names]
    if not split_names:
        raise ImageDataError("the archive holds no images")
    roots = {parts[0] for parts in split_names}
    if len(roots) == 1 and all(len(parts) >= 2 for parts in split_names):
        split_names = [parts[1:] for parts in split_names]  # one common root folder: drop it
    depths = {len(parts) for parts in split_names}
    if depths == {1}:
        return None
    if depths == {2}:
        return [parts[0] for parts in split_names]
    deepest = max(zip(split_names, names, strict=True), key=lambda pair: len(pair[0]))[1]
    raise ImageDataError(f"{deepest}: expected one folder per class (or files at the top level only)")


def _open_header(name: str, data: bytes) -> Image.Image:
    """The image opened lazily (header only); its pixel count is checked before any decoding."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except DECODE_ERRORS as error:
        raise ImageDataError(f"{name}: not a readable PNG or JPEG image") from error
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDataError(f"{name}: {width}x{height} pixels, over {MAX_IMAGE_PIXELS}")
    if width < 1 or height < 1:
        raise ImageDataError(f"{name}: empty image")
    return image


def _pil_resize_crop(image: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size] or [size, size, 3]: shorter side -> size (Lanczos), then the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _npz_images(images: np.ndarray) -> np.ndarray:
    """float32 [N, C, H, W] in [-1, 1] from [N, H, W] or [N, H, W, C] uint8/float."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] < 1:
        raise ImageDataError(f"images.npy: expected [N, H, W] or [N, H, W, C] with C in 1 or 3, got {images.shape}")
    n, height, width, _ = images.shape
    if height * width > MAX_IMAGE_PIXELS:
        raise ImageDataError(f"images.npy: {width}x{height} pixels, over {MAX_IMAGE_PIXELS}")
    if images.dtype == np.uint8:
        scaled = images.astype(np.float32) / 127.5 - 1.0
    elif np.issubdtype(images.dtype, np.floating):
        scaled = images.astype(np.float32)
        if not np.isfinite(scaled).all():
            raise ImageDataError("images.npy: holds NaN or infinite values")
        low, high = float(scaled.min()), float(scaled.max())
        if low >= 0.0 and high <= 1.0:
            scaled = scaled * 2.0 - 1.0
        elif low < -1.0 or high > 1.0:
            raise ImageDataError(f"images.npy: float values must lie in [0, 1] or [-1, 1], got [{low}, {high}]")
    else:
        raise ImageDataError(f"images.npy: dtype {images.dtype} is neither uint8 nor float")
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))


def _resize_crop(images: np.ndarray, size: int) -> torch.Tensor:
    """float32 [n, C, size, size]: shorter side -> size (bilinear, antialiased), then the centre square."""
    x = torch.from_numpy(images)
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top : top + size, left : left + size]
    return x.clamp(-1.0, 1.0).contiguous()


def _finish(
    images: torch.Tensor, labels: np.ndarray | None, class_names: list[str], member_names: Iterable[str]
) -> ImageDataset:
    """Drop exact duplicates (same label and pixels), then require MIN_IMAGES_PER_CLASS per class."""
    seen: set[tuple[int, bytes]] = set()
    keep: list[int] = []
    label_list = [-1] * images.shape[0] if labels is None else labels.tolist()
    for i, label in enumerate(label_list):
        key = (label, images[i].numpy().tobytes())
        if key not in seen:
            seen.add(key)
            keep.append(i)
    names = list(member_names)
    kept_labels = [label_list[i] for i in keep]
    for k, class_name in enumerate(class_names or ["(all images)"]):
        count = kept_labels.count(k if labels is not None else -1)
        if count < MIN_IMAGES_PER_CLASS:
            where = next((names[i] for i in keep if label_list[i] == (k if labels is not None else -1)), class_name)
            raise ImageDataError(
                f"{where}: class {class_name!r} has {count} distinct image(s), needs {MIN_IMAGES_PER_CLASS}"
            )
    index = torch.tensor(keep, dtype=torch.int64)
    kept_tensor = None if labels is None else torch.from_numpy(np.asarray(kept_labels, dtype=np.int64))
    return ImageDataset(images[index].contiguous(), kept_tensor, class_names, images.shape[0] - len(keep))
