"""Which parameters get which exact per-layer treatment, and the features of one block of examples.

For the "layerwise" implementation every trainable parameter is covered exactly once:

* ``nn.Linear`` (any leading dims: positions are summed), ``nn.Conv1d`` / ``2d`` / ``3d`` (stride,
  padding incl. string and non-zero modes, dilation, groups), ``nn.ConvTranspose1d`` / ``2d`` / ``3d`` (by the
  adjoint convolution: input at input positions, patches of the output gradient; bias as its own plan) and
  ``nn.Embedding``: from the captured layer input and the output gradient, either in ghost form or as
  materialized per-example gradients, chosen per layer by a cost model;
* ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: the input and hidden maps as :class:`RecurrentProjection` sites,
  hooked while :func:`unrolled_recurrent` runs;
* ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``, ``nn.BatchNorm*d`` in eval mode (affine parameters): materialized
  per-example gradients from the normalized input;
* ``nn.MultiheadAttention`` self- and cross-attention: the packed ``in_proj_weight`` as an :class:`InProjection`
  (a linear layer, hooked while :func:`unrolled_attention` runs) and ``out_proj`` as a Linear;
* subclasses of all of these, kept only when the layer check confirms them;
* parameters the model's own code multiplies directly (``h @ W``, ``W @ h``, ``torch.matmul``, ``torch.mm``,
  ``torch.addmm(b, h, W)``, ``F.linear(h, W, b)``, per-head weights ``[H, d_in, d_out]``: :data:`SITE_LAYOUTS`):
  :class:`MatmulSite` linear layers (grouped for per-head weights), found by :func:`discover_sites`;
* every other trainable parameter (other modules, parameters shared between modules, parametrized
  weights, ``scale_grad_by_freq`` embeddings...): per-example copies where the model only broadcasts it
  against the batch (``Featurizer.per_example_copies``), else exact per-example Jacobians by ``torch.func``
  (``vmap(jacrev)``) for those parameters only.

A module called several times per forward contributes the positions of all its calls. Once per model
structure, each layer's per-example gradients, weighted by random example and output weights, are
checked against autograd's gradient of the same weighted sum, on a perturbed copy of the model
(``featurize.Featurizer.verify_on_twin``); a parameter also used outside its module's forward, or a module whose
batch is not dim 0, fails that check and is moved to the exact fallback, so no term is ever missing.

Modules, in the order a block goes through them:

* :mod:`.plan`: which parameters get which per-layer treatment (``plan_layers`` -> ``LayerPlan``, ``LayerKind``);
* :mod:`.planning`: the plan as the layer check moves it (``Planning``) and its remembered ``Verdict``;
* :mod:`.sites`: capture sites of fused modules and of matmuls in the model's own code;
* :mod:`.hooks`: the capture forward, returning a :mod:`.captured` value (per plan its calls' inputs and outputs;
  plans hold decisions only);
* :mod:`.broadcast`: per-example stand-ins for parameters broadcast against the batch;
* :mod:`.backward`: the batched backward (vector-Jacobian products) and parametrizations;
* :mod:`.layouts`: per-example factors from captured tensors;
* :mod:`.maps`: from captured quantities to parameters (affine maps, parametrized weights, splits);
* :mod:`.cost`: the cost model (pure) choosing ghost or materialized per layer;
* :mod:`.check`: the layer check's weights and reference gradients, shared by the tile and trace paths;
* :mod:`.mixing`: guards against batch mixing;
* :mod:`.caches`: every per-model cache, and ``forget``.

Adding a family of layers is a change here: a plan rule (``plan.py``), a layout (``layouts.py``) and, where the
layer cannot be hooked as it is, a site (``sites.py``) or a broadcast rule (``broadcast.py``).
"""
