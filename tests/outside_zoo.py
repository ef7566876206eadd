"""A second zoo: tiny, randomly initialised models from Hugging Face ``transformers`` and ``timm`` (issue 30).

Every model is built from a config or a constructor (never a download) and is small enough that the float64
naive reference (:func:`lazyhasty.reference.ntk_gram`, one ``autograd.grad`` per example and output) takes a
second or two on n = 4 examples and k = 3 outputs. :func:`build` returns an :class:`OutsideModel` holding

* ``natural`` and ``inputs``: the model as its library's users call it, ``natural(**inputs)`` (a
  ``ModelOutput`` for Hugging Face models: ``output`` picks its logits), with the natural dict batch
  (``{"input_ids": [n, L], "attention_mask": [n, L]}``, ``{"pixel_values": [n, 3, H, W]}``, ``{"x": ...}``);
* ``model`` and ``x``: the same parameters behind a module taking ONE tensor and returning the ``[n, k]``
  logits. ``ntk_gram`` and ``lazyhasty.reference`` take one input tensor today; models needing several inputs
  get :class:`StackedInputs`, a stand-in until dict batches land (issue 30 item 1): ``x`` stacks the inputs
  along dim 1 (``[n, 2, L]``: ids and mask). When named inputs land, ``ntk_gram(natural, inputs, ...)`` must
  give the same kernel as ``ntk_gram(model, x, ...)``.

``transformers`` and ``timm`` are optional: :func:`build` calls ``pytest.importorskip`` (a clean skip with the
reason when the library is absent). Both import torchvision, whose CUDA-built wheel needs the
``torchvision._meta_registrations`` stub that ``tests/conftest.py`` (and ``benchmarks/outside_models.py``)
set first.

Example:
    >>> from outside_zoo import build
    >>> case = build("hf-bert-mask", n=4)
    >>> case.x.shape, case.model(case.x).shape           # ids and mask stacked: [4, 2, 6] -> [4, 3]
    (torch.Size([4, 2, 6]), torch.Size([4, 3]))
    >>> case.output(case.natural(**case.inputs)).shape   # the same logits, called as users do
    torch.Size([4, 3])
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

VOCAB = 40  # token ids 0..39; ids below FIRST_ID are the special tokens (padding etc.)
FIRST_ID = 3
SEQ = 6  # tokens an example
IMG = 8  # image side (3 channels)
CLASSES = 3  # k: outputs an example


def logits_of(out):
    """The logits of a model output: the tensor itself, or a ``ModelOutput``'s ``.logits``."""
    return out if isinstance(out, torch.Tensor) else out.logits


class StackedInputs(nn.Module):
    """One-tensor stand-in for a model taking named inputs (until ``ntk_gram`` takes dict batches).

    ``forward(x)`` with ``x [n, len(keys), ...]`` calls ``model(**{keys[i]: x[:, i]})`` and returns its logits
    ``[n, k]``; with one key, ``x`` is that input itself (no stacking dimension). The wrapped model's parameters
    are this module's (named ``model.<name>``).

    Args:
        model: the library's model (e.g. ``BertForSequenceClassification``).
        keys: the names of its inputs, in stacking order.
    """

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.keys = tuple(keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.keys) == 1:
            return logits_of(self.model(**{self.keys[0]: x}))
        return logits_of(self.model(**{key: x[:, i] for i, key in enumerate(self.keys)}))


@dataclass
class OutsideModel:
    """One zoo entry; see the module docstring.

    Attributes:
        name: the zoo key.
        library: ``"transformers"`` or ``"timm"``.
        model: one tensor in, logits ``[n, k]`` out (``natural`` itself, or :class:`StackedInputs` around it).
        x: the one input tensor ``[n, ...]`` of ``model``.
        natural: the model as its users call it: ``natural(**inputs)``.
        inputs: the natural batch, ``{name: [n, ...]}``.
        output: the natural output -> logits ``[n, k]`` (the ``output=`` of ``ntk_gram``).
        masked: whether ``inputs`` holds an attention mask with padded positions.
    """

    name: str
    library: str
    model: nn.Module
    x: torch.Tensor
    natural: nn.Module
    inputs: dict = field(default_factory=dict)
    output: Callable = logits_of
    masked: bool = False


