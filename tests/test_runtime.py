"""Logits as every measurement takes them: many callers on a single-threaded session give exactly
what one multi-threaded session gives, batch by batch, for float and dynamic int8 models."""

from __future__ import annotations

import numpy as np

from passes.base import PassContext
from passes.quantize_int8 import QuantizeInt8Config, QuantizeInt8Pass
from passes.runtime import batches, make_session, model_logits


def test_parallel_callers_give_the_logits_of_one_session(tiny_onnx, tiny_images):
    int8 = QuantizeInt8Pass(QuantizeInt8Config()).run(tiny_onnx, PassContext())
    for model in (tiny_onnx, int8):
        split = batches(tiny_images, 1)
        session = make_session(model, 2)
        name = session.get_inputs()[0].name
        expected = np.concatenate([session.run(None, {name: b})[0] for b in split])
        seen = []
        got = model_logits(model, split, threads=2, advance=seen.append)
        assert np.array_equal(got, expected)
        assert sum(seen) == len(tiny_images)
