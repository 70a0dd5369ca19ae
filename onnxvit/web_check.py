"""The `.ort` files run by a client nobody here wrote: ONNX Runtime's JavaScript package
(``onnxruntime-web``, its WebAssembly build) under Node.js, on the check images, against the Python
run of the same files.

The package is installed with npm from the lock file in ``examples/web`` (``npm ci --prefix
examples/web``), where the browser example uses it too; ``mobile.ort_web`` names another folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from passes.metrics import max_abs_diff

REPO_WEB = Path(__file__).resolve().parents[1] / "examples" / "web"
MODULE = Path("node_modules") / "onnxruntime-web" / "dist" / "ort.node.min.mjs"
INSTALL = "npm ci --prefix examples/web"

# One Node.js process for every model: load each, run each image alone (batch 1, as the app does),
# write the first output of all images as raw float32.
_SCRIPT = r"""
import fs from "node:fs";
import { pathToFileURL } from "node:url";
const [modulePath, jobPath] = process.argv.slice(2);
const ort = await import(pathToFileURL(modulePath).href);
ort.env.wasm.numThreads = 1;
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const typed = { float32: Float32Array, uint8: Uint8Array };
const results = {};
for (const model of job.models) {
  try {
    const bytes = fs.readFileSync(model.images);
    const data = new typed[model.dtype](bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    const size = model.shape.reduce((a, b) => a * b, 1);
    const session = await ort.InferenceSession.create(fs.readFileSync(model.path));
    const outputs = [];
    for (let i = 0; i < data.length / size; i++) {
      const input = new ort.Tensor(model.dtype, data.slice(i * size, (i + 1) * size), [1, ...model.shape]);
      const out = await session.run({ [session.inputNames[0]]: input });
      outputs.push(...out[session.outputNames[0]].data);
    }
    fs.writeFileSync(model.output, Buffer.from(new Float32Array(outputs).buffer));
    results[model.name] = { loaded: true };
  } catch (error) {
    results[model.name] = { loaded: false, error: String(error).split("\n")[0].slice(0, 300) };
  }
}
fs.writeFileSync(job.result, JSON.stringify(results));
"""


@dataclass(frozen=True)
class WebModel:
    """One `.ort` file, the images it takes (batch first), and what Python's ONNX Runtime gave."""

    name: str
    path: Path
    images: np.ndarray
    reference: np.ndarray


def ort_web_module(folder: Path | None = None) -> Path | None:
    """onnxruntime-web's Node.js entry in ``folder`` (default: examples/web), if installed there."""
    module = (folder or REPO_WEB) / MODULE
    return module if module.is_file() else None


def not_checked(folder: Path | None = None) -> str | None:
    """Why the web check cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "not checked: no Node.js"
    if ort_web_module(folder) is None:
        return f"not checked: onnxruntime-web is not installed in {folder or REPO_WEB} ({INSTALL})"
    return None


def run_in_node(models: list[WebModel], folder: Path | None = None, timeout: int = 600) -> dict[str, dict[str, Any]]:
    """Each model run by onnxruntime-web in Node.js on its images, one at a time: per model, whether
    it loaded, its top-1 against the Python run's (all images equal) and the largest logit difference."""
    module = ort_web_module(folder)
    if module is None or shutil.which("node") is None:
        raise RuntimeError(not_checked(folder) or "not checked")
    with tempfile.TemporaryDirectory(prefix="onnxvit-web-") as tmp:
        work = Path(tmp)
        jobs = []
        for index, model in enumerate(models):
            images = np.ascontiguousarray(model.images)
            (work / f"{index}.in").write_bytes(images.tobytes())
            jobs.append(
                {
                    "name": model.name,
                    "path": str(model.path.resolve()),
                    "images": str(work / f"{index}.in"),
                    "dtype": str(images.dtype),
                    "shape": list(images.shape[1:]),
                    "output": str(work / f"{index}.out"),
                }
            )
        (work / "job.json").write_text(json.dumps({"models": jobs, "result": str(work / "result.json")}))
        (work / "check.mjs").write_text(_SCRIPT)
        done = subprocess.run(
            ["node", str(work / "check.mjs"), str(module), str(work / "job.json")],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0 or not (work / "result.json").is_file():
            error = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            return {m.name: {"loaded": False, "error": f"node failed: {error}"} for m in models}
        results = json.loads((work / "result.json").read_text())
        for index, model in enumerate(models):
            entry = results[model.name]
            if not entry["loaded"]:
                continue
            logits = np.fromfile(work / f"{index}.out", np.float32).reshape(model.reference.shape)
            same = logits.argmax(1) == model.reference.argmax(1)
            entry.update(
                top1_equal=bool(same.all()),
                top1_differ=int((~same).sum()),
                images=len(same),
                max_abs_vs_python=round(max_abs_diff(logits, model.reference), 6),
            )
        return results