# --- inputs -----------------------------------------------------------------------------------------------------
def token_batch(n: int, seq: int = SEQ, *, masked: bool, pad_id: int, side: str = "right", seed: int = 1) -> dict:
    """``{"input_ids": [n, seq]}`` (+ ``"attention_mask"`` when masked) with ids in ``[FIRST_ID, VOCAB)``.

    Masked: example i has ``i % 3`` padded positions (examples 1, 2 padded by 1 and 2) at the end
    (``side="right"``, encoders) or the start (``"left"``, decoder-only models, which read the last token:
    right padding would sit after it, out of its causal view); the padded positions hold ``pad_id`` as a
    tokenizer writes them and the mask is 0 there (int64, as tokenizers return it).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_ID, VOCAB, (n, seq), generator=g)
    if not masked:
        return {"input_ids": ids}
    mask = torch.ones(n, seq, dtype=torch.long)
    for i in range(n):
        pad = i % 3
        if pad:
            where = slice(seq - pad, seq) if side == "right" else slice(0, pad)
            mask[i, where] = 0
            ids[i, where] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def image_batch(n: int, side: int = IMG, seed: int = 1) -> torch.Tensor:
    """``[n, 3, side, side]`` standard normal images."""
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _transformers():
    return pytest.importorskip("transformers", reason="Hugging Face transformers is not installed (pip install "
                                                      "transformers)")


def _timm():
    return pytest.importorskip("timm", reason="timm is not installed (pip install --no-deps timm torchvision==0.28.0, "
                                              "as in the README's test command)")


def _text_case(name, natural, n, masked, pad_id, dtype, side="right"):
    inputs = token_batch(n, masked=masked, pad_id=pad_id, side=side)
    keys = tuple(inputs)
    x = inputs["input_ids"] if len(keys) == 1 else torch.stack([inputs[k] for k in keys], 1)
    natural = natural.to(dtype).eval()
    return OutsideModel(name, "transformers", StackedInputs(natural, keys), x, natural, inputs, logits_of, masked)


# --- Hugging Face transformers ----------------------------------------------------------------------------------
_TEXT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=16, num_labels=CLASSES, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)


def hf_bert(n, masked, dtype):
    """BertForSequenceClassification: word, position (a ``[1, L]`` buffer) and token-type embeddings, SDPA
    attention, pooler, classifier."""
    t = _transformers()
    cfg = t.BertConfig(vocab_size=VOCAB, **_TEXT)
    return _text_case("hf-bert" + "-mask" * masked, t.BertForSequenceClassification(cfg), n, masked,
                      cfg.pad_token_id, dtype)


def hf_roberta(n, masked, dtype):
    """RobertaForSequenceClassification: position ids computed from the ids (padding_idx), classification head
    on the first token."""
    t = _transformers()
    cfg = t.RobertaConfig(vocab_size=VOCAB, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          **dict(_TEXT, max_position_embeddings=SEQ + 4))
    return _text_case("hf-roberta" + "-mask" * masked, t.RobertaForSequenceClassification(cfg), n, masked,
                      cfg.pad_token_id, dtype)


def hf_gpt2(n, masked, dtype, attn="eager"):
    """GPT2ForSequenceClassification: ``Conv1D`` layers (``addmm`` with the weight ``[in, out]``), causal
    attention (``eager`` or ``sdpa``), pooled at each example's last non-padding token; padded on the left."""
    t = _transformers()
    cfg = t.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=32,
                       num_labels=CLASSES, pad_token_id=0, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
    return _text_case(f"hf-gpt2-{attn}" + "-mask" * masked, t.GPT2ForSequenceClassification(cfg), n, masked,
                      cfg.pad_token_id, dtype, side="left")


class T5EncoderClassifier(nn.Module):
    """A T5 encoder (RMS norms, relative position bias, no biases), mean-pooled over the unpadded tokens, and a
    linear head: ``forward(input_ids, attention_mask=None) -> [n, k]``. (transformers has no encoder-only T5
    sequence classifier; this is how one is usually assembled.)"""

    def __init__(self, encoder: nn.Module, d_model: int, classes: int = CLASSES):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(d_model, classes)

    def forward(self, input_ids, attention_mask=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [n, L, d]
        if attention_mask is None:
            return self.head(h.mean(1))
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.head((h * m).sum(1) / m.sum(1))


def hf_t5_encoder(n, masked, dtype):
    """:class:`T5EncoderClassifier` around ``T5EncoderModel`` (d_model 16, 2 layers, 2 heads)."""
    t = _transformers()
    cfg = t.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                     is_encoder_decoder=False, use_cache=False)
    torch_model = T5EncoderClassifier(t.T5EncoderModel(cfg), cfg.d_model)
    return _text_case("hf-t5-encoder" + "-mask" * masked, torch_model, n, masked, cfg.pad_token_id, dtype)


