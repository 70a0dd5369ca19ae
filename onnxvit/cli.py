"""The command line: commands parse arguments and call the library; user mistakes exit 2 in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from onnxvit import __version__
from onnxvit.errors import UserError

EXAMPLE_YAML = """\
# onnxvit config. Relative paths are read against this file's folder.
model:
  name: {model}                 # any timm model name
  # Where the weights come from: exactly one of
  checkpoint: path/to/weights.pth   # a local state_dict (plain, or under "model" / "state_dict")
  # pretrained: true                # timm's hub weights (needs internet)
  # random_init: true               # random weights: speed and mechanics only
  # num_classes: 1000
  # kwargs: {{depth: 2}}             # extra timm.create_model arguments

data:
  root: path/to/imagenet-style-folder   # ROOT/CLASS/IMAGE.jpg, sorted class folders = class index
  # manifest: calib_data/my-split.json   # which images calibrate / search / evaluate (`onnxvit split`)
  calibrate_images: 32          # without a manifest: a fixed hash split of this size...
  search_images: 31             # ...and this; the rest evaluates
  # max_eval_images: 200        # evaluate on a subset, for a quick look
  batch_size: 32

# prune:                        # structured pruning in PyTorch before export (torch-pruning)
#   method: taylor              # l1 | l2 | taylor | hessian | random
#   ratio: 0.1                  # of the parameters (target: macs for MACs), spread over ratio_kinds
#   ratio_kinds: [mlp, head_dims]   # or explicit fractions instead of ratio: mlp, heads, head_dims
#   round_to: 8                 # channel counts stay multiples of 8

export:
  opset: 17
  simplify: true                # onnxsim, kept only if its logits match

passes:                         # in order; each reads the previous step's output unless `input` says
  - pass: quantize_int8
    name: int8                  # -> model.int8.onnx, a report variant
    input: fp32                 # fp32 is the exported model
    options:
      mode: dynamic             # static: calibrated QDQ (then calibrate_method, activation_type apply)
      per_channel: true
      weight_type: auto         # int8; uint8 (u8u8 kernel) where this CPU would need 7-bit int8 and u8u8 is as fast
      schemes: fixed            # search: each layer's weight scheme by its measured error (slower; more faithful)
  - pass: fp16
    name: fp16
    input: fp32
    options:
      keep_io_types: true
  # - pass: mixed_precision     # per block: float / int8 / w4 (4-bit weights), by a measured Pareto search
  #   name: mixed
  #   input: fp32
  #   options:
  #     choices: [float, int8, w4]
  #     select: {{min_sqnr_db: 15, minimize: size}}   # on the search split; the front is in report.md

benchmark:
  threads: 2
  warmup: 10
  runs: 50                      # small models need more (200): a few ms per run is noisy
  batch_size: 1

output:
  dir: out/{name}
"""


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit code 2, for every command."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            _fail(str(exc))


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="onnxvit")
def main() -> None:
    """Prune, quantize and benchmark timm vision transformers for ONNX Runtime."""


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Ignore the cache and redo every step.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or messages.")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Output folder (overrides output.dir).")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    help="Where evaluations and searches run (overrides executor.kind); latency is always timed here.",
)
def compress(config: Path, force: bool, quiet: bool, output: Path | None, executor: str | None) -> None:
    """Run the pipeline that CONFIG describes and write models and report."""
    from onnxvit.compress import compress as run_compress
    from onnxvit.report import markdown_table, variant_table

    report = run_compress(config, force=force, quiet=quiet, output=output, executor=executor)
    if not quiet:
        click.echo(markdown_table(variant_table(report)))


@main.command()
@click.argument("name")
@click.option("--model", default="deit_tiny_patch16_224", show_default=True, help="timm model name.")
def init(name: str, model: str) -> None:
    """Write a commented example config NAME.yaml (never overwrites)."""
    from onnxvit.fileio import atomic_write_text

    path = Path(name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if path.exists():
        raise UserError(f"{path} already exists; choose another name or remove it first")
    atomic_write_text(path, EXAMPLE_YAML.format(model=model, name=path.stem))
    click.echo(f"wrote {path}: set model.checkpoint and data.root, then `onnxvit compress {path}`")


@main.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
def clean(output: Path, dry_run: bool) -> None:
    """Remove the cache files of OUTPUT (a compress output folder) that its last completed run did
    not use: steps of older configs, old search memos, an interrupted fine-tune's checkpoints."""
    from onnxvit.compress import CACHE_DIR, RUN_MARKER
    from onnxvit.engine import clean_cache

    if not (output / RUN_MARKER).is_file():
        raise UserError(f"{output}: not an onnxvit output folder (no {RUN_MARKER}); give the folder of output.dir")
    stale, size = clean_cache(output / CACHE_DIR, dry_run)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(stale)} cache files, {size / 1e6:.1f} MB")


@main.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out", required=True, type=click.Path(path_type=Path), help="Manifest to write.")
@click.option("--calibrate", default=32, show_default=True, help="Calibration images.")
@click.option("--search", default=31, show_default=True, help="Search images.")
def split(root: Path, out: Path, calibrate: int, search: int) -> None:
    """Write a split manifest for the ImageFolder ROOT (fixed hash order, disjoint splits)."""
    from onnxvit.data import hash_split, manifest_document, scan_image_folder
    from onnxvit.fileio import atomic_write_json

    if out.exists():
        raise UserError(f"{out} already exists; choose another path or remove it first")
    folder = scan_image_folder(root)
    splits = hash_split(folder.files, calibrate, search)
    description = (
        f"Split of {root.name}: files ordered by sha256 of their relative path; "
        f"first {calibrate} calibrate, next {search} search, the rest evaluate."
    )
    atomic_write_json(out, manifest_document(splits, description))
    click.echo(f"wrote {out}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))


@main.command()
@click.argument("report_dir", type=click.Path(path_type=Path))
def bench(report_dir: Path) -> None:
    """Print every variant's ratios to fp32 from a run's report."""
    from onnxvit.report import markdown_table, read_report, variant_table

    click.echo(markdown_table(variant_table(read_report(report_dir))))


@main.command()
def passes() -> None:
    """List the graph passes and their options."""
    from onnxvit.reference import summary
    from passes import get_pass, pass_names

    for name in pass_names():
        cls = get_pass(name)
        click.echo(f"{name}: {summary(cls)}")
        for field, info in cls.Config.model_fields.items():
            default = info.get_default(call_default_factory=True)
            shown = default.model_dump() if hasattr(default, "model_dump") else default
            click.echo(f"  {field} (default {shown!r}): {info.description}")


@main.command()
def reference() -> None:
    """Print the config and pass reference (docs/reference.md) generated from the code."""
    from onnxvit.reference import reference as render

    click.echo(render(), nl=False)


if __name__ == "__main__":
    main()
