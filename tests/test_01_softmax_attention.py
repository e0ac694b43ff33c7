import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, load, rand

sm = load("01_softmax_attention")

SOFTMAX = "softmax attention (step 01): out_i = sum_j softmax_j(q_i . k_j * scale) v_j"



def naive_softmax_attention(q, k, v, scale):
    """The formula written out element by element, independent of the code under test."""
    B, H, N, d = q.shape
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                logits = [float(q[b, h, i] @ k[b, h, j]) * scale for j in range(N)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                z = sum(e)
                out[b, h, i] = sum(e[j] / z * v[b, h, j] for j in range(N))
    return out


def test_explicit_matches_naive_formula_float64():
    q, k, v = rand(2, 2, 7, 5, seed=1), rand(2, 2, 7, 5, seed=2), rand(2, 2, 7, 5, seed=3)
    ref = naive_softmax_attention(q, k, v, 5 ** -0.5)
    assert_close(sm.softmax_attention(q, k, v), ref, SOFTMAX + ", scale = d**-0.5", atol=1e-12)
    # a custom scale is honoured (the default d**-0.5 would give a different answer)
    ref2 = naive_softmax_attention(q, k, v, 0.3)
    assert_close(sm.softmax_attention(q, k, v, scale=0.3), ref2, SOFTMAX + ", scale = 0.3", atol=1e-12)
    assert not torch.allclose(ref, ref2)


def test_weights_are_a_distribution():
    q, k = rand(2, 3, 11, 8, seed=4), rand(2, 3, 11, 8, seed=5)
    w = sm.softmax_attention_weights(q, k)
    assert w.shape == (2, 3, 11, 11)
    assert (w > 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, 11, dtype=torch.float64), atol=1e-12)


def test_sdpa_equals_explicit():
    q, k, v = rand(2, 3, 50, 16, seed=6), rand(2, 3, 50, 16, seed=7), rand(2, 3, 50, 16, seed=8)
    assert_close(F.scaled_dot_product_attention(q, k, v), sm.softmax_attention(q, k, v),
                 "torch's SDPA vs the explicit " + SOFTMAX, atol=1e-12)


def test_gradcheck():
    q, k, v = (rand(1, 2, 5, 3, seed=s).requires_grad_() for s in (9, 10, 11))
    assert torch.autograd.gradcheck(sm.softmax_attention, (q, k, v))


def test_module_computes_the_formula():
    torch.manual_seed(0)
    m = sm.SoftmaxAttention(48, num_heads=4).double().eval()
    assert {n for n, _ in m.named_parameters()} == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    x = rand(2, 10, 48, seed=12)
    y = m(x)
    assert y.shape == x.shape
    # build q, k, v by hand from qkv's weight: channels [q | k | v], each (heads, head_dim)
    qkv = x @ m.qkv.weight.T + m.qkv.bias                      # (B, N, 144)
    q, k, v = (t.reshape(2, 10, 4, 12).transpose(1, 2) for t in qkv.split(48, dim=-1))
    ref = sm.softmax_attention(q, k, v).transpose(1, 2).reshape(2, 10, 48) @ m.proj.weight.T + m.proj.bias
    assert_close(y, ref, "SoftmaxAttention: proj(merge_heads(" + SOFTMAX + ")), q, k, v from qkv(x)",
                 atol=1e-12)


def test_module_without_qkv_bias():
    m = sm.SoftmaxAttention(12, num_heads=3, qkv_bias=False)
    assert m.qkv.bias is None


@pytest.mark.parametrize("dim,heads", [(10, 3), (192, 5), (8, 0)])
def test_bad_heads(dim, heads):
    with pytest.raises(ValueError, match=f"dim={dim}.*num_heads={heads}"):
        sm.SoftmaxAttention(dim, num_heads=heads)


def test_bad_shapes():
    q = rand(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"q must be a \(B, H, N, d\) tensor"):
        sm.softmax_attention(q[0], q, q)
    with pytest.raises(ValueError, match="must share B, H and d"):
        sm.softmax_attention(q, rand(2, 3, 5, 6), rand(2, 3, 5, 6))
    with pytest.raises(ValueError, match="must have the B, H, N of k"):
        sm.softmax_attention(q, q, rand(2, 3, 6, 4))
    with pytest.raises(ValueError, match=r"expected x of shape \(B, N, 12\)"):
        sm.SoftmaxAttention(12, num_heads=3)(torch.randn(2, 5, 10))


IMPORT_STATE = r"""
import ctypes, importlib, sys
import torch
sys.path.insert(0, sys.argv[1])

def state():
    return (torch.get_num_threads(), torch.get_num_interop_threads(), torch.get_default_dtype(),
            torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
            torch.random.get_rng_state().clone())

def mmapped_after_reuse():
    # glibc raises its mmap threshold when a mmapped block is freed, so a second 4 MiB malloc
    # comes from the heap; a fixed threshold (mallopt M_MMAP_THRESHOLD) would mmap it again.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    class Info(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in "arena ordblks smblks hblks hblkhd usmblks "
                    "fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = Info
    libc.free(libc.malloc(4 << 20))
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(4 << 20)
    grew = libc.mallinfo2().hblkhd - before
    libc.free(p)
    return grew >= 4 << 20

before = state()
for name in sys.argv[2:]:
    importlib.import_module(name)
after = state()
assert all(a == b if not torch.is_tensor(a) else torch.equal(a, b) for a, b in zip(before, after)), \
    "importing the steps changed torch's process-wide state"
try:
    assert not mmapped_after_reuse(), "importing the steps fixed glibc's mmap threshold"
except AttributeError:  # not glibc >= 2.33: no mallinfo2
    pass
print("ok")
"""