def hf_vit(n, masked, dtype):
    """ViTForImageClassification: patch convolution, class token, position embeddings, separate q/k/v."""
    t = _transformers()
    cfg = t.ViTConfig(image_size=IMG, patch_size=4, num_channels=3, **_TEXT)
    natural = t.ViTForImageClassification(cfg).to(dtype).eval()
    x = image_batch(n).to(dtype)
    return OutsideModel("hf-vit", "transformers", StackedInputs(natural, ("pixel_values",)), x, natural,
                        {"pixel_values": x}, logits_of)


# --- timm -------------------------------------------------------------------------------------------------------
def _timm_case(name, natural, n, dtype, side=IMG):
    natural = natural.to(dtype).eval()
    x = image_batch(n, side).to(dtype)
    return OutsideModel(name, "timm", natural, x, natural, {"x": x}, logits_of)


def timm_resnet(n, masked, dtype):
    """timm ResNet, BasicBlock, one block a stage, widths 4-8 (BatchNorm, ReLU, max-pool stem)."""
    _timm()
    from timm.models.resnet import BasicBlock, ResNet

    # zero_init_last=False: timm zeroes each block's last BatchNorm scale, which would leave the blocks' other
    # parameters without gradient (their kernel terms 0: nothing to test)
    m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES, channels=(4, 4, 8, 8), stem_width=4,
               zero_init_last=False)
    return _timm_case("timm-resnet", m, n, dtype, side=16)


def _effnet_blocks(arch):
    from timm.models._efficientnet_builder import decode_arch_def

    return decode_arch_def(arch)


def timm_efficientnet(n, masked, dtype):
    """timm EfficientNet with an efficientnet_b0-style arch at tiny widths: ``BatchNormAct2d`` (BatchNorm and
    SiLU in one module), depthwise-separable and inverted-residual blocks with squeeze-excite."""
    _timm()
    from timm.models.efficientnet import EfficientNet

    arch = [["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r1_k3_s2_e2_c8_se0.25"], ["ir_r1_k5_s2_e2_c16_se0.25"]]
    m = EfficientNet(_effnet_blocks(arch), num_classes=CLASSES, num_features=32, stem_size=8, act_layer=nn.SiLU)
    return _timm_case("timm-efficientnet", m, n, dtype)


def timm_mobilenetv3(n, masked, dtype):
    """timm MobileNetV3 with a mobilenetv3_small-style arch at tiny widths: ``hard_swish``, squeeze-excite with
    a hard-sigmoid gate, ``BatchNormAct2d``, a conv head without norm."""
    _timm()
    from timm.layers import get_act_layer
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import round_channels
    from timm.models.mobilenetv3 import MobileNetV3

    arch = [["ds_r1_k3_s2_e1_c8_se0.25_nre"], ["ir_r1_k3_s2_e3_c8_nre"], ["ir_r1_k5_s1_e3_c16_se0.25"],
            ["cn_r1_k1_s1_c32"]]
    se = functools.partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    m = MobileNetV3(_effnet_blocks(arch), num_classes=CLASSES, stem_size=8, num_features=32,
                    act_layer=get_act_layer("hard_swish"), se_layer=se)
    return _timm_case("timm-mobilenetv3", m, n, dtype)


def timm_convnext(n, masked, dtype):
    """timm ConvNeXt, four stages of one block (dims 4-8, 3x3 depthwise kernels): ``LayerNorm2d`` in the stem and downsampling,
    channels-last ``LayerNorm`` in the blocks, layer scale ``gamma`` (initialised at 0.5, not 1e-6, so the
    blocks' parameters count in the kernel)."""
    _timm()
    from timm.models.convnext import ConvNeXt

    m = ConvNeXt(num_classes=CLASSES, depths=(1, 1, 1, 1), dims=(4, 8, 8, 8), kernel_sizes=3, ls_init_value=0.5,
                 patch_size=4)
    return _timm_case("timm-convnext", m, n, dtype, side=32)


