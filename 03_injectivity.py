"""Step 03 - injectivity: why linear attention confuses queries, and InLine's fix (eq. 5).

Fix the keys K. An attention function maps a query q to a distribution over the N keys,
w(q) = (w_1, ..., w_N). InLine (Han et al., NeurIPS 2024, Sec. 4) asks whether that map is
*injective*: do different queries always get different distributions? If not, two tokens that
mean different things attend identically ("semantic confusion", the paper's Fig. 2).

Softmax is injective: w_j(q) = exp(q.k_j s) / Z, so log w_j - log w_1 = s q.(k_j - k_1), and for
keys that span the space this recovers q. Scaling q sharpens or flattens the distribution.

Linear attention is not: w_j(q) = phi(q).phi(k_j) / sum_t phi(q).phi(k_t) is unchanged when
phi(q) is multiplied by any c > 0. So
  - with phi = ReLU, q and c*q (c > 0) get the *same* weights, and so do any two queries that
    differ only in coordinates ReLU sets to 0;
  - with phi(x) = ReLU(A x + b), distinct non-collinear queries q and
    q' = A^{-1}(c (A q + b) - b) collide too, since phi(q') = c phi(q).

InLine attention (the paper's eq. 5) drops the division and re-centres instead:

    w_ij = s * (phi(q_i).phi(k_j) - mean_t phi(q_i).phi(k_t)) + 1/N

The rows still sum to 1 (the bracket sums to 0 over j), but w(q) is now an affine function of
phi(q), which is injective whenever the centred keys phi(k_j) - mean phi(k) span the space (for
the identity kernel, N - 1 >= d generic keys). The weights can be negative. Since
mean_t phi(q_i).phi(k_t) = phi(q_i) . mean_t phi(k_t), eq. 5 is linear attention on *centred* keys,
without the division, plus the uniform 1/N; the output is still linear in N:

    out_i = s * phi(q_i)^T (sum_j (phi(k_j) - mean_t phi(k_t)) v_j^T) + mean_j v_j

The module uses the identity kernel and s = head_dim**-0.5 / N, as the official code does (the
1/N keeps the weights of order 1/N for any N). `InjectiveLinearAttention` is InLine without the
local residual of step 04.

Run it to see the collisions, a confusion count in the spirit of the paper's Fig. 3, and that
InLine's weights sum to 1, can be negative, and that its linear-time form equals the N x N form.
"""
import argparse
import importlib

import torch

softmax = importlib.import_module("01_softmax_attention")
linear = importlib.import_module("02_linear_attention")


def inline_attention_weights(q, k, kernel="identity", scale=1.0):
    """The N x N InLine weights (eq. 5). q, k: (B, H, N, d) -> (B, H, N, N); rows sum to 1."""
    softmax.check_qkv(q, k)
    sim = linear.feature_map(q, kernel) @ linear.feature_map(k, kernel).transpose(-2, -1)
    n = k.shape[-2]
    return scale * (sim - sim.mean(dim=-1, keepdim=True)) + 1.0 / n  # (B, H, N, N)


def centred_kv_buffer(k, v):
    """(phi(K) - mean phi(K))^T V for feature-mapped keys: (B, H, N, d) -> (B, H, d, d)."""
    return linear.kv_buffer(k - k.mean(dim=-2, keepdim=True), v)  # sum_j (k_j - mean k) v_j^T


def inline_attention(q, k, v, kernel="identity", scale=1.0):
    """InLine attention in O(N d^2): out = s phi(Q) (phi(K) - mean phi(K))^T V + mean V."""
    softmax.check_qkv(q, k, v)
    q, k = linear.feature_map(q, kernel), linear.feature_map(k, kernel)  # (B, H, N, d)
    # mean_t phi(q_i).phi(k_t) = phi(q_i) . mean_t phi(k_t), so eq. 5 is
    #   w_ij = s phi(q_i) . (phi(k_j) - mean_t phi(k_t)) + 1/N:  linear attention on centred keys,
    # with no division, plus the uniform 1/N. Centre the keys, then associate as in step 02:
    kv = centred_kv_buffer(k, v)                          # (B, H, d, d)  sum_j (phi(k_j) - mean phi(k)) v_j^T
    return q @ (scale * kv) + v.mean(dim=-2, keepdim=True)  # (B, H, N, d)  + (1/N) sum_j v_j


class InjectiveLinearAttention(linear.LinearAttention):
    """InLine attention without the local residual: identity kernel, s = head_dim**-0.5 / N."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0,
                 kernel="identity"):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, kernel=kernel)

    def attend(self, q, k, v):
        # the d x d buffer and the means over N in float32, also under bf16 / fp16 (step 02)
        s = self.scale / q.shape[-2]
        return linear.in_float32(inline_attention, q, k, v, kernel=self.kernel, scale=s)

    def attention_weights(self, x):
        """(B, N, C) -> (B, H, N, N): eq. 5's weights, those attend() applies to the values."""
        q, k, _ = self.split_heads(x)
        return inline_attention_weights(q, k, self.kernel, scale=self.scale / q.shape[-2])

    def kv_buffer(self, x):
        """(B, N, C) -> (B, H, d, d): the centred buffer (phi(K) - mean phi(K))^T V."""
        _, k, v = self.split_heads(x)
        return centred_kv_buffer(linear.feature_map(k, self.kernel), v)


# ----------------------------------------------------------------------------------------------
# demo


