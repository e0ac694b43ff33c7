"""Step 01 - softmax attention, the O(N^2) baseline.

Every token i of a sequence of N tokens asks a query q_i and every token j offers a key k_j and a
value v_j (all d-dimensional, one set per head). Softmax attention mixes the values with weights

    w_ij = exp(q_i . k_j * s) / sum_t exp(q_i . k_t * s),       s = d**-0.5
    out_i = sum_j w_ij v_j                                           (Vaswani et al., eq. 1)

In matrix form, out = softmax(Q K^T * s) V. The N x N matrix softmax(Q K^T s) is the problem:
time and memory grow as N^2, so doubling the image side (4x the tokens) costs 16x. DeiT-T has
N = 197 tokens at 224 px, 12545 at 1792 px: one layer's weights (3 heads x 12545^2 x 4 B = 1.9 GB)
fit a laptop, but the explicit form keeps all 12 layers' for backward: 23 GB per image x batch.

This file gives
  softmax_attention_weights(q, k)   the N x N weights, explicitly (the teaching path)
  softmax_attention(q, k, v)        the output from those weights
  SoftmaxAttention(dim, num_heads)  the module of timm's VisionTransformer (`qkv`, `proj`), which
                                    calls torch's fused F.scaled_dot_product_attention (SDPA),
and the input checks the later steps import.

Run `python 01_softmax_attention.py` to see SDPA equal the explicit formula, and how the time of
both grows with N, beside the size of the N x N matrix the explicit form stores (on CPU, torch's
SDPA is a fused "flash" kernel that never stores it; its time is still quadratic).
`python tools/bench.py modules` measures the modules' time and peak memory side by side.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# input checks, shared by every step


def check_qkv(q, k, v=None):
    """Raise ValueError unless q, k (and v) are (B, H, N, d) tensors that fit together."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, H, N, d) tensor, got shape {shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, H and d")
    if v is not None and (v.shape[:3] != k.shape[:3]):
        raise ValueError(f"v {tuple(v.shape)} must have the B, H, N of k {tuple(k.shape)}")


def check_heads(dim, num_heads):
    """Raise ValueError unless `dim` splits evenly into `num_heads` heads."""
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}: "
                         f"each head needs dim / num_heads channels")


# ----------------------------------------------------------------------------------------------
# the explicit formula


def softmax_attention_weights(q, k, scale=None):
    """w = softmax(q k^T * scale) over keys. q, k: (B, H, N, d) -> (B, H, N, N)."""
    check_qkv(q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-2, -1) * scale  # (B, H, N, N)  q_i . k_j * s
    return logits.softmax(dim=-1)             # (B, H, N, N)  each row sums to 1


def softmax_attention(q, k, v, scale=None):
    """out_i = sum_j w_ij v_j with the explicit N x N weights. (B, H, N, d) -> (B, H, N, d)."""
    check_qkv(q, k, v)
    return softmax_attention_weights(q, k, scale) @ v  # (B, H, N, N) @ (B, H, N, d)


# ----------------------------------------------------------------------------------------------
# the module (timm's `Attention`, with the fused kernel)


