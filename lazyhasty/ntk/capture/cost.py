"""The cost model (pure): flops of the ghost and materialized forms of one layer, the form chosen for it, and
``implementation="auto"``'s choice between the layerwise pass and the whole-model Jacobian.

``form_costs`` / ``embedding_costs`` state the arithmetic once (``ntk/README.md`` derives it); ``choose_form``
picks the cheaper form for a layer in a block of ``b`` examples and ``k`` outputs; ``layerwise_or_jacobian``
weighs the layerwise pass plus its torch.func fallback against one whole-model Jacobian.
"""
from __future__ import annotations



from .plan import LayerPlan


# --- cost model -------------------------------------------------------------------------------------
# A strided permute of the ghost form's [b S d_out, b k] intermediate, in flops an element. The intermediate comes
# from a batched GEMM whose inner dimension is the other block's positions (often 16-64: memory-bound), and is then
# copied once in memory; both scale with its size. 32 (one measured copy beside GEMMs at ~30 GFLOP/s) still chose
# ghost where it lost; 128, measured on the 2-core CPU, full kernel, median of 5, 32 -> 128: torchvision
# mobilenet_v3_small (n = 8) 336 -> 222 ms, ViT-tiny (n = 32) 76 -> 60 ms, the plain CNN (n = 64)
# 656 -> 510 ms; resnet18, squeezenet, the text transformer, cnn3 (n = 256) and resnet18_w16 unchanged (+-3%).
GHOST_PERMUTE_FLOPS = 128


def form_costs(G: int, din: int, S: int, k: int, dout: int, kernel: str, pairs_per_example: float = 0.0) -> dict:
    """The cost model of one linear / convolution layer (``G`` groups, ``S`` positions, ``d_in``, ``d_out``,
    ``k`` outputs), in flops.

    Per example pair: ghost ``G S^2 (d_in + k d_out)`` (trace; the full kernel's H contraction costs
    ``G S k d_out (S + k)``), materialized ``k G d_in d_out`` (``k^2`` for the full kernel). Forming the
    materialized gradients costs ``k G S d_in d_out`` per example (``forming``), amortized over
    ``pairs_per_example`` (about n / 2 for n examples; 0 ignores it) in ``materialized``. ``forward``: the
    layer's flops an example, for ``implementation="auto"``'s comparison with a whole-model Jacobian.
    """
    forming = k * G * S * din * dout  # per example: k backward products of the layer's weight
    if kernel == "full":
        # with positions, the ghost product's intermediate H (S k d_out per pair) is permuted once in memory:
        # a strided copy, charged GHOST_PERMUTE_FLOPS flops an element
        ghost = G * (S * S * din + (S * k * dout * (S + k + GHOST_PERMUTE_FLOPS) if S > 1 else k * k * dout))
        pair = k * k * G * din * dout
    else:
        ghost = G * S * S * (din + k * dout)
        pair = k * G * din * dout
    materialized = pair + (forming / pairs_per_example if pairs_per_example > 0 else 0.0)
    return {"ghost": float(ghost), "materialized": float(materialized), "materialized_pair": float(pair),
            "forming": float(forming), "forward": float(G * S * din * dout), "dims": (G, din, S, k, dout)}


def embedding_costs(S: int, V: int, D: int, k: int, pairs_per_example: float = 0.0) -> dict:
    """The cost model of an embedding (``V`` rows of width ``D`` looked up at ``S`` positions), full kernel, in
    flops: ghost ``S^2`` index comparisons plus the positions' product as for a linear layer; materialized
    ``k^2 V D`` a pair, plus zeroing and scattering the ``[k, V D]`` gradients of each example (``forming``)."""
    ghost = S * S + (S * k * D * (S + k + GHOST_PERMUTE_FLOPS) if S > 1 else k * k * D)
    pair = k * k * V * D
    forming = k * V * D + k * S * D
    materialized = pair + (forming / pairs_per_example if pairs_per_example > 0 else 0.0)
    return {"ghost": float(ghost), "materialized": float(materialized), "materialized_pair": float(pair),
            "forming": float(forming), "forward": float(S * D)}