def test_docstring_memory_figures():
    # DeiT-T (patch 16, a class token, 3 heads, 12 layers), float32 weights: what fits and what not
    assert 1 + (224 // 16) ** 2 == 197 and 1 + (1792 // 16) ** 2 == 12545
    one_layer = 3 * 12545 ** 2 * 4 / 1e9
    assert f"3 heads x 12545^2 x 4 B = {one_layer:.1f} GB" in sm.__doc__
    assert f"all 12 layers' for backward: {12 * one_layer:.0f} GB per image" in sm.__doc__


def test_importing_the_steps_changes_no_process_wide_state():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", IMPORT_STATE, root, "01_softmax_attention",
                        "05_rank_augmentation"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# the demo: what it prints is what it computed, and the claims hold


def test_demo_claims_and_printout(capsys):
    from conftest import run_demo
    r, out = run_demo(sm, ["--sizes", "16", "32", "--min-time", "0.01"], capsys)
    sdpa = r["sdpa_vs_explicit"]
    assert sdpa["torch.float32"] < 1e-5 and sdpa["torch.float64"] < 1e-12, \
        f"SDPA must compute {SOFTMAX}: {sdpa}"
    assert r["module_vs_explicit"] < 1e-12
    assert r["weights_shape"] == (2, 3, 197, 197)
    assert r["row_sum_error"] < 1e-12 and r["all_positive"]
    for dtype, diff in sdpa.items():
        assert f"{dtype:14s} max |SDPA - explicit| = {diff:.2e}" in out
    assert f"module vs explicit, float64: {r['module_vs_explicit']:.2e}" in out
    assert f"(max error {r['row_sum_error']:.1e}), all positive: True" in out
    # the time table: one row per N asked for, with the N x N weights' size (3 heads, float32)
    # and the times it returned (timed by torch.utils.benchmark; never asserted as a speed)
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("16", "32")]
    assert [row[0] for row in rows] == ["16", "32"] and list(r["times_ms"]) == [16, 32]
    for row, n in zip(rows, (16, 32)):
        explicit, sdpa = r["times_ms"][n]
        assert row[1:5] == [f"{3 * n * n * 4 / 2**20:.1f}", "|", f"{explicit:.1f}", f"{sdpa:.1f}"]
        assert explicit > 0 and sdpa > 0
    (e16, s16), (e32, s32) = r["times_ms"][16], r["times_ms"][32]
    assert rows[0][5:] == ["|"] and rows[1][5:] == ["|", f"x{e32 / e16:.1f}", "/", f"x{s32 / s16:.1f}"]


# ----------------------------------------------------------------------------------------------
# mistakes the tests above let through (tools/mutants.py): each test names the one it catches


def test_v_is_checked_like_q_and_k():
    # a check that forgets v lets a (H, N, d) v through to a broadcasting matmul
    q = rand(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"v must be a \(B, H, N, d\) tensor, got shape \(3, 5, 4\)"):
        sm.softmax_attention(q, q, q[0])


def test_one_head_is_allowed_and_the_default_is_timms():
    m = sm.SoftmaxAttention(12, num_heads=1)          # num_heads >= 1, not > 1
    assert (m.num_heads, m.head_dim) == (1, 12)
    assert sm.SoftmaxAttention(64).num_heads == 8      # timm's Attention: num_heads=8


def test_demo_reports_the_largest_error(monkeypatch):
    """exactness() reports max |difference| and the largest row-sum error: one entry off by 1e-3
    must show (a .min() or a mean hides it), and a weight of 0 is not positive (w > 0, not >= 0)."""
    def one_entry_off(fn, value, index=5):
        def off(*args, **kwargs):
            out = fn(*args, **kwargs).clone()
            out.view(-1)[index] = value(out.view(-1)[index])
            return out
        return off

    monkeypatch.setattr(sm, "softmax_attention", one_entry_off(sm.softmax_attention, lambda x: x + 1e-3))
    r = sm.exactness(n=20)
    for dtype, diff in r["sdpa_vs_explicit"].items():
        assert abs(diff - 1e-3) < 1e-5, f"{dtype}: the demo must report the largest |SDPA - explicit|"
    assert r["module_vs_explicit"] > 1e-5, "the demo must report the largest |module - explicit|"
    monkeypatch.undo()
    monkeypatch.setattr(sm, "softmax_attention_weights",
                        one_entry_off(sm.softmax_attention_weights, lambda x: 0 * x))
    r = sm.exactness(n=20)
    assert r["row_sum_error"] > 1e-3 and r["all_positive"] is False