class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention on (B, N, C) tokens, parameter names as timm (`qkv`, `proj`).

    Later steps subclass it and replace only `attend(q, k, v)`: the projections stay the same.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        check_heads(dim, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop  # dropout on the weights, applied inside SDPA
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x):
        """(B, N, C) -> q, k, v, each (B, H, N, d); channel c of each is head c // d."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, d)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # 3 x (B, H, N, d)

    def attend(self, q, k, v):
        """The attention core: (B, H, N, d) -> (B, H, N, d)."""
        p = self.attn_drop if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)

    def attention_weights(self, x):
        """(B, N, C) -> (B, H, N, N): the weights the core applies to the values (no dropout)."""
        q, k, _ = self.split_heads(x)
        return softmax_attention_weights(q, k, self.scale)

    def kv_buffer(self, x):
        """What the core keeps of keys and values to serve any query: for softmax, all of the
        (B, H, N, N) weights (the linear kinds keep a (B, H, d, d) buffer instead)."""
        return self.attention_weights(x)

    @staticmethod
    def merge_heads(out):
        """(B, H, N, d) -> (B, N, H*d): the heads side by side again."""
        B, H, N, d = out.shape
        return out.transpose(1, 2).reshape(B, N, H * d)

    def forward(self, x):
        q, k, v = self.split_heads(x)                     # (B, H, N, d) each
        out = self.merge_heads(self.attend(q, k, v))      # (B, N, C)
        return self.proj_drop(self.proj(out))             # (B, N, C)


# ----------------------------------------------------------------------------------------------
# demo


def exactness(n=197, seed=0):
    """The numbers of the demo's part 1: how far torch's SDPA and the module are from the explicit
    formula, and whether the weights are a distribution. Returns a dict of floats."""
    g = torch.Generator().manual_seed(seed)
    out = {"sdpa_vs_explicit": {}}
    for dtype in (torch.float32, torch.float64):
        q, k, v = torch.randn(3, 2, 3, n, 64, generator=g, dtype=dtype)  # (B, H, N, d) each
        diff = (F.scaled_dot_product_attention(q, k, v) - softmax_attention(q, k, v)).abs().max()
        out["sdpa_vs_explicit"][str(dtype)] = float(diff)
    torch.manual_seed(seed)  # the module's initial weights
    m = SoftmaxAttention(192, num_heads=3).double()
    x = torch.randn(2, n, 192, generator=g, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = m.split_heads(x)
        ref = m.proj(softmax_attention(q, k, v).transpose(1, 2).reshape(2, n, 192))
        w = softmax_attention_weights(q, k)                           # (B, H, N, N)
        out.update(module_vs_explicit=float((m(x) - ref).abs().max()),
                   weights_shape=tuple(w.shape), all_positive=bool((w > 0).all()),
                   row_sum_error=float((w.sum(-1) - 1).abs().max()))
    return out


def fwd_bwd_ms(fn, q, k, v, min_time=0.2):
    """Median ms of one forward + backward of fn(q, k, v) by torch.utils.benchmark's Timer: its
    blocked_autorange sizes a block of calls untimed, then times blocks for min_time seconds."""
    from torch.utils import benchmark  # here, not at the top: it also loads torch's C++ tooling
    timer = benchmark.Timer("torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))",
                            globals={"torch": torch, "fn": fn, "q": q, "k": k, "v": v},
                            num_threads=torch.get_num_threads())  # the Timer's default is 1
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description="Step 01: softmax attention and its O(N^2) cost.")
    p.add_argument("--sizes", type=int, nargs="+", default=[197, 785, 3137],
                   help="sequence lengths N for the cost table (DeiT at 224, 448, 896 px; add "
                   "12545, 1792 px, for 1.9 GB of weights: about 30 s more, 5.4 GB at the peak)")
    p.add_argument("--heads", type=int, default=3, help="heads (DeiT-T: 3 of 64 channels)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--min-time", type=float, default=0.2,
                   help="seconds of timed calls per entry (at least one call)")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    r = exactness()
    print("1) The fused kernel (SDPA) computes the explicit formula softmax(q k^T / sqrt(d)) v")
    for dtype, diff in r["sdpa_vs_explicit"].items():
        print(f"   {dtype:14s} max |SDPA - explicit| = {diff:.2e}")
    print(f"   SoftmaxAttention(192, 3) module vs explicit, float64: {r['module_vs_explicit']:.2e}")
    print(f"   weights: shape {r['weights_shape']}, rows sum to 1 (max error "
          f"{r['row_sum_error']:.1e}), all positive: {r['all_positive']}")

    H, d = args.heads, args.head_dim
    print(f"\n2) Time of the attention core, forward + backward, B=1, {H} heads x {d} channels,"
          f" CPU ({torch.get_num_threads()} threads),\n   median ms by torch.utils.benchmark")
    print(f"   {'N':>6} {'N x N weights MB':>16} | {'explicit ms':>11} {'SDPA ms':>9} |"
          f" {'time vs prev N':>14}")
    prev, r["times_ms"] = None, {}
    for n in args.sizes:
        q, k, v = (torch.randn(1, H, n, d, requires_grad=True) for _ in range(3))
        t = (fwd_bwd_ms(softmax_attention, q, k, v, args.min_time),
             fwd_bwd_ms(F.scaled_dot_product_attention, q, k, v, args.min_time))
        growth = "" if prev is None else f"x{t[0] / prev[0]:.1f} / x{t[1] / prev[1]:.1f}"
        print(f"   {n:>6} {H * n * n * 4 / 2**20:>16.1f} | {t[0]:>11.1f} {t[1]:>9.1f} |"
              f" {growth:>14}", flush=True)
        prev = r["times_ms"][n] = t
    print("   Each step multiplies N by ~4: an O(N^2) cost grows ~16x, and so do the N x N weights"
          "\n   (float32, all heads) that the explicit form keeps for its backward; SDPA computes"
          "\n   them block by block and keeps none. Peak memory of the modules: tools/bench.py.")
    return r


if __name__ == "__main__":
    main()
