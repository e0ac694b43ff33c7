"""Step 02 - linear attention: a kernel feature map and the associativity trick, O(N d^2).

Softmax attention scores a query against a key with exp(q . k / sqrt(d)). Linear attention
(Katharopoulos et al., 2020) replaces that score with a dot product of feature maps,
sim(q, k) = phi(q) . phi(k), and normalises it the same way:

    w_ij  = phi(q_i) . phi(k_j) / sum_t phi(q_i) . phi(k_t)
    out_i = sum_j w_ij v_j
          = phi(q_i)^T (sum_j phi(k_j) v_j^T)  /  phi(q_i) . (sum_t phi(k_t))

In matrix form, out = (phi(Q) phi(K)^T) V / (phi(Q) phi(K)^T 1). Matrix products associate, so
(phi(Q) phi(K)^T) V = phi(Q) (phi(K)^T V): computing the right-hand bracket first costs N d^2
instead of N^2 d and forms no N x N matrix. Memory is O(N d): phi(Q), phi(K) and the numerator
are N x d, the "KV buffer" phi(K)^T V only d x d. Time and memory become linear in N.

The kernels phi: those of InLine (Han et al., 2024), whose kernel ablations are its Table 2
(linear attention vs InLine per kernel, Swin-T) and Table 9 (kernels of InLine-Swin-T), and RALA's:
  identity   phi(x) = x            (not positive: the denominator can vanish; InLine fixes that)
  relu       phi(x) = max(x, 0)
  leaky_relu phi(x) = max(x, 0.01 x)
  exp        phi(x) = exp(0.2 x)   (the official InLine code's exp_kernel, t = 0.2)
  elu        phi(x) = ELU(x) + 1   (positive; RALA's kernel (step 05), not one of InLine's)

This file gives feature_map, linear_attention (the O(N d^2) form), linear_attention_weights
(the N x N form, for analysis only) and LinearAttention, the module. Run it to see the two
orders of multiplication agree and how its time compares with softmax attention as N grows.
"""
import argparse
import importlib

import torch
import torch.nn.functional as F

softmax = importlib.import_module("01_softmax_attention")

KERNELS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "exp": lambda x: torch.exp(0.2 * x),  # exp_kernel(x, t=0.2) of the official InLine code
    "elu": lambda x: F.elu(x) + 1.0,
}


def feature_map(x, kernel):
    """phi(x), elementwise, for a kernel name in KERNELS."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")
    return KERNELS[kernel](x)


def kv_buffer(k, v):
    """The KV buffer sum_j k_j v_j^T of feature-mapped keys: (B, H, N, d) -> (B, H, d, d)."""
    return k.transpose(-2, -1) @ v


def in_float32(core, *tensors, **kwargs):
    """core(*tensors, ...) computed in float32 (autocast off) when the tensors are bf16 / fp16, the
    result returned in the first one's dtype; float32, float64 and None pass through as they are.

    Linear attention sums N terms into its d x d buffer and its normaliser. In fp16 those sums
    overflow (max 65504) at a few thousand tokens of moderate size and the output becomes NaN, the
    known failure of linear attention in half precision; in bf16 they keep only 8 bits. Under
    autocast the projections stay in bf16 / fp16 (the bulk of the time), only the core is float32.
    """
    dtype = tensors[0].dtype
    with torch.autocast(tensors[0].device.type, enabled=False):  # or it casts the matmuls down
        if dtype in (torch.float16, torch.bfloat16):
            return core(*(None if t is None else t.float() for t in tensors), **kwargs).to(dtype)
        return core(*tensors, **kwargs)


def linear_attention(q, k, v, kernel="relu", eps=1e-6):
    """phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1): O(N d^2), no N x N matrix. (B,H,N,d) -> same."""
    softmax.check_qkv(q, k, v)
    q, k = feature_map(q, kernel), feature_map(k, kernel)   # (B, H, N, d)
    kv = kv_buffer(k, v)                                     # (B, H, d, d)  sum_j phi(k_j) v_j^T
    k_sum = k.sum(dim=-2, keepdim=True)                      # (B, H, 1, d)  sum_t phi(k_t)
    num = q @ kv                                             # (B, H, N, d)
    den = q @ k_sum.transpose(-2, -1)                        # (B, H, N, 1)  phi(q_i) . sum phi(k_t)
    return num / (den + eps)


def linear_attention_weights(q, k, kernel="relu", eps=1e-6):
    """The N x N weights w_ij = phi(q_i).phi(k_j) / (sum_t phi(q_i).phi(k_t) + eps) (analysis)."""
    softmax.check_qkv(q, k)
    sim = feature_map(q, kernel) @ feature_map(k, kernel).transpose(-2, -1)  # (B, H, N, N)
    return sim / (sim.sum(dim=-1, keepdim=True) + eps)


class LinearAttention(softmax.SoftmaxAttention):
    """Step 01's module with the attention core replaced by linear attention."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0,
                 kernel="relu"):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        if attn_drop:
            raise ValueError(f"attn_drop={attn_drop}: linear attention never forms the N x N "
                             f"weights, so there is nothing to drop; use attn_drop=0")
        feature_map(torch.zeros(1), kernel)  # fail now, not at the first forward, on a bad name
        self.kernel = kernel

    def attend(self, q, k, v):
        return in_float32(linear_attention, q, k, v, kernel=self.kernel)  # float32 sums, autocast

    def attention_weights(self, x):
        """(B, N, C) -> (B, H, N, N): the weights attend() applies to the values."""
        q, k, _ = self.split_heads(x)
        return linear_attention_weights(q, k, self.kernel)

    def kv_buffer(self, x):
        """(B, N, C) -> (B, H, d, d): phi(K)^T V, all the core keeps of the keys and values."""
        _, k, v = self.split_heads(x)
        return kv_buffer(feature_map(k, self.kernel), v)