def choose_form(plan: LayerPlan, G: int, din: int, S: int, k: int, dout: int, kernel: str,
                pairs_per_example: float = 0.0) -> str:
    """Ghost or materialized, whichever needs fewer flops by :func:`form_costs` (ties: materialized); the
    figures are kept in ``plan.costs``."""
    if plan.kind == "embedding":  # din: the vocabulary, dout: the embedding width
        if kernel != "full":
            return "ghost"  # (the one-block trace path reduces embeddings in ghost form only)
        plan.costs = embedding_costs(S, din, dout, k, pairs_per_example)
        return "ghost" if plan.costs["ghost"] < plan.costs["materialized"] else "materialized"
    if plan.kind == "norm" or plan.weight_map:
        return "materialized"
    plan.costs = form_costs(G, din, S, k, dout, kernel, pairs_per_example)
    return "ghost" if plan.costs["ghost"] < plan.costs["materialized"] else "materialized"


# implementation="auto" (layerwise_or_jacobian): where some parameters still need torch.func, the layerwise
# pass plus that fallback against one whole-model Jacobian, by the cost model. The fallback's vmap(jacrev) runs a
# forward and k backward passes through the whole model whatever share of the parameters it covers, so per
# example the two differ by
#     jacobian - layerwise = sum_l [pairs * materialized_l - pairs * min(ghost_l, materialized_l)] - (1 + k) F
# (materialized_l includes forming the layer's per-example gradients, which the Jacobian pays too; F: the
# forward's flops an example through the parameters, sum_l G S d_in d_out plus one per other parameter): the
# layerwise pass wins only where its ghost forms save more than that extra pass. Measured (2-core CPU, n = 32-64,
# layerwise / jacobian time, before attention and recurrences were captured): torchvision ViT (37% on the
# fallback, mostly materialized) 1.5x, nn.TransformerEncoder classifier (41%) 1.4x, nn.MultiheadAttention (81%)
# 1.5x, nn.LSTM (98%) 1.2x; resnet18 with its BatchNorms on the fallback (ghost convolutions) 0.2x.
# The extra pass is weighted by PASS_FLOP_WEIGHT: its flops run as many small kernels through autograd, the
# savings as large GEMMs. Measured (2-core CPU, an MLP with a 256-input cosine Linear on torch.func, n = 64,
# trace): the extra capture pass took 28 ms for 54M modelled flops (~2 GFLOP/s), GEMMs run at ~80, so the
# flop-only rule took layerwise (3.5M "saved" a example against 0.84M) and was 7% slower than torch.func.
PASS_FLOP_WEIGHT = 16


def layerwise_or_jacobian(layers: list, fallback_numel: int, share: float, kernel: str, pairs_per_example: float):
    """``(jacobian, reason)``: whether ``implementation="auto"`` takes the whole-model Jacobian instead of the
    layerwise pass plus a torch.func pass for the fallback parameters (see the comment above), and why.

    Args:
        layers: per planned layer, ``(dims, numel)``: its cost-model dims ``(G, d_in, S, k, d_out)`` from the
            layer check (None for norms, embeddings, affine maps: one flop a parameter) and its parameters' size.
        fallback_numel: the fallback parameters' size (one forward flop each).
        share: the fallback's share of the trainable parameters (for the reason).
        kernel: ``"full"`` / ``"trace"`` / ``"diagonal"``.
        pairs_per_example: example pairs a block's features enter, per example.

    Example:
        >>> layerwise_or_jacobian([((1, 512, 1, 10, 512), 262656)], 100, 0.01, "full", 32.0)[0]
        False
    """
    pairs = max(pairs_per_example, 1.0)
    saved, forward, k = 0.0, float(fallback_numel), 1
    for dims, numel in layers:
        if dims is None:
            forward += numel
            continue
        c = form_costs(*dims, kernel, pairs)
        k = dims[3]
        materialized = pairs * c["materialized_pair"] + c["forming"]
        saved += materialized - min(pairs * c["ghost"], materialized)
        forward += c["forward"]
    extra = PASS_FLOP_WEIGHT * (1 + k) * forward
    if saved > extra:
        return False, (f"layerwise: its ghost forms save {saved:.3g} flops an example, more than the torch.func "
                       f"pass of the fallback ({share:.0%} of the parameters) adds ({extra:.3g})")
    return True, (f"jacobian: the torch.func pass of the fallback ({share:.0%} of the parameters) adds {extra:.3g} "
                  f"flops an example, more than the layerwise ghost forms save ({saved:.3g})")
