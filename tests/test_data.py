import json

import numpy as np
import pytest

from onnxvit.data import hash_split, load_dataset, manifest_document, read_manifest, scan_image_folder
from onnxvit.errors import UserError
from tests.conftest import SAMPLE, needs_shared


def test_hash_split_is_fixed_disjoint_and_complete(image_folder):
    files = scan_image_folder(image_folder).files
    first = hash_split(files, 8, 4)
    assert first == hash_split(list(reversed(files)), 8, 4)
    assert [len(first[s]) for s in ("calibrate", "search", "evaluate")] == [8, 4, 12]
    joined = first["calibrate"] + first["search"] + first["evaluate"]
    assert sorted(joined) == sorted(files) and len(set(joined)) == len(files)


def test_labels_follow_sorted_class_folders(image_folder):
    dataset = load_dataset(image_folder, None, 8, 4)
    labels = dataset.labels("evaluate")
    expected = [int(f.split("/")[0].removeprefix("class")) for f in dataset.splits["evaluate"]]
    assert labels.tolist() == expected


def test_split_too_large_is_an_error(image_folder):
    with pytest.raises(UserError, match="lower data.calibrate_images"):
        load_dataset(image_folder, None, 20, 4)


@pytest.mark.parametrize(
    "broken, expected",
    [
        (lambda s: s["evaluate"].append("class0/absent.jpg"), "not an image in"),
        (lambda s: s["search"].append(s["calibrate"][0]), "must be disjoint"),
        (lambda s: s.pop("search"), "must hold the lists"),
    ],
)
def test_bad_manifest_is_named(tmp_path, image_folder, broken, expected):
    splits = hash_split(scan_image_folder(image_folder).files, 8, 4)
    broken(splits)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(manifest_document(splits, "test")))
    with pytest.raises(UserError, match=expected):
        read_manifest(path, scan_image_folder(image_folder))


def test_empty_and_flat_folders_are_rejected(tmp_path):
    with pytest.raises(UserError, match="no class sub-folders"):
        scan_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("no images")
    with pytest.raises(UserError, match="holds no images"):
        scan_image_folder(tmp_path)
    with pytest.raises(UserError, match="not found"):
        scan_image_folder(tmp_path / "absent")


@needs_shared
def test_shipped_manifest_matches_the_shared_sample():
    """calib_data/imagenet-sample.json: 32 / 31 / 937, disjoint, all present, reproducible by `onnxvit split`."""
    from tests.conftest import REPO

    folder = scan_image_folder(SAMPLE)
    splits = read_manifest(REPO / "calib_data" / "imagenet-sample.json", folder)
    assert {k: len(v) for k, v in splits.items()} == {"calibrate": 32, "search": 31, "evaluate": 937}
    assert splits == hash_split(folder.files, 32, 31)
    assert len(folder.classes) == 1000 and folder.label(splits["evaluate"][0]) == folder.classes.index(
        splits["evaluate"][0].split("/")[0]
    )
    assert np.unique([folder.label(f) for f in folder.files]).size == 1000


def test_load_images_keeps_file_order_across_workers(image_folder, tiny_model):
    """Each image lands at its file's index, whichever worker decoded it."""
    from onnxvit.data import load_image, load_images, timm_transform

    folder, transform = scan_image_folder(image_folder), timm_transform(tiny_model)[0]
    files = folder.files[:9][::-1]
    loaded = load_images(folder, files, transform, workers=3)
    assert loaded.dtype == np.float32 and loaded.shape[0] == len(files)
    for index, relative in enumerate(files):
        np.testing.assert_array_equal(loaded[index], load_image(folder, relative, transform).numpy())
