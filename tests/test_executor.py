"""The Ray executor on a real local Ray cluster: the same logits and search results as in process,
the same report, a worker killed mid-task, and the one-line error without Ray."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxvit.cli import main
from onnxvit.config import ExecutorConfig
from passes.executor import Executor, split
from passes.runtime import batches
from tests.conftest import write_config

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

# A search whose every kind of task runs: the weight-scheme search (one task per candidate piece), and
# a budget no model meets, so that every layer is ranked alone (one task per network suffix) and the
# whole-model probes are sharded by images.
SEARCHED_INT8 = {
    "pass": "quantize_int8",
    "name": "int8",
    "input": "fp32",
    # weight_type fixed: auto times two kernels, which two runs need not time alike on every CPU
    "options": {"schemes": "search", "min_sqnr_db": 80, "max_float_layers": 2, "weight_type": "int8"},
}
# timed, or read from timings
NOT_MEASURED_THE_SAME = {"latency_ms", "int8_efficiency", "int8_bound_speedup", "int8_speedup_vs_float_input"}


@pytest.fixture(scope="class")
def ray_executor():
    """A local cluster for the executor-level tests only (stopped after their class, so that the later
    tests start and stop their own, as a run does)."""
    from onnxvit.distributed import RayExecutor

    executor = RayExecutor(ExecutorConfig(kind="ray", workers=2))
    yield executor
    executor.close()


def test_split_keeps_order_and_sizes():
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([1], 4) == [[1]]


class TestRayExecutor:
    def test_ray_logits_equal_local_bit_for_bit(self, ray_executor, tiny_onnx, tiny_images):
        feeds = batches(tiny_images, 1)
        local = Executor().logits(tiny_onnx, feeds, 2)
        seen: list[int] = []
        remote = ray_executor.logits(tiny_onnx, feeds, 2, seen.append)
        assert remote.dtype == np.float32 and np.array_equal(local, remote)
        assert sum(seen) == len(tiny_images) and len(seen) > 1  # several shards, each counted once
        again = ray_executor.logits(tiny_onnx, batches(tiny_images, 3), 2)  # other shards of the same images
        assert np.array_equal(again, Executor().logits(tiny_onnx, batches(tiny_images, 3), 2))

    def test_ray_map_runs_search_tasks_in_order(self, ray_executor, tiny_onnx, tiny_images):
        from passes.accuracy_budget import suffix_logits

        name = tiny_onnx.graph.input[0].name
        captured = [{name: batch} for batch in batches(tiny_images, 2)]
        tasks = [(tiny_onnx.SerializeToString(), 1)] * 3
        local = Executor().map(suffix_logits, tasks, captured)
        remote = ray_executor.map(suffix_logits, tasks, captured)
        assert all(np.array_equal(a, b) for a, b in zip(local, remote))
        assert np.array_equal(remote[0], Executor().logits(tiny_onnx, batches(tiny_images, 2), 1))


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def _figures(report: dict) -> dict:
    """Everything a report measured, less what is timed or says where it ran."""
    variants = [{k: v for k, v in entry.items() if k not in NOT_MEASURED_THE_SAME} for entry in report["variants"]]
    steps = [{k: v for k, v in step.items() if k not in {"seconds", "cached"}} for step in report["steps"]]
    return {"variants": variants, "steps": steps, "parity": report["parity"], "data": report["data"]}


def _compress(config: Path, *args: str):
    result = CliRunner().invoke(main, ["compress", str(config), "--quiet", *args], catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)


def _searching_config(folder: Path, image_folder: Path, **executor) -> Path:
    """The tiny model with the searching int8 step, on the executor ``executor`` names (default: local)."""
    sections = {"executor": executor} if executor else {}
    return write_config(folder, image_folder, passes=[SEARCHED_INT8], benchmark={"warmup": 1, "runs": 4}, **sections)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, image_folder):
    folder = tmp_path_factory.mktemp("local")
    config = _searching_config(folder, image_folder)
    _compress(config)
    return config, folder / "out"


def test_a_ray_run_reports_what_a_local_run_reports(local_run, tmp_path, image_folder):
    config, local_out = local_run
    _compress(_searching_config(tmp_path, image_folder, kind="ray", workers=2))
    local, remote = _report(local_out), _report(tmp_path / "out")
    assert _figures(remote) == _figures(local)
    int8 = next(s for s in remote["steps"] if s["name"] == "int8")["notes"]
    assert int8["schemes"] and len(int8["sensitivity"]) > 1  # both searches ran, as tasks
    assert remote["executor"]["kind"] == "ray" and remote["executor"]["workers"] == 2
    assert "ran as Ray tasks on a local cluster (2 workers" in (tmp_path / "out" / "report.md").read_text()
    assert local["executor"] == {"kind": "local", "latency_timed_in": local["executor"]["latency_timed_in"]}
    assert (tmp_path / "out" / "model.int8.onnx").read_bytes() == (local_out / "model.int8.onnx").read_bytes()

    # one cache for both: a Ray run over the local run's folder recomputes nothing and starts no cluster
    _compress(config, "--executor", "ray")
    rerun = _report(local_out)
    assert all(step["cached"] for step in rerun["steps"])
    assert rerun["executor"]["kind"] == "ray" and rerun["executor"]["started"] is False
    assert _figures(rerun) == _figures(local)


def _titles() -> dict[int, str]:
    """Every process's title (what ``/proc/PID/cmdline`` holds; Ray sets it to ``ray::TASK``)."""
    titles = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                titles[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
    return titles


def _kill_one_task(stop: threading.Event, killed: list[str]) -> None:
    """SIGKILL the first Ray worker seen running one of onnxvit's tasks (its title is ``ray::_call``)."""
    while not stop.is_set():
        for pid, title in _titles().items():
            if title.startswith("ray::_call"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(f"{pid} {title}")
                return
        time.sleep(0.001)


def test_a_worker_killed_mid_task_does_not_change_the_report(local_run, tmp_path, image_folder):
    _, local_out = local_run
    config = _searching_config(tmp_path, image_folder, kind="ray", workers=2)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_task, args=(stop, killed), daemon=True)
    killer.start()
    try:
        _compress(config)
    finally:
        stop.set()
        killer.join()
    assert killed, "no task was caught running"
    assert _figures(_report(tmp_path / "out")) == _figures(_report(local_out))
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    assert not leftovers


def test_ray_missing_is_one_line(tmp_path, image_folder, monkeypatch):
    config = write_config(tmp_path, image_folder, executor={"kind": "ray"})
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when it is not installed
    result = CliRunner().invoke(main, ["compress", str(config), "--quiet"], catch_exceptions=True)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "executor.kind: ray needs Ray" in line and 'pip install -e ".[ray]"' in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.skipif(Path("/tmp/ray/ray_current_cluster").exists(), reason="a Ray cluster runs on this machine")
def test_no_cluster_at_the_address_is_one_line_before_anything_is_written(tmp_path, image_folder, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()  # no test left a cluster connected
    config = write_config(tmp_path, image_folder, executor={"kind": "ray", "address": "auto"})
    result = CliRunner().invoke(main, ["compress", str(config), "--quiet"], catch_exceptions=True)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "executor.address: no Ray cluster at 'auto'" in line
    assert not (tmp_path / "out").exists()


def test_ray_options_need_kind_ray(tmp_path, image_folder):
    config = write_config(tmp_path, image_folder, executor={"workers": 2})
    result = CliRunner().invoke(main, ["compress", str(config), "--quiet"], catch_exceptions=True)
    assert result.exit_code == 2 and "executor" in result.stderr and "kind: ray" in result.stderr