def weights_of(name, q, k):
    """Attention weights (M, N) of M queries q (M, d) over N keys k (N, d), one head."""
    d, n = q.shape[-1], k.shape[-2]
    q, k = q[None, None], k[None, None]  # (1, 1, M, d), (1, 1, N, d)
    if name == "softmax":
        w = softmax.softmax_attention_weights(q, k)
    else:  # "linear-<kernel>" or "inline-<kernel>"
        family, kernel = name.split("-", 1)
        if family == "linear":
            w = linear.linear_attention_weights(q, k, kernel=kernel, eps=0.0)
        elif family == "inline":  # with the module's scale
            w = inline_attention_weights(q, k, kernel=kernel, scale=d ** -0.5 / n)
        else:
            raise ValueError(f"unknown attention {name!r}: expected softmax, linear-<kernel> "
                             f"or inline-<kernel>")
    return w[0, 0]


def confusion_pairs(w, tol):
    """Number of pairs of queries whose weight rows differ by less than tol in L1 distance."""
    dist = torch.cdist(w, w, p=1)  # (M, M)
    return int(((dist < tol).sum() - w.shape[0]) // 2)  # off-diagonal pairs


def main(argv=None):
    p = argparse.ArgumentParser(description="Step 03: injectivity of softmax, linear and "
                                            "InLine attention.")
    p.add_argument("--tokens", type=int, default=197, help="number of keys N")
    p.add_argument("--dim", type=int, default=32, help="head dimension d")
    p.add_argument("--directions", type=int, default=64, help="query directions (confusion count)")
    p.add_argument("--tol", type=float, default=1e-3, help="L1 distance below which two "
                   "attention distributions count as the same (the rows sum to 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    n, d = args.tokens, args.dim
    dt = torch.float64
    k = torch.randn(n, d, dtype=dt)  # one head's keys
    names = ["softmax", "linear-relu", "linear-identity", "inline-identity", "inline-relu"]

    print(f"N = {n} random keys, d = {d}; max |w(q) - w(q')| over the N weights of each pair:")
    q = torch.randn(1, d, dtype=dt)
    q_neg = q.clone()
    q_neg[q_neg < 0] *= 5.0   # change only the coordinates ReLU zeroes
    A = torch.randn(d, d, dtype=dt) / d ** 0.5
    b = 3.0 + torch.rand(d, dtype=dt)  # A q + b > 0 for typical q, so ReLU(A q + b) = A q + b
    q_ab = torch.linalg.solve(A, 2.0 * (A @ q[0] + b) - b)[None]  # phi(q_ab) = 2 phi(q)
    cos = float(torch.nn.functional.cosine_similarity(q, q_ab))
    print(f"   {'attention':18s} {'q vs 2q':>10} {'q vs q_neg':>11}  (q_neg: negative coordinates x5)")
    for name in names:
        w = weights_of(name, torch.cat([q, 2 * q, q_neg]), k)
        print(f"   {name:18s} {(w[0] - w[1]).abs().max():>10.2e} {(w[0] - w[2]).abs().max():>11.2e}")
    print("   (InLine with the ReLU kernel still confuses q and q_neg: phi = ReLU itself forgets"
          "\n   the negative coordinates, which is why InLine uses the identity kernel.)")
    relu_ab = lambda x: torch.relu(x @ A.T + b)  # noqa: E731  the kernel ReLU(A x + b)
    w_ab = weights_of("linear-identity", relu_ab(torch.cat([q, q_ab])), relu_ab(k))
    print(f"   kernel ReLU(A x + b): q and q' = A^-1(2(Aq + b) - b) (cosine {cos:+.2f}, not collinear)"
          f"\n   get linear-attention weights differing by {(w_ab[0] - w_ab[1]).abs().max():.2e};"
          f" softmax: {(weights_of('softmax', torch.cat([q, q_ab]), k).diff(dim=0)).abs().max():.2e}")

    lengths = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=dt)
    m = args.directions
    u = torch.nn.functional.normalize(torch.randn(m, d, dtype=dt), dim=-1)
    queries = (u[:, None, :] * lengths[None, :, None]).reshape(-1, d)  # (M * 4, d)
    total = queries.shape[0] * (queries.shape[0] - 1) // 2
    print(f"\nConfusion count (in the spirit of Fig. 3): {queries.shape[0]} distinct queries ="
          f" {m} directions x lengths {lengths.tolist()};\n   pairs of them whose attention"
          f" distributions are the same (L1 distance < {args.tol:g}), of {total} pairs:")
    for name in names:
        print(f"   {name:18s} {confusion_pairs(weights_of(name, queries, k), args.tol):>6}")
    print(f"   ({m} x 6 = {m * 6} pairs share a direction: exactly what a scale-blind map confuses)")

    w = weights_of("inline-identity", torch.randn(n, d, dtype=dt), k)  # N queries over N keys
    qq, kk, vv = torch.randn(3, 2, 6, n, d, dtype=dt)
    s = d ** -0.5 / n
    fast = inline_attention(qq, kk, vv, scale=s)
    slow = inline_attention_weights(qq, kk, scale=s) @ vv
    print(f"\nInLine weights (identity kernel, s = d^-0.5 / N): rows sum to 1 (max error"
          f" {(w.sum(-1) - 1).abs().max():.1e}),\n   yet {100 * float((w < 0).double().mean()):.0f}%"
          f" of them are negative (min {w.min():.2e}, uniform 1/N = {1 / n:.2e});"
          f"\n   linear-time form vs N x N form, float64: max difference {(fast - slow).abs().max():.1e}")


if __name__ == "__main__":
    main()
