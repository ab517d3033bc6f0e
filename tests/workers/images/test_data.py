"""The image-dataset contract: every refusal names its member; resizing, dedupe, labels and the split."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.images import data
from workers.images.data import ImageDataError, read_npz, read_zip, split


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(seed: int, size: tuple[int, int] = (12, 12)) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, size))


def write_zip(path: Path, members: dict[str, bytes], infos: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
        for info, payload in infos:
            archive.writestr(info, payload)
    return path


def two_classes(n: int = 2) -> dict[str, bytes]:
    return {f"{cls}/{i}.png": noise_png(10 * c + i) for c, cls in enumerate(("cat", "dog")) for i in range(n)}


def test_folders_are_classes_and_images_are_resized_and_cropped(tmp_path):
    # 30 x 10: a white 10 x 10 centre between black sides; shorter side 10 -> 8 keeps a white centre square
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 255
    members = {**two_classes(), "dog/wide.png": png(wide)}
    dataset = read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)
    assert dataset.images.shape == (5, 1, 8, 8) and dataset.images.dtype.is_floating_point
    assert dataset.class_names == ["cat", "dog"] and dataset.labels.tolist() == [0, 0, 1, 1, 1]
    assert float(dataset.images.min()) >= -1.0 and float(dataset.images.max()) <= 1.0
    assert float(dataset.images[-1].mean()) > 0.9  # resized to 24 x 8, the centre columns 8..15 are the band


def test_a_colour_image_makes_every_image_rgb_and_top_level_files_are_unconditional(tmp_path):
    colour = np.zeros((9, 9, 3), dtype=np.uint8)
    colour[..., 0] = 200
    members = {"a.png": noise_png(1), "b.png": png(colour), "c.png": noise_png(2)}
    dataset = read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)
    assert dataset.images.shape == (3, 3, 8, 8) and dataset.labels is None and dataset.num_classes == 0


def test_a_common_root_folder_is_ignored(tmp_path):
    members = {f"pets/{name}": payload for name, payload in two_classes().items()}
    assert read_zip(write_zip(tmp_path / "d.zip", members), image_size=8).class_names == ["cat", "dog"]


def test_exact_duplicates_are_dropped(tmp_path):
    members = {**two_classes(), "cat/copy.png": two_classes()["cat/0.png"]}
    dataset = read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)
    assert len(dataset) == 4 and dataset.duplicates_dropped == 1


def test_a_class_with_one_image_is_refused(tmp_path):
    members = {**two_classes(), "bird/only.png": noise_png(99)}
    with pytest.raises(ImageDataError, match=r"bird/only\.png.*'bird' has 1"):
        read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)


def test_a_class_left_with_one_image_after_dedupe_is_refused(tmp_path):
    members = {**two_classes(), "bird/a.png": noise_png(99), "bird/b.png": noise_png(99)}
    with pytest.raises(ImageDataError, match="'bird' has 1"):
        read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)


def test_a_member_declaring_too_many_bytes_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 10_000)
    members = {**two_classes(), "cat/bomb.png": b"\0" * 50_000}  # deflates to ~60 bytes
    with pytest.raises(ImageDataError, match=r"cat/bomb\.png: declares 50000 bytes"):
        read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)


def test_an_archive_over_the_total_size_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_TOTAL_BYTES", 300)
    with pytest.raises(ImageDataError, match=r"(cat|dog)/\d\.png: the archive's uncompressed size"):
        read_zip(write_zip(tmp_path / "d.zip", two_classes()), image_size=8)


def test_too_many_members_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_MEMBERS", 3)
    with pytest.raises(ImageDataError, match="over 3 members"):
        read_zip(write_zip(tmp_path / "d.zip", two_classes()), image_size=8)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 150)  # the others are 12 x 12 = 144
    members = {**two_classes(), "dog/big.png": noise_png(5, size=(13, 13))}
    monkeypatch.setattr(data, "_pil_resize_crop", lambda *a: pytest.fail("decoded before the pixel check"))
    with pytest.raises(ImageDataError, match=r"dog/big\.png: 13x13 pixels, over 150"):
        read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)


def test_a_non_image_member_is_refused(tmp_path):
    members = {**two_classes(), "cat/notes.txt": b"hello"}
    with pytest.raises(ImageDataError, match=r"cat/notes\.txt: not a PNG or JPEG"):
        read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)


def test_a_file_named_png_that_is_not_an_image_is_refused(tmp_path):
    members = {**two_classes(), "cat/fake.png": b"GIF89a not really"}
    with pytest.raises(ImageDataError, match=r"cat/fake\.png: not a readable PNG or JPEG"):
        read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)


@pytest.mark.parametrize("name", ["../evil.png", "cat/../../evil.png", "/abs/evil.png"])
def test_escaping_paths_are_refused(tmp_path, name):
    path = write_zip(tmp_path / "d.zip", two_classes(), infos=[(zipfile.ZipInfo(name), noise_png(7))])
    with pytest.raises(ImageDataError, match=f"{name}: absolute paths and '..' are not allowed"):
        read_zip(path, image_size=8)


def test_a_symlink_is_refused(tmp_path):
    link = zipfile.ZipInfo("cat/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    path = write_zip(tmp_path / "d.zip", two_classes(), infos=[(link, b"/etc/passwd")])
    with pytest.raises(ImageDataError, match=r"cat/link\.png: symbolic links"):
        read_zip(path, image_size=8)


def test_macos_metadata_is_skipped(tmp_path):
    members = {**two_classes(), "__MACOSX/cat/._0.png": b"junk", "cat/.DS_Store": b"junk"}
    assert len(read_zip(write_zip(tmp_path / "d.zip", members), image_size=8)) == 4


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def test_npz_uint8_with_labels_is_resized_and_labels_are_mapped(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16)).astype(np.uint8)
    labels = np.array([7, 3, 7, 3, 7, 3])
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes(images=images, labels=labels))
    dataset = read_npz(path, image_size=8)
    assert dataset.images.shape == (6, 1, 8, 8) and dataset.class_names == ["3", "7"]
    assert dataset.labels.tolist() == [1, 0, 1, 0, 1, 0]


def test_npz_float_in_unit_range_is_scaled_and_rgb_kept():
    images = np.full((4, 8, 8, 3), 0.5, dtype=np.float32)
    images[1] = 1.0
    images[2] = 0.0
    images[3, 0, 0] = 0.25
    dataset = read_npz(npz_bytes(images=images), image_size=8)
    assert dataset.images.shape == (4, 3, 8, 8) and dataset.labels is None
    assert float(dataset.images[0].mean()) == pytest.approx(0.0) and float(dataset.images[1].min()) == 1.0


def test_npz_duplicates_dropped_and_a_lonely_class_refused():
    images = np.zeros((5, 8, 8), dtype=np.uint8)
    images[1] = 1
    images[3] = 3
    labels = np.array([0, 0, 1, 1, 1])  # image 2 duplicates image 0's pixels but in another class: kept
    dataset = read_npz(npz_bytes(images=images, labels=labels), image_size=8)
    assert len(dataset) == 4 and dataset.duplicates_dropped == 1
    with pytest.raises(ImageDataError, match=r"images\.npy\[2\]: class '1' has 1"):
        read_npz(npz_bytes(images=images, labels=np.array([0, 0, 1, 2, 2])), image_size=8)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"pixels": np.zeros((2, 8, 8), dtype=np.uint8)}, "no `images` array"),
        ({"images": np.zeros((2, 8, 8, 4), dtype=np.uint8)}, r"images\.npy: expected"),
        ({"images": np.full((2, 8, 8), 3.0)}, r"images\.npy: float values must lie"),
        ({"images": np.zeros((2, 8, 8), dtype=np.uint8), "labels": np.zeros(3, dtype=np.int64)}, r"labels\.npy"),
    ],
)
def test_npz_refusals_name_the_array(arrays, message):
    with pytest.raises(ImageDataError, match=message):
        read_npz(npz_bytes(**arrays), image_size=8)


def test_npz_member_over_the_size_limit_is_refused(monkeypatch):
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 1_000)
    with pytest.raises(ImageDataError, match=r"images\.npy: declares"):
        read_npz(npz_bytes(images=np.zeros((10, 16, 16), dtype=np.uint8)), image_size=8)


def test_split_is_stratified_and_seeded():
    images = np.random.default_rng(0).integers(0, 256, (30, 8, 8)).astype(np.uint8)
    labels = np.array([0] * 20 + [1] * 10)
    dataset = read_npz(npz_bytes(images=images, labels=labels), image_size=8)
    train, valid = split(dataset, valid_fraction=0.2, seed=3)
    assert sorted(valid.labels.tolist()) == [0, 0, 0, 0, 1, 1] and len(train) == 24
    again, _ = split(dataset, valid_fraction=0.2, seed=3)
    assert again.images.equal(train.images)
