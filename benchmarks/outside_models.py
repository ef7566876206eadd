"""Benchmark-sized Hugging Face ``transformers`` and ``timm`` models for ``benchmarks/bench_outside.py`` (issue 30).

Randomly initialised from configs and constructors (never a download), larger than the test zoo's
(``tests/outside_zoo.py``, whose one-tensor stand-ins :class:`StackedInputs` and :class:`T5EncoderClassifier`
this reuses) but small enough that torch.func's per-example Jacobians ``J [n, k, P]`` fit in memory and the
naive provider runs in seconds on a 2-core CPU. Each case is ``(make_model, make_x, n)`` as in
``benchmarks/zoo_models.py``; ``make_model()`` returns a float32 module taking one tensor and returning ``[b, k]``
logits (ids and attention mask stacked as ``[b, 2, L]`` for the masked text models, a stand-in until dict
batches land), ``make_x(n)`` its inputs.

``transformers`` and ``timm`` import torchvision, whose CUDA-built wheel does not load beside the CPU torch:
the ``torchvision._meta_registrations`` stub below lets them import (as ``tests/conftest.py`` does for tests).
A library that is absent leaves its cases out (:func:`cases` lists what can run).
"""
import functools
import importlib.util
import os
import sys
import types

import torch
from torch import nn

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from outside_zoo import StackedInputs, T5EncoderClassifier, random_head  # noqa: E402

VOCAB, SEQ, TEXT_CLASSES, IMAGE_CLASSES = 1000, 16, 5, 10


def _has(lib):
    return importlib.util.find_spec(lib) is not None


def tokens(n, *, masked, pad_id, side="right", seed=1):
    """``[n, L]`` int64 ids in ``[3, VOCAB)``, or ``[n, 2, L]`` ids and attention mask with example i padded by
    ``i % 4`` positions (``pad_id``, mask 0) on the right (encoders) or the left (GPT-2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    if not masked:
        return ids
    mask = torch.ones(n, SEQ, dtype=torch.long)
    for i in range(n):
        pad = i % 4
        if pad:
            where = slice(SEQ - pad, SEQ) if side == "right" else slice(0, pad)
            mask[i, where], ids[i, where] = 0, pad_id
    return torch.stack([ids, mask], 1)


def images(n, side=32, seed=1):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64, num_labels=TEXT_CLASSES, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)


def _keys(masked):
    return ("input_ids", "attention_mask") if masked else ("input_ids",)


def bert(masked):
    import transformers as t

    return StackedInputs(t.BertForSequenceClassification(t.BertConfig(vocab_size=VOCAB, **_TEXT)), _keys(masked))


def roberta():
    import transformers as t

    cfg = t.RobertaConfig(vocab_size=VOCAB, pad_token_id=1, bos_token_id=0, eos_token_id=2, **_TEXT)
    return StackedInputs(t.RobertaForSequenceClassification(cfg), _keys(False))


def gpt2(masked, attn):
    import transformers as t

    cfg = t.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                       num_labels=TEXT_CLASSES, pad_token_id=0, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
    return StackedInputs(t.GPT2ForSequenceClassification(cfg), _keys(masked))


def t5_encoder(masked):
    import transformers as t

    cfg = t.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                     is_encoder_decoder=False, use_cache=False)
    return StackedInputs(T5EncoderClassifier(t.T5EncoderModel(cfg), cfg.d_model, TEXT_CLASSES), _keys(masked))


def hf_vit():
    import transformers as t

    cfg = t.ViTConfig(image_size=32, patch_size=8, num_channels=3, **dict(_TEXT, num_labels=IMAGE_CLASSES))
    return StackedInputs(t.ViTForImageClassification(cfg), ("pixel_values",))


def timm_resnet():
    from timm.models.resnet import BasicBlock, ResNet

    # zero_init_last=False: timm's zeroed last BatchNorm scales would leave the blocks' other parameters without
    # gradient at init (a degenerate kernel)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=IMAGE_CLASSES, channels=(16, 32, 64, 128), stem_width=16,
                  zero_init_last=False)


def timm_efficientnet():
    """efficientnet_b0's arch with channel multiplier 0.25 and depth multiplier 0.34 (one block a stage)."""
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.efficientnet import EfficientNet

    arch = [["ds_r1_k3_s1_e1_c16_se0.25"], ["ir_r2_k3_s2_e6_c24_se0.25"], ["ir_r2_k5_s2_e6_c40_se0.25"],
            ["ir_r3_k3_s2_e6_c80_se0.25"], ["ir_r3_k5_s1_e6_c112_se0.25"], ["ir_r4_k5_s2_e6_c192_se0.25"],
            ["ir_r1_k3_s1_e6_c320_se0.25"]]
    chs = functools.partial(round_channels, multiplier=0.25)
    return EfficientNet(decode_arch_def(arch, 0.34), num_classes=IMAGE_CLASSES, num_features=chs(1280),
                        stem_size=32, round_chs_fn=chs, act_layer=nn.SiLU)


