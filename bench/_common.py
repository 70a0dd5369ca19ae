"""What every bench script shares: its arguments, the examples rewritten for a bench run, the run of
the pipeline's stages, the printed table and the JSON it writes."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from onnxvit.compress import compress  # noqa: E402
from onnxvit.config import load_config  # noqa: E402
from onnxvit.engine import Cache  # noqa: E402
from onnxvit.fileio import atomic_write_json  # noqa: E402
from onnxvit.progress import Reporter  # noqa: E402
from onnxvit.stages.load import Run  # noqa: E402

PATH_FIELDS = (("model", "checkpoint"), ("data", "root"), ("data", "manifest"), ("finetune", "root"))


def arguments(doc: str | None, output: str, **extra: dict[str, Any]) -> argparse.ArgumentParser:
    """--output (default ``out/OUTPUT``), --json and --quiet, and ``extra`` as ``name=dict(add_argument kwargs)``."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--output", type=Path, default=REPO / "out" / output, help="folder for models and cache")
    parser.add_argument("--json", type=Path, help="write the table and headline here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, kwargs in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    return parser


def example(path: Path) -> dict[str, Any]:
    """An example YAML as a dict with its relative paths made absolute, to be changed and run anywhere."""
    doc = yaml.safe_load(path.read_text())
    for section, field in PATH_FIELDS:
        if isinstance(doc.get(section), dict) and doc[section].get(field):
            doc[section][field] = str((path.parent / doc[section][field]).resolve())
    return doc


def compress_doc(doc: dict[str, Any], output: Path, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """`onnxvit compress` on a config given as a dict, writing into ``output``; the report."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump({**doc, "output": {"dir": str(output)}}))
        return compress(path, force=force, quiet=quiet)


def open_run(config_path: Path, output: Path, force: bool = False, quiet: bool = False) -> Run:
    """The pipeline's shared run for an example, writing into ``output``, for scripts that call stages."""
    config, pass_configs = load_config(config_path)
    config.output.dir = output
    output.mkdir(parents=True, exist_ok=True)
    return Run(config, pass_configs, Reporter(quiet), Cache(output / "cache", force))


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print(
            "| "
            + " | ".join(
                f"{row.get(c):.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns
            )
            + " |"
        )


def write_json(path: Path | None, **content: Any) -> None:
    """The bench's JSON (its table, ``headline`` and whatever else it names), when --json was given."""
    if path is not None:
        atomic_write_json(path, content)
        print(f"wrote {path}")


def finish(
    json_path: Path | None,
    rows: list[dict[str, Any]],
    head: dict[str, Any],
    draw: Callable[[list[dict[str, Any]], Path], None],
    plot_path: Path,
    **extra: Any,
) -> None:
    """A bench's last steps: print its headline, draw its plot and write its JSON (table, headline,
    the plot's path and ``extra``)."""
    print(json.dumps(head, indent=2))
    draw(rows, plot_path)
    print(f"plot: {plot_path}")
    write_json(json_path, table=rows, headline=head, plot=str(plot_path), **extra)


def latency_axes() -> tuple[Any, Any]:
    """A figure for top-1 against median latency, the plot most bench scripts draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5), dpi=120)


def mark(ax: Any, row: dict[str, Any]) -> None:
    """One named row as a black cross with its name."""
    ax.scatter([row["median_ms"]], [row["top1"]], marker="x", color="black")
    ax.annotate(row["name"], (row["median_ms"], row["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=7)


def finish_latency_plot(
    fig: Any, ax: Any, title: str, path: Path, xlabel: str = "median latency, ms (batch 1)"
) -> None:
    from onnxvit.report import save_figure

    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1, % (evaluation split)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
