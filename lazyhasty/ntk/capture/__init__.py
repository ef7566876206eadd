"""Capture rules by operation (issue 26's ``ntk/capture/`` layout, started here).

* :mod:`.broadcast`: parameters the model broadcasts against the batch at an elementwise operation (layer
  scales, norm affines, position embeddings looked up on a ``[1, L]`` buffer, an attention bias): per-example
  stand-ins at the operation.
"""