def timm_mobilenetv3():
    """mobilenetv3_small's arch (hard_swish, hard-sigmoid squeeze-excite) at channel multiplier 0.25."""
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.layers import get_act_layer
    from timm.models.mobilenetv3 import MobileNetV3

    arch = [["ds_r1_k3_s2_e1_c16_se0.25_nre"], ["ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"],
            ["ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"], ["ir_r2_k5_s1_e3_c48_se0.25"],
            ["ir_r3_k5_s2_e6_c96_se0.25"], ["cn_r1_k1_s1_c576"]]
    se = functools.partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    return MobileNetV3(decode_arch_def(arch), num_classes=IMAGE_CLASSES, stem_size=16, fix_stem=True,
                       num_features=256, round_chs_fn=functools.partial(round_channels, multiplier=0.25),
                       act_layer=get_act_layer("hard_swish"), se_layer=se)


def timm_convnext():
    """convnext_atto's depths halved, dims (16, 32, 64, 128); layer scale gamma at 0.1 (timm's 1e-6 would make
    the blocks' terms of the kernel ~1e-12 of the rest: float32 errors would not see them)."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(num_classes=IMAGE_CLASSES, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), ls_init_value=0.1)


def timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                             num_classes=IMAGE_CLASSES)


def timm_resmlp():
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    """ResMLP (Affine norms, ls1 / ls2 layer scales at 0.1), its zero-initialised head redrawn (random_head)."""
    return random_head(MlpMixer(num_classes=IMAGE_CLASSES, img_size=32, patch_size=8, num_blocks=2, embed_dim=64,
                                mlp_ratio=2, block_layer=functools.partial(ResBlock, init_values=0.1),
                                norm_layer=Affine))


def cases():
    """name -> (model factory, input factory, n); only the libraries that are installed.

    n is 16-64 (since 2026-12-04; 4-16 before, sized for the naive provider, where a call's fixed costs, its
    checks and Python, weighed most: a probe set of a real run holds hundreds to thousands of examples, and the
    issue's own masked-model figures were at n = 384-768). ``BENCH_OUTSIDE_SCALE=s`` (default 1) multiplies
    every n by s (``0.25``: the earlier sizes).
    """
    out = {}
    if _has("transformers"):
        # n = 32 where vmap fails (masked attention; GPT-2's pooling reads the ids): the loop is the comparison
        out.update({
            "hf-bert": (lambda: bert(False), lambda n: tokens(n, masked=False, pad_id=0), 64),
            "hf-bert-mask": (lambda: bert(True), lambda n: tokens(n, masked=True, pad_id=0), 32),
            "hf-gpt2-eager": (lambda: gpt2(False, "eager"), lambda n: tokens(n, masked=False, pad_id=0), 32),
            "hf-gpt2-sdpa-mask": (lambda: gpt2(True, "sdpa"),
                                  lambda n: tokens(n, masked=True, pad_id=0, side="left"), 32),
            "hf-t5-encoder-mask": (lambda: t5_encoder(True), lambda n: tokens(n, masked=True, pad_id=0), 32),
            "hf-vit": (hf_vit, images, 64),
        })
    if _has("timm"):
        out.update({
            "timm-resnet": (timm_resnet, images, 32),
            "timm-efficientnet": (timm_efficientnet, images, 16),
            "timm-mobilenetv3": (timm_mobilenetv3, images, 16),
            "timm-convnext": (timm_convnext, images, 32),
            "timm-vit": (timm_vit, images, 64),
            "timm-resmlp": (timm_resmlp, images, 64),
        })
    scale = float(os.environ.get("BENCH_OUTSIDE_SCALE", "1"))
    if not scale > 0:
        raise ValueError(f"BENCH_OUTSIDE_SCALE must be a positive number, got {scale}")
    return {name: (make_model, make_x, max(1, round(n * scale))) for name, (make_model, make_x, n) in out.items()}
