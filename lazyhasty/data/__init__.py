"""Datasets and example-difficulty groups (yin-yang, digits, Fashion-MNIST, CIFAR-10, CelebA, Waterbirds;
label noise, C-scores, spurious features). See [Dataset][lazyhasty.data.Dataset].
"""
from ._dataset import Dataset, TensorLoader  # noqa: F401
from .difficulty import (  # noqa: F401
    CScores, balanced_groups, balanced_subsample, difficulty_groups, estimate_cscores, load_cscores,
    with_label_noise, with_spurious_feature,
)
from .real import celeba, cifar10, digits, fashion_mnist, read_idx, waterbirds  # noqa: F401
from .toy import yinyang, yinyang_grid, yinyang_kriener, yinyang_labels  # noqa: F401
