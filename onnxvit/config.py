"""The YAML schema, as pydantic models: every option has a type, a default and a description.

Unknown keys are errors with a did-you-mean; relative paths are read against the YAML file's
folder, so a config means the same whatever the working directory.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from onnxvit.errors import UserError
from onnxvit.fileio import sha256_json
from passes import get_pass, pass_names

EXPORT_VARIANT = "fp32"  # the name of the exported (and simplified) model
TORCH_VARIANT = "torch-fp32"
DENSE_VARIANT = "dense-fp32"  # the unpruned model's export, when the config prunes


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelConfig(StrictModel):
    name: str = Field(description="timm model name, e.g. deit_tiny_patch16_224.")
    checkpoint: Path | None = Field(
        None, description="Local weights: a state_dict, or one wrapped in 'model' / 'state_dict'."
    )
    pretrained: bool = Field(False, description="Download timm's pretrained weights from the hub.")
    random_init: bool = Field(False, description="Random weights, for speed and mechanics only.")
    recalibrate_bn: bool = Field(
        False,
        description="Re-estimate BatchNorm statistics on the calibration images "
        "(for random weights: realistic activation ranges).",
    )
    num_classes: int | None = Field(None, gt=0, description="Classifier size when not the model's default.")
    kwargs: dict[str, Any] = Field({}, description="Extra timm.create_model arguments, e.g. {depth: 2}.")

    @model_validator(mode="after")
    def _one_weight_source(self) -> ModelConfig:
        chosen = [
            flag
            for flag, on in (
                ("checkpoint", self.checkpoint is not None),
                ("pretrained", self.pretrained),
                ("random_init", self.random_init),
            )
            if on
        ]
        if len(chosen) != 1:
            raise ValueError(
                "say where the weights come from with exactly one of checkpoint: PATH, pretrained: true "
                f"or random_init: true (got {', '.join(chosen) or 'none'})"
            )
        return self


class DataConfig(StrictModel):
    root: Path = Field(description="An ImageFolder: one sub-folder of images per class, sorted = class index.")
    manifest: Path | None = Field(
        None, description="Split manifest (see calib_data/README.md); default: a fixed hash split."
    )
    calibrate_images: int = Field(32, gt=0, description="Calibration split size when no manifest is given.")
    search_images: int = Field(31, ge=0, description="Search split size when no manifest is given.")
    max_eval_images: int | None = Field(
        None, gt=0, description="Evaluate on the first N images of the evaluation split."
    )
    batch_size: int = Field(32, gt=0, description="Batch size for evaluation.")
    check_images: int = Field(8, gt=0, description="Calibration images for the numeric check after every step.")


class ExportConfig(StrictModel):
    opset: int = Field(17, ge=13, le=21, description="ONNX opset.")
    simplify: bool = Field(True, description="Run the simplify pass (onnxsim, checked) on the export.")
    exporter: Literal["torchscript", "dynamo"] = Field("torchscript", description="torch.onnx exporter.")
    atol: float = Field(1e-4, gt=0, description="Largest logit difference accepted between PyTorch and ONNX...")
    rtol: float = Field(
        1e-5, ge=0, description="...plus this fraction of the largest |logit| (float32 noise grows with the logits)."
    )


PRUNE_KINDS = ("mlp", "heads", "head_dims")


class PruneConfig(StrictModel):
    """Structured pruning before export: attention heads, head dims and MLP hidden channels.

    The residual (embedding) width is never cut: cutting it (as PQV-Mobile's ratio does) costs
    far more top-1 than it saves latency, while heads and MLP channels are the cheap cut.
    """

    method: Literal["l1", "l2", "taylor", "hessian", "random"] = Field(
        "taylor",
        description="Importance: weight magnitude (l1, l2), first-order Taylor, diagonal Hessian (OBD), random.",
    )
    ratio: float | None = Field(None, gt=0, lt=1, description="Fraction of parameters (or MACs, see target) to remove.")
    target: Literal["params", "macs"] = Field("params", description="What `ratio` counts.")
    ratio_kinds: list[Literal["mlp", "heads", "head_dims"]] = Field(
        ["mlp", "head_dims"], min_length=1, description="Kinds that `ratio` is spread over, at one common fraction."
    )
    mlp: float | None = Field(None, ge=0, lt=1, description="Explicit fraction of MLP hidden channels to remove.")
    heads: float | None = Field(None, ge=0, lt=1, description="Explicit fraction of attention heads to remove.")
    head_dims: float | None = Field(None, ge=0, lt=1, description="Explicit fraction of each head's dims to remove.")
    round_to: int = Field(8, gt=0, description="Keep channel counts a multiple of this, so GEMMs stay efficient.")
    global_pruning: bool = Field(
        False, description="Rank channels across layers (true) or cut each layer alike (false)."
    )
    ignore: list[str] = Field(["head"], description="Module names never pruned (default: the classifier).")
    batches: int = Field(4, gt=0, description="Calibration batches for gradient-based importance (taylor, hessian).")
    batch_size: int = Field(8, gt=0, description="Batch size for gradient-based importance.")
    reconstruct: bool = Field(
        True,
        description="Refit each layer whose inputs were cut (fc2, proj) by least squares "
        "on the calibration images to the dense layer's output.",
    )
    ridge: float = Field(0.1, gt=0, description="How strongly the refit stays near the original weights.")
    loss: Literal["auto", "labels", "predictions"] = Field(
        "auto",
        description="Taylor / Hessian loss target: folder labels, or the dense model's own top-1; "
        "auto: labels unless the weights are random.",
    )

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        explicit = [kind for kind in PRUNE_KINDS if getattr(self, kind) is not None]
        if self.ratio is None and not explicit:
            raise ValueError("say how much to prune: ratio: 0.1, or one or more of mlp, heads, head_dims")
        if self.ratio is not None and explicit:
            raise ValueError(f"give either ratio or explicit {', '.join(explicit)}, not both")
        return self


class FinetuneConfig(StrictModel):
    """Distillation of the pruned model from the dense one (soft targets; no labels needed)."""

    root: Path | None = Field(
        None,
        description="Training ImageFolder; default: the calibrate and search splits "
        "of data.root (never the evaluation split).",
    )
    epochs: int = Field(10, gt=0, description="Passes over the training images.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW, one-cycle cosine).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(16, gt=0, description="Training batch size.")
    temperature: float = Field(1.0, gt=0, description="Distillation temperature.")
    augment: bool = Field(True, description="timm's training transform (random resized crop, flip, RandAugment).")
    auto_augment: str | None = Field(
        "rand-m9-inc1",
        description="timm auto-augment policy string (no magnitude noise: "
        "with it, Posterize can draw 0 bits, which Pillow rejects).",
    )
    random_erasing: float = Field(0.25, ge=0, le=1, description="timm random-erasing probability.")
    seed: int = Field(0, description="Image order and augmentation seed.")


class TokenSearchConfig(StrictModel):
    """Pick the merge instead of taking one: the fastest candidate, by latency measured in ONNX Runtime,
    whose logits on the search split stay within the budget against the unmerged model's."""

    candidates: list[int] = Field(
        [4, 8, 10, 12, 16], min_length=1, description="Tokens merged per block (r) tried with each schedule shape."
    )
    schedules: list[Literal["constant", "decreasing", "alternate"]] = Field(
        ["constant"], min_length=1, description="Schedule shapes tried for every candidate r."
    )
    min_sqnr_db: float = Field(14.0, description="Least SQNR (dB) of the merged logits against the unmerged ones.")
    min_agreement: float = Field(
        0.0, ge=0, le=100, description="Least top-1 agreement (%) with the unmerged model on the search split."
    )
    runs: int = Field(60, gt=0, description="Timed runs per candidate (after benchmark.warmup, in its rounds).")


class TokensConfig(StrictModel):
    """Fewer tokens without training: token merging inside the exported model (ViT / DeiT only)."""

    method: Literal["tome"] = Field("tome", description="tome: bipartite soft matching (Bolya et al., ICLR 2023).")
    r: int | None = Field(None, ge=0, description="Tokens merged away per block (see schedule).")
    schedule: Literal["constant", "decreasing", "alternate"] | list[int] = Field(
        "constant",
        description=(
            "constant: r in every block; decreasing: 2r down to 0; alternate: 2r in every other block from "
            "the second; or one number per block."
        ),
    )
    proportional_attention: bool = Field(True, description="Add log(token size) to the attention logits.")
    class_token_only_last_block: bool = Field(
        True, description="The last block computes only the class token (exact with a class-token head)."
    )
    search: TokenSearchConfig | None = Field(None, description="Pick r and the schedule by measured latency.")

    @model_validator(mode="after")
    def _one_schedule(self) -> TokensConfig:
        explicit = isinstance(self.schedule, list)
        if self.search is not None and (self.r is not None or explicit):
            raise ValueError("give either search or r / a schedule list, not both")
        if self.search is None and self.r is None and not explicit:
            raise ValueError("say how many tokens to merge: r: 8, schedule: [per-block list], or search: {}")
        if explicit and self.r is not None:
            raise ValueError("give either r or a schedule list, not both")
        return self


class StepConfig(StrictModel):
    pass_: str = Field(alias="pass", description="Pass name (see `onnxvit passes`).")
    name: str | None = Field(None, description="Name of the output model (a report variant); default: the pass name.")
    input: str | None = Field(
        None, description="Name of the model this step reads; default: the previous step's output."
    )
    report: bool = Field(True, description="Evaluate and benchmark this step's output as a variant.")
    options: dict[str, Any] = Field({}, description="The pass's own options.")

    @property
    def output(self) -> str:
        return self.name or self.pass_


class BenchmarkConfig(StrictModel):
    threads: int = Field(2, gt=0, description="Intra-op threads for ONNX Runtime and PyTorch.")
    warmup: int = Field(10, ge=0, description="Untimed runs first.")
    runs: int = Field(50, gt=0, description="Timed runs per variant.")
    rounds: int = Field(5, gt=0, description="Runs are interleaved across variants in this many rounds.")
    batch_size: int = Field(1, gt=0, description="Batch size for latency.")
    torch: bool = Field(True, description="Also time PyTorch eager FP32.")
    profile: bool = Field(
        True,
        description="Profile every ONNX variant per op (ONNX Runtime's profiler) and measure this CPU's "
        "int8-vs-float GEMM ratio at the model's linear-layer shapes: where the time goes, and what int8 allows.",
    )
    profile_runs: int = Field(20, gt=0, description="Profiled runs per variant, after the warm-up runs.")


class MobileConfig(StrictModel):
    """ONNX Runtime Mobile artifacts: `.ort` files and the reduced-build operator config."""

    variants: list[str] | None = Field(None, description="ONNX variants to convert; default: every reported one.")
    target_platform: Literal["arm", "amd64"] = Field("arm", description="Phones are arm: no x86-only layouts.")
    optimization: Literal["basic", "extended", "all"] = Field("all", description="Graph optimizations saved in .ort.")
    type_reduction: bool = Field(True, description="Operator config lists the types each op needs, too.")
    fp32_atol: float = Field(
        1e-5, gt=0, description="Largest .ort vs .onnx logit difference for float32 models (float16: same top-1)..."
    )
    fp32_rtol: float = Field(
        1e-5,
        ge=0,
        description="...plus this fraction of the largest |logit| (the .ort's kernels round apart from the "
        ".onnx's x86 ones, by more as the logits grow).",
    )
    bake_preprocessing: bool = Field(
        False,
        description="Also write each variant with its normalization inside (model.NAME-rgb8.onnx / .ort): "
        "input 'image', the center crop as uint8 RGB NHWC; the app only resizes and crops.",
    )
    web_check: bool = Field(
        True,
        description="Run every .ort file in ONNX Runtime's JavaScript package (onnxruntime-web under Node.js) "
        "on the check images against the Python run; skipped with the reason in the report when Node.js or "
        "the package is missing.",
    )
    ort_web: Path | None = Field(
        None,
        description="Folder whose node_modules holds onnxruntime-web; default: examples/web of the checkout "
        "(npm ci --prefix examples/web).",
    )


class LiteConfig(StrictModel):
    """The PyTorch Lite interpreter arm: report variants beside ONNX Runtime's, with parity."""

    fp32: bool = Field(True, description="The model traced and run by the Lite interpreter.")
    int8_engines: list[str] = Field(
        ["x86"],
        description="PyTorch dynamic int8 Linear, one variant per engine "
        "(x86, fbgemm, qnnpack, onednn where the build has it).",
    )
    static_engines: list[str] = Field(
        [],
        description="PyTorch static int8 (FX graph mode, calibrated), one variant "
        "per engine; off by default: slower than FP32 on DeiT-tiny here.",
    )
    parity_atol: float = Field(1e-4, gt=0, description="Largest logit difference lite-fp32 vs fp32 before flagging.")
    parity_min_agreement: float = Field(
        95.0, ge=0, le=100, description="Least top-1 agreement of an int8 pair before flagging."
    )


class ExecutorConfig(StrictModel):
    """Where evaluations and the searches' measurements run; latency is always timed in this process."""

    kind: Literal["local", "ray"] = Field(
        "local", description="local: in this process; ray: as Ray tasks (pip install -e '.[ray]')."
    )
    address: str | None = Field(
        None,
        description="Ray only: none starts a local cluster; 'auto' joins the one `ray start` runs here; "
        "'ray://host:10001' a remote one (its nodes need onnxvit installed).",
    )
    workers: int | None = Field(
        None, gt=0, description="Ray only: tasks at once; default: the cluster's CPUs / threads_per_worker."
    )
    threads_per_worker: int = Field(1, gt=0, description="Ray only: CPUs (and ONNX Runtime callers) per task.")

    @model_validator(mode="after")
    def _ray_options(self) -> ExecutorConfig:
        if self.kind == "local":
            extra = [name for name in ("address", "workers", "threads_per_worker") if name in self.model_fields_set]
            if extra:
                raise ValueError(f"{', '.join(extra)} apply to kind: ray only; remove them or set kind: ray")
        if self.address is not None and not (
            self.address == "auto" or self.address.startswith("ray://") or ":" in self.address
        ):
            raise ValueError(f"address {self.address!r}: use auto, ray://HOST:PORT or HOST:PORT")
        return self


class OutputConfig(StrictModel):
    dir: Path = Field(description="Folder for models, cache and report.")


class Config(StrictModel):
    model: ModelConfig = Field(description="The timm model and where its weights come from.")
    data: DataConfig = Field(description="The image folder and its calibrate / search / evaluate splits.")
    prune: PruneConfig | None = Field(None, description="Structured pruning in PyTorch before export.")
    finetune: FinetuneConfig | None = Field(None, description="Distill the pruned model from the dense one.")
    tokens: TokensConfig | None = Field(None, description="Token merging in PyTorch, after pruning, before export.")
    export: ExportConfig = Field(ExportConfig(), description="PyTorch to ONNX.")
    passes: list[StepConfig] = Field([], description="Graph passes in order.")
    benchmark: BenchmarkConfig = Field(BenchmarkConfig(), description="How latency is measured.")
    mobile: MobileConfig | None = Field(None, description="ONNX Runtime Mobile artifacts.")
    lite: LiteConfig | None = Field(None, description="PyTorch Lite interpreter variants, with parity.")
    executor: ExecutorConfig = Field(
        ExecutorConfig(), description="Where evaluations and searches run: this process or a Ray cluster."
    )
    output: OutputConfig = Field(description="Where models, cache and report go.")

    @model_validator(mode="after")
    def _finetune_needs_prune(self) -> Config:
        if self.finetune is not None and self.prune is None:
            raise ValueError("finetune: fine-tuning follows pruning; add a prune section or remove finetune")
        return self

    def sha256(self) -> str:
        return sha256_json(self.model_dump(mode="json", by_alias=True))


def model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = model_class(arg)
        if found is not None:
            return found
    return None


def _field_names(cls: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in cls.model_fields.items()]


def _lookup(cls: type[BaseModel], key: str) -> Any:
    for name, info in cls.model_fields.items():
        if key in (name, info.alias):
            return info.annotation
    return None


def describe_error(error: dict[str, Any], root: type[BaseModel], prefix: tuple[Any, ...] = ()) -> str:
    """One pydantic error as ``field.path: what is wrong`` with a did-you-mean for unknown keys."""
    loc = tuple(error["loc"])
    cls: type[BaseModel] | None = root
    for part in loc[:-1]:
        if cls is not None and isinstance(part, str):
            cls = model_class(_lookup(cls, part))
    path = ""
    for part in prefix + loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if error["type"] == "extra_forbidden":
        choices = _field_names(cls) if cls is not None else []
        close = difflib.get_close_matches(str(loc[-1]), choices, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(choices)}"
        return f"{path}: unknown key; {hint}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    value = repr(error.get("input"))
    got = f" (got {value[:60]})" if error["type"] not in ("value_error", "model_type") else ""
    return f"{path}: {message}{got}" if path else f"{message}{got}"


_UNION_MEMBER = re.compile(r"^(bool|int|float|str|none|literal\[.*\])$")
_MEMBER_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string", "none": "null"}


def merge_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A value that fits no member of a union (``bool | Literal['auto']``) gets one error per member,
    each at the field's path plus the member's name; they become one: what the field takes."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        if loc and isinstance(loc[-1], str) and _UNION_MEMBER.match(loc[-1]):
            groups.setdefault(loc[:-1], []).append(error)
    merged, done = [], set()
    for error in errors:
        field = tuple(error["loc"])[:-1]
        members = groups.get(field, [])
        if len(members) < 2 or error not in members:
            merged.append(error)
        elif field not in done:
            done.add(field)
            words = [_MEMBER_WORDS.get(m["loc"][-1], m["loc"][-1].removeprefix("literal[")[:-1]) for m in members]
            message = "expected " + ", or ".join(w.replace(", ", " or ") for w in words)
            merged.append({"type": "union", "loc": field, "msg": message, "input": error.get("input")})
    return merged


def _raise_for(exc: ValidationError, source: Path, root: type[BaseModel], prefix: tuple[Any, ...] = ()) -> None:
    errors = merge_union_errors([dict(e) for e in exc.errors()])
    lines = [describe_error(e, root, prefix) for e in errors]
    raise UserError(f"{source}: {'; '.join(lines)}") from None


def split_sizes(config: Config) -> dict[str, int] | None:
    """How many images the calibrate and search splits will hold, read without decoding any image
    (from the manifest when there is one); None when the manifest cannot be read (its own check,
    when the data is loaded, says why)."""
    d = config.data
    if d.manifest is None:
        return {"calibrate": d.calibrate_images, "search": d.search_images}
    try:
        splits = json.loads(d.manifest.read_text(encoding="utf-8"))["splits"]
        return {split: len(splits[split]) for split in ("calibrate", "search")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


_SPLIT_OF = {"calibration": ("calibrate", "data.calibrate_images"), "search": ("search", "data.search_images")}


def _check_requirements(
    pass_name: str, needs: frozenset[str], config: Config, sizes: dict[str, int] | None, where: str
) -> None:
    """Refuse, at load, a step whose pass needs what this config cannot give it."""
    if "labels" in needs and config.model.random_init:
        raise UserError(
            f"{where}.options: {pass_name} with these options judges by top-1, which needs real "
            "weights (random weights' top-1 means nothing); use objective: sqnr and select.min_agreement instead"
        )
    for need, (split, field_name) in _SPLIT_OF.items():
        if need in needs and sizes is not None and sizes[split] == 0:
            how = f"the manifest's {split} split" if config.data.manifest else f"{field_name} > 0"
            raise UserError(
                f"{where}: {pass_name} with these options needs {split} images, and the {split} split "
                f"is empty; give it images ({how}) or change the pass's options"
            )


def _validate_steps(config: Config, source: Path) -> list[Any]:
    """Check pass names, their options, what each needs and the step graph; return each step's parsed
    pass config."""
    parsed = []
    sizes = split_sizes(config)
    known = {EXPORT_VARIANT}
    previous = EXPORT_VARIANT
    for index, step in enumerate(config.passes):
        where = f"{source}: passes[{index}]"
        try:
            pass_cls = get_pass(step.pass_)
        except KeyError:
            close = difflib.get_close_matches(step.pass_, pass_names(), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known passes: {', '.join(pass_names())}"
            raise UserError(f"{where}.pass: unknown pass '{step.pass_}'; {hint}") from None
        try:
            parsed.append(pass_cls.Config.model_validate(step.options))
        except ValidationError as exc:
            _raise_for(exc, source, pass_cls.Config, ("passes", index, "options"))
        _check_requirements(pass_cls.name, pass_cls.requirements(parsed[-1]), config, sizes, where)
        source_name = step.input or previous
        if source_name not in known:
            raise UserError(
                f"{where}.input: no model named '{source_name}' before this step; known: {', '.join(sorted(known))}"
            )
        if step.output in known or step.output in (TORCH_VARIANT, DENSE_VARIANT):
            raise UserError(f"{where}.name: '{step.output}' is already taken; give this step its own name")
        known.add(step.output)
        previous = step.output
    return parsed


def _resolve(path: Path | None, base: Path) -> Path | None:
    return None if path is None else _resolve_required(path, base)


def _resolve_required(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def load_config(path: Path) -> tuple[Config, list[Any]]:
    """Read and validate a YAML config; return it with each step's parsed pass config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file; create one with `onnxvit init NAME`")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with keys model, data, output (see `onnxvit init`)")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        _raise_for(exc, path, Config)
    base = path.resolve().parent
    config.model.checkpoint = _resolve(config.model.checkpoint, base)
    config.data.root = _resolve_required(config.data.root, base)
    config.data.manifest = _resolve(config.data.manifest, base)
    config.output.dir = _resolve_required(config.output.dir, base)
    if config.mobile is not None:
        config.mobile.ort_web = _resolve(config.mobile.ort_web, base)
    if config.finetune is not None:
        config.finetune.root = _resolve(config.finetune.root, base)
    steps = _validate_steps(config, path)
    _validate_mobile(config, path)
    return config, steps


def _validate_mobile(config: Config, source: Path) -> None:
    if config.mobile is not None and config.mobile.variants is not None:
        reported = (
            [EXPORT_VARIANT]
            + ([DENSE_VARIANT] if config.prune or config.tokens else [])
            + [s.output for s in config.passes if s.report]
        )
        for name in config.mobile.variants:
            if name not in reported:
                raise UserError(
                    f"{source}: mobile.variants: '{name}' is not a reported ONNX variant; known: {', '.join(reported)}"
                )
