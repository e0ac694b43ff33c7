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


@pytest.mark.skipif(not sm.CPU_PEAK_OK, reason="peak memory is read from /proc (Linux)")
def test_peak_memory_sees_a_large_allocation():
    def alloc():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(t.sum())
    peak = sm.peak_memory(alloc)
    assert 60 * 2**20 < peak < 200 * 2**20
    assert sm.peak_memory(lambda: None) < 16 * 2**20