def timm_vit(n, masked, dtype):
    """timm VisionTransformer: fused ``qkv`` Linear, class token, learned position embedding, one block."""
    _timm()
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=IMG, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                          num_classes=CLASSES)
    return _timm_case("timm-vit", m, n, dtype)


def random_head(model: nn.Module) -> nn.Module:
    """``model.head`` (a Linear) redrawn from N(0, 1 / d_in): timm's MLP-Mixer / ResMLP zero-initialise their
    classifier, which leaves every other parameter without gradient (their kernel terms 0) and the logits 0."""
    with torch.no_grad():
        model.head.weight.normal_(0.0, model.head.in_features ** -0.5)
        model.head.bias.normal_(0.0, 0.1)
    return model


def timm_mixer(n, masked, dtype):
    """timm MLP-Mixer: token- and channel-mixing MLPs with LayerNorm."""
    _timm()
    from timm.models.mlp_mixer import MlpMixer

    m = MlpMixer(num_classes=CLASSES, img_size=IMG, patch_size=4, num_blocks=1, embed_dim=16, mlp_ratio=(0.5, 2.0))
    return _timm_case("timm-mixer", random_head(m), n, dtype)


def timm_resmlp(n, masked, dtype):
    """timm ResMLP (an ``MlpMixer`` of ``ResBlock`` s): ``Affine`` norms (``alpha * x + beta``) and the layer
    scales ``ls1`` / ``ls2``."""
    _timm()
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    m = MlpMixer(num_classes=CLASSES, img_size=IMG, patch_size=4, num_blocks=1, embed_dim=16, mlp_ratio=2,
                 block_layer=functools.partial(ResBlock, init_values=0.5), norm_layer=Affine)
    return _timm_case("timm-resmlp", random_head(m), n, dtype)


# name -> builder(n, masked, dtype); the masked variants of the text models are their own entries
BUILDERS: dict[str, Callable] = {
    "hf-bert": functools.partial(hf_bert, masked=False),
    "hf-bert-mask": functools.partial(hf_bert, masked=True),
    "hf-roberta": functools.partial(hf_roberta, masked=False),
    "hf-roberta-mask": functools.partial(hf_roberta, masked=True),
    "hf-gpt2-eager": functools.partial(hf_gpt2, masked=False, attn="eager"),
    "hf-gpt2-eager-mask": functools.partial(hf_gpt2, masked=True, attn="eager"),
    "hf-gpt2-sdpa": functools.partial(hf_gpt2, masked=False, attn="sdpa"),
    "hf-gpt2-sdpa-mask": functools.partial(hf_gpt2, masked=True, attn="sdpa"),
    "hf-t5-encoder": functools.partial(hf_t5_encoder, masked=False),
    "hf-t5-encoder-mask": functools.partial(hf_t5_encoder, masked=True),
    "hf-vit": functools.partial(hf_vit, masked=False),
    "timm-resnet": functools.partial(timm_resnet, masked=False),
    "timm-efficientnet": functools.partial(timm_efficientnet, masked=False),
    "timm-mobilenetv3": functools.partial(timm_mobilenetv3, masked=False),
    "timm-convnext": functools.partial(timm_convnext, masked=False),
    "timm-vit": functools.partial(timm_vit, masked=False),
    "timm-mixer": functools.partial(timm_mixer, masked=False),
    "timm-resmlp": functools.partial(timm_resmlp, masked=False),
}
NAMES = list(BUILDERS)


def build(name: str, n: int = 4, dtype: torch.dtype = torch.float64, seed: int = 0) -> OutsideModel:
    """The zoo entry ``name`` with ``n`` examples, parameters (and float inputs) in ``dtype``, seeded init.

    Args:
        name: a key of :data:`BUILDERS`.
        n: examples in the batch.
        dtype: parameter dtype (float64 for the exactness tests).
        seed: ``torch.manual_seed`` before the model is constructed (the random init).

    Returns:
        An :class:`OutsideModel`; ``model(x)`` and ``output(natural(**inputs))`` are the same ``[n, 3]`` logits.

    Raises:
        KeyError: an unknown name. ``pytest.skip`` (an exception) when its library is not installed.
    """
    if name not in BUILDERS:
        raise KeyError(f"unknown outside-zoo model {name!r}; known: {', '.join(NAMES)}")
    torch.manual_seed(seed)
    return BUILDERS[name](n, dtype=dtype)
