"""float32 error of the kernels against float64 with and without sliced products (``limits``
``product_slice_elements``), implementation="jacobian" and "layerwise", on ``benchmarks/outside_models.py`` at n = 6.

    python benchmarks/fp32_products.py timm-convnext timm-resnet ...   # one line per model and kernel

Each entry: relative Frobenius error of the float32 kernel against the float64 jacobian kernel of the same weights,
and the time of one call after a warm-up (1 thread; single calls: noise-level timings).
"""
import sys, warnings, torch, time
warnings.filterwarnings("ignore")
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from outside_models import cases
from lazyhasty.metrics import ntk_gram
from lazyhasty.ntk import limits
torch.set_num_threads(1)
for name in sys.argv[1:]:
    mk, mx, n = cases()[name]
    torch.manual_seed(0)
    m, x = mk().eval(), mx(6)
    m64 = mk().eval(); m64.load_state_dict(m.state_dict()); m64 = m64.double()
    x64 = x.double() if x.is_floating_point() else x
    for kernel in ("trace", "full"):
        W = ntk_gram(m64, x64, kernel=kernel, implementation="jacobian")
        row = []
        for ch in (0, 8192):
            with limits(product_slice_elements=ch):
                for impl in ("jacobian", "layerwise"):
                    K = ntk_gram(m, x, kernel=kernel, implementation=impl)
                    t0 = time.perf_counter(); K = ntk_gram(m, x, kernel=kernel, implementation=impl); t = time.perf_counter() - t0
                    row.append(f"{impl[:3]} ch={ch}: {float((K.double()-W).norm()/W.norm()):.1e} {t*1e3:.0f}ms")
        print(name, kernel, " | ".join(row), flush=True)
