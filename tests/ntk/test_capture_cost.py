"""The pure cost model (``lazyhasty/ntk/capture/cost.py``): implementation="auto"'s layerwise-or-jacobian
choice as a function of the layers' dims alone."""
from lazyhasty.ntk.capture.cost import PASS_FLOP_WEIGHT, form_costs, layerwise_or_jacobian


def test_layerwise_wins_where_its_ghost_forms_save_more_than_the_extra_pass():
    # one wide layer on few positions (ghost saves much) and a tiny fallback: layerwise
    wide = ((1, 512, 1, 10, 512), 512 * 513)
    jacobian, why = layerwise_or_jacobian([wide], 100, 0.01, "full", 32.0)
    assert not jacobian and why.startswith("layerwise")
    # the same layer where materialized is the cheaper form already (ghost saves nothing): the extra pass loses
    narrow = ((1, 8, 256, 10, 8), 72)
    c = form_costs(1, 8, 256, 10, 8, "full", 32.0)
    assert c["ghost"] * 32.0 >= 32.0 * c["materialized_pair"] + c["forming"]  # (the premise)
    jacobian, why = layerwise_or_jacobian([narrow], 10_000, 0.5, "full", 32.0)
    assert jacobian and why.startswith("jacobian") and "50%" in why


def test_the_extra_pass_is_weighted_by_every_forward_flop():
    # layers without dims (norms, embeddings) count one forward flop a parameter: a bigger one tips the choice
    wide = ((1, 512, 1, 10, 512), 512 * 513)
    saved_only = layerwise_or_jacobian([wide], 0, 0.0, "full", 32.0)
    assert not saved_only[0]
    c = form_costs(1, 512, 1, 10, 512, "full", 32.0)
    saved = 32.0 * c["materialized_pair"] + c["forming"] - 32.0 * c["ghost"]
    heavy = int(saved / (PASS_FLOP_WEIGHT * 11)) + 1  # forward flops that make the extra pass cost more
    assert layerwise_or_jacobian([wide, (None, heavy)], 0, 0.0, "full", 32.0)[0]
