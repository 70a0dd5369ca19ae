import numpy as np
import pytest
import torch

from onnxvit.config import ModelConfig
from onnxvit.errors import UserError
from onnxvit.models import create_model

SMALL = {"name": "deit_tiny_patch16_224", "num_classes": 4, "kwargs": {"depth": 1}}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    return create_model(ModelConfig(random_init=True, **SMALL))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
)
def test_checkpoint_wrappers_load_the_same_weights(tmp_path, source, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source.state_dict()), path)
    loaded = create_model(ModelConfig(checkpoint=path, **SMALL))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded(x), source(x))


def test_checkpoint_that_does_not_fit_names_keys(tmp_path, source):
    sd = source.state_dict()
    sd.pop("cls_token")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match="missing keys: cls_token; unexpected keys: extra.weight"):
        create_model(ModelConfig(checkpoint=path, **SMALL))


def test_num_classes_mismatch_is_explained(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(UserError, match="num_classes differs: the checkpoint has 4, the model 10"):
        create_model(ModelConfig(checkpoint=path, **{**SMALL, "num_classes": 10}))


def test_unknown_model_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="unknown timm model 'deit_tiny_patch16'; did you mean"):
        create_model(ModelConfig(name="deit_tiny_patch16", random_init=True))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
        create_model(ModelConfig(checkpoint=junk, **SMALL))
    with pytest.raises(UserError, match="not found"):
        create_model(ModelConfig(checkpoint=tmp_path / "absent.pth", **SMALL))


def test_random_weights_are_the_same_in_every_run():
    """The cache keys a random-init model by its config, so its weights must follow from the config."""
    import torch

    from onnxvit.config import ModelConfig
    from onnxvit.models import create_model
    from tests.conftest import TINY_MODEL

    torch.manual_seed(123)
    first = create_model(ModelConfig(**TINY_MODEL)).state_dict()
    torch.manual_seed(456)
    state = torch.get_rng_state()
    second = create_model(ModelConfig(**TINY_MODEL)).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left as it was


def test_the_pytorch_variant_is_scored_on_onednn_linears_with_the_same_products(tiny_model, tiny_images):
    """Every float32 nn.Linear of a copy runs on oneDNN: the logits are plain eager's to float
    rounding, with the same classes; the model the user runs (and latency times) is left as it was."""
    from onnxvit.eager import LINEAR_KERNEL, OneDNNLinear, onednn_linears, onednn_scoring
    from onnxvit.variant import Variant

    if not onednn_scoring():
        pytest.skip("this PyTorch build has no oneDNN linear operator or no MKL")
    model = tiny_model.eval()
    linears = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    scored, kernel = onednn_linears(model)
    assert kernel == LINEAR_KERNEL and scored is not model
    assert [name for name, m in scored.named_modules() if isinstance(m, OneDNNLinear)] == linears
    assert all(type(m) is torch.nn.Linear for name, m in model.named_modules() if name in linears)
    first = linears[0]  # the copy holds the model's weights, not a second copy of them
    assert scored.get_submodule(first).weight.data_ptr() == model.get_submodule(first).weight.data_ptr()
    x = torch.from_numpy(tiny_images)
    with torch.inference_mode():
        plain, onednn = model(x).numpy(), scored(x).numpy()
    np.testing.assert_allclose(onednn, plain, rtol=1e-4, atol=1e-5)
    assert np.array_equal(onednn.argmax(1), plain.argmax(1))

    variant = Variant("torch-fp32", "torch", "tiny", module=model)
    assert variant.scoring_kernel == LINEAR_KERNEL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the variant's one caller runs
    try:
        with torch.inference_mode():
            one_by_one = np.concatenate([scored(x[i : i + 1]).numpy() for i in range(len(x))])
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(variant.logits(tiny_images, 1, 1), one_by_one)
    no_linear = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    assert onednn_linears(no_linear) == (no_linear, "default")
    with pytest.MonkeyPatch.context() as patch:  # a build whose BLAS is not MKL keeps it
        patch.setattr(torch.backends.mkl, "is_available", lambda: False)
        assert onednn_linears(model) == (model, "default")
        assert Variant("torch-fp32", "torch", "tiny", module=model).scoring_kernel == "default"
    assert Variant("lite", "torch-lite", "x", module=model).scoring_kernel == "default"


