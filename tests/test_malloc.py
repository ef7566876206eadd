"""lazyhasty._malloc: freed CPU buffers stay mapped while lazyhasty computes, and only then."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lazyhasty import _malloc
from lazyhasty.ntk import ntk_gram, release_cpu_memory

pytestmark = pytest.mark.skipif(not _malloc.status().startswith("on"), reason=f"heap tuning {_malloc.status()}")

BIG = 96 << 20  # above glibc's largest adaptive mmap threshold (32 MiB), below RETAIN_BYTES


def _mmapped_while_alive(nbytes: int) -> int:
    before = _malloc.heap_state()["mmapped"]
    t = torch.empty(nbytes // 4)
    grown = _malloc.heap_state()["mmapped"] - before
    del t
    return grown


def test_large_buffers_come_from_the_heap_only_inside():
    assert _mmapped_while_alive(BIG) >= BIG  # glibc as usual: a fresh mapping
    with _malloc.retained_heap():
        with _malloc.retained_heap():  # re-entrant: the inner exit must not restore
            pass
        assert _mmapped_while_alive(BIG) == 0
        assert _malloc.heap_state()["free"] >= BIG  # freed, and kept in the heap for reuse
    release_cpu_memory()  # what was kept goes back: a new large buffer is a fresh mapping again
    assert _mmapped_while_alive(BIG) >= BIG  # thresholds back at glibc's ceiling


class _Recording(nn.Module):
    """Records, in its forward, whether a large buffer would be a fresh mapping."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.grown = []

    def forward(self, x):
        self.grown.append(_mmapped_while_alive(BIG))
        return self.lin(x)


def test_ntk_gram_runs_inside_the_retained_heap():
    m = _Recording()
    K = ntk_gram(m, torch.randn(4, 3), kernel="trace", implementation="naive")
    assert K.shape == (4, 4) and m.grown and all(g == 0 for g in m.grown)
    m.grown.clear()
    release_cpu_memory()
    m(torch.randn(2, 3))  # the same forward outside lazyhasty
    assert m.grown[0] >= BIG


@pytest.mark.parametrize("env, why", [({"LAZYHASTY_MALLOC": "0"}, "LAZYHASTY_MALLOC=0"),
                                      ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "MALLOC_TRIM_THRESHOLD_")])
def test_left_alone_when_asked_or_when_the_user_tuned_malloc(env, why):
    code = "from lazyhasty import _malloc; print(_malloc.status())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("off") and why in out
