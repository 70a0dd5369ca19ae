"""The pipeline as named stages, each a small module over the shared ``Run`` and the ``Variant`` type:

    load -> prune -> export -> passes -> evaluate -> benchmark -> mobile -> report

``onnxvit.compress`` composes them for `onnxvit compress`; the bench scripts compose them too, so a
figure in a benchmark is measured exactly as the report measures it.
"""