def test_the_pytorch_variant_is_scored_by_a_trace_with_eagers_exact_logits(tiny_model, tiny_images):
    """With batches enough, the scoring copy runs as a trace whose logits are eager's bit for bit,
    a last smaller batch included (run eagerly); with too few, eager runs and nothing is decided."""
    from onnxvit.eager import TRACE_MIN_BATCHES, TracedModel, onednn_linears, scoring_model, traced
    from onnxvit.variant import Variant

    scored, _ = onednn_linears(tiny_model.eval())
    x = torch.from_numpy(tiny_images)
    assert TRACE_MIN_BATCHES <= len(x) < TRACE_MIN_BATCHES * 5 and len(x) % 5
    one, final = scoring_model(scored, tiny_images, 1)
    assert isinstance(one, TracedModel) and final
    assert scoring_model(scored, tiny_images, 5) == (scored, False)  # too few batches of 5 to decide
    five = traced(scored, [x[:5], x[5:10]])  # traced at 5: the last batch, of 2, runs eagerly
    assert isinstance(five, TracedModel)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for batch, model in ((1, one), (5, five)):
                eager = torch.cat([scored(x[i : i + batch]) for i in range(0, len(x), batch)])
                assert torch.equal(torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]), eager)
    finally:
        torch.set_num_threads(threads)

    variant = Variant("torch-fp32", "torch", "tiny", module=tiny_model)
    few = variant.logits(tiny_images[: TRACE_MIN_BATCHES - 1], 1, 1)
    assert variant._scoring_models == {}  # too few images to decide: scored eagerly, decided later
    all_images = variant.logits(tiny_images, 1, 2)
    assert isinstance(variant._scoring_models[1], TracedModel)
    assert np.array_equal(all_images[: len(few)], few)


class _ValueBranch(torch.nn.Module):
    """A model whose output depends on a branch on its input's values: a trace keeps one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y * 2 if bool(x.mean() > 0) else y * 3


def test_a_model_whose_trace_would_differ_or_fails_is_scored_eagerly():
    from onnxvit.eager import scoring_model, traced

    torch.manual_seed(0)
    model = _ValueBranch().eval()
    positive, negative = torch.rand(1, 4) + 1, -torch.rand(1, 4) - 1
    assert traced(model, [positive, positive + 1]) is not None  # one branch taken: the trace holds there
    assert traced(model, [positive, negative]) is None  # the second batch takes the other branch
    images = np.concatenate([np.ones((1, 4)), -np.ones((9, 4))]).astype(np.float32)
    assert scoring_model(model, images, 1) == (model, True)

    class NotTraceable(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "no tensor out"

    assert traced(NotTraceable(), [positive, positive]) is None


@pytest.mark.parametrize("name", ["levit_128s", "mobilevit_xxs"])
def test_onednn_linears_keep_a_hybrids_logits(name):
    """Hybrids feed their linear layers other shapes (LeViT's Linear -> BatchNorm1d on flattened
    tokens, MobileViT's unfolded patches): every layer still runs on oneDNN, to float rounding, and
    the scoring copy's trace gives its logits exactly."""
    import timm

    from onnxvit.eager import OneDNNLinear, onednn_linears, onednn_scoring, traced

    if not onednn_scoring():
        pytest.skip("this PyTorch build has no oneDNN linear operator or no MKL")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    scored, _ = onednn_linears(model)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert linears and sum(isinstance(m, OneDNNLinear) for m in scored.modules()) == linears
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.inference_mode():
        plain, onednn = model(x), scored(x)
    assert torch.allclose(onednn, plain, rtol=1e-4, atol=1e-5 * float(plain.abs().max()))
    trace = traced(scored, [x[:1], x[1:]])  # and its trace gives eager's logits bit for bit
    assert trace is not None
    with torch.inference_mode():
        assert torch.equal(torch.cat([trace(x[:1]), trace(x[1:])]), torch.cat([scored(x[:1]), scored(x[1:])]))


def test_a_pytorch_variants_logits_come_in_order_from_parallel_callers(tiny_model, tiny_images):
    """PyTorch logits computed by two callers at batch 1 are every image's, in order, as one call over
    the whole batch computes them; the caller's thread setting is left as it was."""
    from onnxvit.variant import Variant

    variant = Variant("torch-fp32", "torch", "tiny", module=tiny_model.eval())
    before = torch.get_num_threads()
    seen = []
    logits = variant.logits(tiny_images, 1, 2, seen.append)
    with torch.inference_mode():
        expected = tiny_model(torch.from_numpy(tiny_images)).numpy()
    assert torch.get_num_threads() == before and sum(seen) == len(tiny_images)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
