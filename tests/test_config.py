import json
from pathlib import Path

import pytest
import yaml

from onnxvit.config import load_config
from onnxvit.errors import UserError
from tests.conftest import write_config


def _write(tmp_path: Path, image_folder: Path, mutate) -> Path:
    path = write_config(tmp_path, image_folder)
    doc = yaml.safe_load(path.read_text())
    mutate(doc)
    path.write_text(yaml.safe_dump(doc))
    return path


def _error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_valid_config_parses_passes(tmp_path, image_folder):
    config, parsed = load_config(write_config(tmp_path, image_folder))
    assert [s.output for s in config.passes] == ["int8", "fp16"]
    assert parsed[0].calibrate_method == "percentile" and parsed[1].keep_io_types is True


def test_relative_paths_follow_the_yaml_folder(tmp_path, image_folder):
    path = _write(tmp_path, image_folder, lambda d: d["output"].update(dir="results"))
    config, _ = load_config(path)
    assert config.output.dir == (tmp_path / "results").resolve()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.update(modle=d.pop("model")), "modle: unknown key; did you mean 'model'?"),
        (lambda d: d["model"].update(nmae=d["model"].pop("name")), "model.nmae: unknown key; did you mean 'name'?"),
        (lambda d: d["benchmark"].update(threads="two"), "benchmark.threads:"),
        (lambda d: d["model"].update(random_init=False), "exactly one of checkpoint"),
        (lambda d: d["model"].update(pretrained=True), "got pretrained, random_init"),
        (lambda d: d.pop("output"), "output: required key is missing"),
        (
            lambda d: d["passes"][0].update({"pass": "quantise_int8"}),
            "unknown pass 'quantise_int8'; did you mean 'quantize_int8'?",
        ),
        (
            lambda d: d["passes"][0].update(options={"calibrate_metod": "minmax"}),
            "passes[0].options.calibrate_metod: unknown key; did you mean 'calibrate_method'?",
        ),
        (
            lambda d: d["passes"][0].update(options={"calibrate_method": "median"}),
            "passes[0].options.calibrate_method:",
        ),
        (lambda d: d["passes"][0].update(options={"schemes": "auto"}), "passes[0].options.schemes:"),
        (  # a value no member of a union takes: one line saying what the field takes
            lambda d: d["passes"][0].update(options={"qattention": "maybe"}),
            "passes[0].options.qattention: expected true or false, or 'auto' (got 'maybe')",
        ),
        (
            lambda d: d["passes"][0].update(options={"reconstruct_bridges": True, "bridges": "float"}),
            "reconstruct_bridges: the bridge layers are kept float",
        ),
        (lambda d: d["passes"][1].update(input="int4"), "passes[1].input: no model named 'int4'"),
        # what a pass needs and what an option does are checked at load, not half-way through a run
        (
            lambda d: (d["data"].update(search_images=0), d["passes"][0].update(options={"min_sqnr_db": 20})),
            "passes[0]: quantize_int8 with these options needs search images, and the search split is empty",
        ),
        (
            lambda d: d["passes"][0].update(options={"calibrate_method": "minmax"}),
            "calibrate_method: only used with mode: static",
        ),
        (
            lambda d: d["passes"][0].update(
                {"pass": "mixed_precision", "options": {"choices": ["float", "int8"], "block_size": 64}}
            ),
            "block_size: only used by the w4 / w8 choices",
        ),
        (lambda d: d["passes"][1].update(name="int8"), "passes[1].name: 'int8' is already taken"),
    ],
)
def test_bad_config_names_the_field(tmp_path, image_folder, mutate, expected):
    assert expected in _error(_write(tmp_path, image_folder, mutate))


def test_missing_and_unparsable_files(tmp_path):
    assert "no such config file" in _error(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in _error(bad)
    bad.write_text("- a list\n")
    assert "expected a mapping" in _error(bad)


def test_requirements_read_a_manifest_without_decoding_images(tmp_path, image_folder):
    from onnxvit.data import hash_split, manifest_document, scan_image_folder

    splits = hash_split(scan_image_folder(image_folder).files, 8, 0)
    manifest = tmp_path / "split.json"
    manifest.write_text(json.dumps(manifest_document(splits, "no search images")))
    path = _write(
        tmp_path,
        image_folder,
        lambda d: (d["data"].update(manifest=str(manifest)), d["passes"][0].update(options={"min_agreement": 99})),
    )
    assert "the manifest's search split" in _error(path)
    path = _write(tmp_path, image_folder, lambda d: d["data"].update(manifest=str(manifest)))
    load_config(path)  # no pass needs search images: fine