def associativity(n=197, d=32, seed=0):
    """The numbers of the demo's part 1: {kernel: max |fast - N x N form|} in float64 (B=2,
    6 heads), and the multiply-adds per head of the two orders."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, 2, 6, n, d, generator=g, dtype=torch.float64)  # (B, H, N, d) each
    diffs = {}
    for kernel in KERNELS:
        # identity: shift q, k so the denominator stays away from 0 (step 03 shows why it must)
        qq, kk = (q + 1.0, k + 1.0) if kernel == "identity" else (q, k)
        diffs[kernel] = float((linear_attention(qq, kk, v, kernel)
                               - linear_attention_weights(qq, kk, kernel) @ v).abs().max())
    return {"fast_vs_n_by_n": diffs, "multiply_adds": {"N x N form": 2 * n * n * d,
                                                        "linear form": 2 * n * d * d}}


def main(argv=None):
    p = argparse.ArgumentParser(description="Step 02: linear attention, the associativity trick.")
    p.add_argument("--sizes", type=int, nargs="+",
                   default=[49, 98, 197, 392, 785, 1568, 3137, 12545],
                   help="sequence lengths N for the cost table")
    p.add_argument("--heads", type=int, default=6, help="heads (InLine-DeiT-T: 6 of 32 channels)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--min-time", type=float, default=0.2,
                   help="seconds of timed calls per entry (at least one call)")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    r = associativity()
    print("1) Associativity: (phi(Q) phi(K)^T) V  ==  phi(Q) (phi(K)^T V), float64, N=197, d=32")
    for kernel, diff in r["fast_vs_n_by_n"].items():
        print(f"   kernel {kernel:10s} max |fast - N x N form| = {diff:.1e}")
    print(f"   multiply-adds per head: N x N form 2*N*N*d = {r['multiply_adds']['N x N form']:,};"
          f" linear form 2*N*d*d = {r['multiply_adds']['linear form']:,}")

    H, d = args.heads, args.head_dim
    print(f"\n2) Forward + backward of the attention core, B=1, {H} heads x {d} channels, "
          f"CPU ({torch.get_num_threads()} threads),\n   median ms by torch.utils.benchmark")
    print(f"   {'N':>6} | {'softmax ms':>10} | {'linear ms':>10} | {'time ratio':>10}")
    crossover, r["times_ms"] = None, {}
    for n in args.sizes:
        q, k, v = (torch.randn(1, H, n, d, requires_grad=True) for _ in range(3))
        t_s = softmax.fwd_bwd_ms(F.scaled_dot_product_attention, q, k, v, args.min_time)
        t_l = softmax.fwd_bwd_ms(linear_attention, q, k, v, args.min_time)
        if crossover is None and t_l < t_s:
            crossover = n
        print(f"   {n:>6} | {t_s:>10.2f} | {t_l:>10.2f} | {t_s / t_l:>9.1f}x", flush=True)
        r["times_ms"][n] = (t_s, t_l)
    print("   softmax = torch's fused SDPA (step 01); linear = linear_attention, ReLU kernel;"
          "\n   time ratio = softmax time / linear time (above 1: linear attention is faster).")
    if crossover is None:
        print("   Linear attention was not faster at any measured N.")
    else:
        print(f"   Crossover: linear attention is faster from N = {crossover} on (of those run).")
    return r


if __name__ == "__main__":
    main()
