from collections import Counter

import pytest

from onnxvit.config import StepConfig
from onnxvit.engine import Cache, StepRecord, run_passes
from passes import get_pass
from passes.base import PassContext
from passes.graph import model_sha256


@pytest.fixture()
def counted(monkeypatch):
    """Counts how often each pass really runs."""
    calls: Counter = Counter()
    for name in ("quantize_int8", "fp16"):
        cls = get_pass(name)
        original = cls.run

        def run(self, model, ctx, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, model, ctx)

        monkeypatch.setattr(cls, "run", run)
    return calls


def _run(tmp_path, tiny_onnx, tiny_images, steps, force=False, fingerprint="calib-A", threads=2):
    start = StepRecord(name="fp32", kind="export", input=None, config={}, key="k", sha256=model_sha256(tiny_onnx))
    configs = [get_pass(s.pass_).Config.model_validate(s.options) for s in steps]
    return run_passes(
        tiny_onnx,
        start,
        steps,
        configs,
        Cache(tmp_path / "cache", force),
        lambda: PassContext(calibration=[tiny_images[:4]], search=[tiny_images[4:8], tiny_images[8:]]),
        {"calibrate": fingerprint, "search": "s", "threads": threads},
        lambda a, b: {"checked": 1.0},
    )


def _steps(method="percentile"):
    return [
        StepConfig(
            **{"pass": "quantize_int8", "name": "int8", "options": {"mode": "static", "calibrate_method": method}}
        ),
        StepConfig(**{"pass": "fp16", "name": "int8-fp16-io"}),
    ]


def test_second_run_is_served_from_cache(tmp_path, tiny_onnx, tiny_images, counted):
    models, records = _run(tmp_path, tiny_onnx, tiny_images, _steps())
    assert counted == {"quantize_int8": 1, "fp16": 1}
    again, records2 = _run(tmp_path, tiny_onnx, tiny_images, _steps())
    assert counted == {"quantize_int8": 1, "fp16": 1}
    assert [r.cached for r in records2[1:]] == [True, True]
    assert [r.sha256 for r in records2] == [r.sha256 for r in records]
    assert records2[1].check == {"checked": 1.0} and records2[2].input == "int8"


def test_changing_one_pass_redoes_it_and_what_follows(tmp_path, tiny_onnx, tiny_images, counted):
    steps = [
        StepConfig(**{"pass": "fp16", "name": "half"}),
        StepConfig(**{"pass": "quantize_int8", "name": "int8", "input": "fp32", "options": {"mode": "static"}}),
    ]
    _run(tmp_path, tiny_onnx, tiny_images, steps)
    steps[1].options = {"mode": "static", "calibrate_method": "minmax"}
    _, records = _run(tmp_path, tiny_onnx, tiny_images, steps)
    assert counted == {"fp16": 1, "quantize_int8": 2}
    assert [r.cached for r in records[1:]] == [True, False]
    # A chained step after a changed one is redone because its input changed; both int8 models
    # (percentile, minmax) are already cached from above, keyed by content, not by step position.
    _, chained = _run(tmp_path, tiny_onnx, tiny_images, _steps("minmax"))
    assert [r.cached for r in chained[1:]] == [True, False]
    _, chained = _run(tmp_path, tiny_onnx, tiny_images, _steps("percentile"))
    assert [r.cached for r in chained[1:]] == [True, False]
    assert counted == {"fp16": 3, "quantize_int8": 2}


def test_a_step_that_measures_the_machine_is_redone_at_other_threads(tmp_path, tiny_onnx, tiny_images, counted):
    steps = [
        StepConfig(**{"pass": "quantize_int8", "name": "int8"}),  # weight_type / reduce_range auto: per machine
        StepConfig(**{"pass": "fp16", "name": "half", "input": "fp32"}),  # the same output everywhere
    ]
    _run(tmp_path, tiny_onnx, tiny_images, steps, threads=2)
    _, records = _run(tmp_path, tiny_onnx, tiny_images, steps, threads=1)
    assert [r.cached for r in records[1:]] == [False, True]
    assert counted == {"quantize_int8": 2, "fp16": 1}


def test_a_new_budget_reuses_the_weight_schemes_and_the_ranking(tmp_path, tiny_onnx, tiny_images, monkeypatch):
    """Only the budget changes: the int8 step runs again, but takes the weight schemes and the layer
    ranking its first run measured, and writes the model a run from scratch writes."""
    from passes.accuracy_budget import AloneProbe
    from passes.weight_schemes import WeightTuner

    calls: Counter = Counter()
    for cls, method in ((WeightTuner, "choose_schemes"), (AloneProbe, "rank")):
        original = getattr(cls, method)

        def counted(self, *args, _original=original, _name=method, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, counted)

    def run(folder, budget):
        # weight type and range fixed: with auto, a CPU where u8s8 saturates times its kernels anew in a new cache
        options = {"schemes": "search", "min_sqnr_db": budget, "max_float_layers": 2, "weight_type": "int8"}
        options["reduce_range"] = True
        steps = [StepConfig(**{"pass": "quantize_int8", "name": "int8", "options": options})]
        return _run(folder, tiny_onnx, tiny_images, steps)[1][1]

    run(tmp_path / "one", 300.0)  # no model meets it: every layer is ranked
    assert calls == {"choose_schemes": 1, "rank": 1}
    again = run(tmp_path / "one", 299.0)
    assert not again.cached and calls == {"choose_schemes": 1, "rank": 1}
    fresh = run(tmp_path / "two", 299.0)
    assert calls == {"choose_schemes": 2, "rank": 2}
    assert again.sha256 == fresh.sha256
    for note in ("schemes", "sensitivity", "kept_float", "search_fidelity"):
        assert again.notes[note] == fresh.notes[note]


def test_new_calibration_data_and_force_redo_steps(tmp_path, tiny_onnx, tiny_images, counted):
    _run(tmp_path, tiny_onnx, tiny_images, _steps())
    _run(tmp_path, tiny_onnx, tiny_images, _steps(), fingerprint="calib-B")
    assert counted["quantize_int8"] == 2
    _, records = _run(tmp_path, tiny_onnx, tiny_images, _steps(), force=True)
    assert counted["quantize_int8"] == 3
    assert not any(r.cached for r in records[1:])
