"""Step 03 - injectivity: why linear attention confuses queries, and InLine's fix (eq. 5).

Fix the keys K. An attention function maps a query q to a distribution over the N keys,
w(q) = (w_1, ..., w_N). InLine (Han et al., NeurIPS 2024, Sec. 4) asks whether that map is
*injective*: do different queries always get different distributions? If not, two tokens that
mean different things attend identically ("semantic confusion", the paper's Fig. 2). It proves
softmax and InLine attention injective, linear attention not, each under a condition (derived here):

Softmax is injective iff rank([K, 1]) = d + 1. As log w_j - log w_1 = s q.(k_j - k_1), w(q) fixes
q exactly when the differences k_j - k_1 span R^d, which is that condition. Keys that span R^d are
not enough: keys (1, 0), (0, 1) give q = (1, 1) and (2, 2) the same [0.5, 0.5], since adding
t (1, 1) to q adds t to every logit, which softmax ignores.

Linear attention is not injective (under mild assumptions on phi, e.g. continuity): w_j(q) =
phi(q).phi(k_j) / sum_t phi(q).phi(k_t) is unchanged when phi(q) is multiplied by any c > 0. So
  - with phi = ReLU, q and c*q (c > 0) get the *same* weights, and so do any two queries that
    differ only in coordinates ReLU sets to 0; with phi = exp, q and q + t (1, ..., 1);
  - with phi(x) = ReLU(A x + b), distinct non-collinear queries q and
    q' = A^{-1}(c (A q + b) - b) collide too, since phi(q') = c phi(q).

InLine attention (the paper's eq. 5, there with s = 1) drops the division and re-centres instead:

    w_ij = s * (phi(q_i).phi(k_j) - mean_t phi(q_i).phi(k_t)) + 1/N

The rows still sum to 1 (the bracket sums to 0 over j), but w(q) is now an affine function of
phi(q): injective if phi is and rank([phi(K), 1]) = d + 1 (identity kernel: iff; N - 1 >= d
generic keys do, the keys (1, 0), (0, 1) do not, as for softmax). The weights can be negative. As
mean_t phi(q_i).phi(k_t) = phi(q_i) . mean_t phi(k_t), eq. 5 is linear attention on *centred* keys,
without the division, plus the uniform 1/N; the output is still linear in N:

    out_i = s * phi(q_i)^T (sum_j (phi(k_j) - mean_t phi(k_t)) v_j^T) + mean_j v_j

The module uses the identity kernel and s = head_dim**-0.5 / N, the official code's scale (its
comment: eq. 5 omits it, as it equals scaling phi(q)); the 1/N keeps the weights of order 1/N for
any N. `InjectiveLinearAttention` is InLine without the local residual of step 04. The paper's
ablation of this step is its Table 2 (Swin-T: linear attention vs InLine, for four kernels).

Run it to see the collisions, a confusion count in the spirit of the paper's Fig. 2, and that
InLine's weights sum to 1, can be negative, and that its linear-time form equals the N x N form.
`--plot DIR` also redraws the idea of the paper's Fig. 1 (own keys) to DIR/fig1_injectivity.png.
"""
import argparse
import importlib
import os

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
    kv = centred_kv_buffer(k, v)  # (B, H, d, d)  sum_j (phi(k_j) - mean phi(k)) v_j^T
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
    family, _, kernel = name.partition("-")
    if family == "softmax":
        w = softmax.softmax_attention_weights(q, k)
    elif family == "linear":
        w = linear.linear_attention_weights(q, k, kernel=kernel, eps=0.0)
    elif family == "inline":  # with the module's scale
        w = inline_attention_weights(q, k, kernel=kernel, scale=d ** -0.5 / n)
    else:
        raise ValueError(f"unknown attention {name!r}: expected softmax, linear-<k>, inline-<k>")
    return w[0, 0]


def confusion_pairs(w, tol):
    """Number of pairs of queries whose weight rows differ by less than tol in L1 distance."""
    dist = torch.cdist(w, w, p=1)  # (M, M)
    return int(((dist < tol).sum() - w.shape[0]) // 2)  # off-diagonal pairs


def collisions(k, generator):
    """The numbers of the demo's first table, for keys k (N, d): max |w(q) - w(q')| for q vs 2q and
    q vs q_neg (q's negative coordinates x5) per attention, and for the kernel ReLU(A x + b) a pair
    of non-collinear queries with phi(q') = 2 phi(q)."""
    d, dt = k.shape[-1], k.dtype
    q = torch.randn(1, d, generator=generator, dtype=dt)
    q_neg = q.clone()
    q_neg[q_neg < 0] *= 5.0   # change only the coordinates ReLU zeroes
    A = torch.randn(d, d, generator=generator, dtype=dt) / d ** 0.5
    b = 3.0 + torch.rand(d, generator=generator, dtype=dt)  # ReLU(A q + b) = A q + b for typical q
    q_ab = torch.linalg.solve(A, 2.0 * (A @ q[0] + b) - b)[None]  # phi(q_ab) = 2 phi(q)
    pairs = {}
    for name in NAMES:
        w = weights_of(name, torch.cat([q, 2 * q, q_neg]), k)     # (3, N)
        pairs[name] = {"q vs 2q": float((w[0] - w[1]).abs().max()),
                       "q vs q_neg": float((w[0] - w[2]).abs().max())}
    relu_ab = lambda x: torch.relu(x @ A.T + b)  # noqa: E731  the kernel ReLU(A x + b)
    w_ab = weights_of("linear-identity", relu_ab(torch.cat([q, q_ab])), relu_ab(k))
    w_sm = weights_of("softmax", torch.cat([q, q_ab]), k)
    return {"pairs": pairs,
            "relu_ab": {"cosine": float(torch.nn.functional.cosine_similarity(q, q_ab)),
                        "linear": float((w_ab[0] - w_ab[1]).abs().max()),
                        "softmax": float(w_sm.diff(dim=0).abs().max())}}


def confusion_counts(k, directions, tol, generator, lengths=(0.5, 1.0, 2.0, 4.0)):
    """{attention: number of pairs of queries with the same weights (L1 distance < tol)}, over
    `directions` random unit directions times each of `lengths` (so every query is distinct)."""
    d, dt = k.shape[-1], k.dtype
    lengths = torch.tensor(lengths, dtype=dt)
    u = torch.randn(directions, d, generator=generator, dtype=dt)
    u = torch.nn.functional.normalize(u, dim=-1)                        # unit directions
    queries = (u[:, None, :] * lengths[None, :, None]).reshape(-1, d)  # (M * L, d)
    m = queries.shape[0]
    return {"queries": m, "pairs": m * (m - 1) // 2, "lengths": lengths.tolist(),
            "same direction pairs": directions * len(lengths) * (len(lengths) - 1) // 2,
            "confused": {n: confusion_pairs(weights_of(n, queries, k), tol) for n in NAMES}}


def inline_properties(k, generator):
    """InLine's weights (identity kernel, s = d^-0.5 / N) for N random queries over keys k: their
    largest row-sum error, share and minimum of negative weights, and the largest difference
    between the linear-time form and the N x N form (B=2, 6 heads), all in k's dtype."""
    n, d = k.shape
    w = weights_of("inline-identity", torch.randn(n, d, generator=generator, dtype=k.dtype), k)
    qq, kk, vv = torch.randn(3, 2, 6, n, d, generator=generator, dtype=k.dtype)  # (B, H, N, d)
    s = d ** -0.5 / n
    fast = inline_attention(qq, kk, vv, scale=s)
    slow = inline_attention_weights(qq, kk, scale=s) @ vv
    return {"row_sum_error": float((w.sum(-1) - 1).abs().max()),
            "negative_share": float((w < 0).double().mean()), "min": float(w.min()),
            "uniform": 1 / n, "fast_vs_n_by_n": float((fast - slow).abs().max())}


# ----------------------------------------------------------------------------------------------
# the idea of the paper's Fig. 1, with keys of its own: four keys and four queries in 2-D


FIG1_KEYS = [[1.0, -0.5], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]]
FIG1_LENGTHS = [0.5, 1.0, 2.0, 4.0]  # c_i: the queries are c_i q (a) or A^-1(c_i (A q + b) - b) (b)


def figure1():
    """The weights of the Fig. 1 example (the paper's idea, own keys), 2-D, 4 keys. (a) ReLU, the
    collinear queries q_i = c_i q; (b) phi(x) = ReLU(A x + b) and the non-collinear queries
    q_i = A^-1(c_i (A q + b) - b), so that phi(q_i) = c_i phi(q). For each: the (4, 4) weights of
    softmax (no kernel), linear attention and InLine (eq. 5, the module's s = d^-0.5 / N), both
    with that phi; rows are queries, columns keys."""
    dt = torch.float64
    k = torch.tensor(FIG1_KEYS, dtype=dt)                     # (4, 2)
    c = torch.tensor(FIG1_LENGTHS, dtype=dt)[:, None]         # (4, 1)
    A = torch.tensor([[1.0, 0.5], [-0.5, 1.0]], dtype=dt)
    b = torch.tensor([1.0, 1.0], dtype=dt)
    relu_ab = lambda x: torch.relu(x @ A.T + b)  # noqa: E731  phi(x) = ReLU(A x + b)
    q_a = c * torch.tensor([1.0, 0.5], dtype=dt)                                   # (4, 2)
    q_b = torch.linalg.solve(A, (c * (A @ torch.tensor([1.0, 0.0], dtype=dt) + b) - b).T).T
    out = {}
    for key, q, phi, label in [("a", q_a, torch.relu, "ReLU(x)"),
                               ("b", q_b, relu_ab, "ReLU(Ax + b)")]:
        out[key] = {"kernel": label, "queries": q, "keys": k, "weights": {
            "softmax": weights_of("softmax", q, k),
            "linear": weights_of("linear-identity", phi(q), phi(k)),   # phi applied above
            "InLine": weights_of("inline-identity", phi(q), phi(k))}}
    out["b"]["A"], out["b"]["b"] = A, b
    return out


def row_spread(w):
    """Largest difference between two rows of w: 0 when every query gets the same weights."""
    return float((w[:, None, :] - w[None, :, :]).abs().max())


def plot_figure1(fig1, path):
    """Fig. 1 as a PNG: per setting, the queries and keys in the plane and the three weight maps
    with their values in the cells. Returns the matplotlib Figure (already saved)."""
    from matplotlib.figure import Figure  # not pyplot: no window, nothing process-wide
    fig = Figure(figsize=(13, 7.6), dpi=100, layout="constrained")
    axes = fig.subplots(2, 4, gridspec_kw={"width_ratios": [1.1, 1, 1, 1]})
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for row, (key, setting) in enumerate(fig1.items()):
        q, k = setting["queries"], setting["keys"]
        ax = axes[row, 0]
        for j, kj in enumerate(k.tolist()):
            ax.annotate("", kj, (0, 0), arrowprops=dict(arrowstyle="->", color="0.4", lw=1.5))
            at = torch.tensor(kj) * (1 + 0.3 / torch.tensor(kj).norm())  # just past the arrow's tip
            ax.text(*at.tolist(), f"k{j + 1}", color="0.3", ha="center", va="center", fontsize=10)
        for i, qi in enumerate(q.tolist()):
            ax.plot(*qi, "o", color=colors[i], ms=8, label=f"q{i + 1} = ({qi[0]:.2f}, {qi[1]:.2f})")
            ax.text(qi[0] + 0.15, qi[1] - 0.35, f"q{i + 1}", color=colors[i], fontsize=10)
        start = torch.zeros(2, dtype=q.dtype) if key == "a" else q[0] - 0.3 * (q[-1] - q[0])
        ax.plot(*torch.stack([start, q[-1]]).T.tolist(), ":", color="0.6", lw=1)  # queries' line
        pts = torch.cat([q, k, torch.zeros(1, 2, dtype=q.dtype)])
        lo, hi = pts.min(0).values - 0.6, pts.max(0).values + 0.6
        ax.set(xlim=(float(lo[0]), float(hi[0])), ylim=(float(lo[1]), float(hi[1])),
               xlabel="coordinate 1", ylabel="coordinate 2")
        ax.axhline(0, color="0.85", lw=0.8, zorder=0)
        ax.axvline(0, color="0.85", lw=0.8, zorder=0)
        ax.legend(fontsize=8, loc="upper left")
        kind = "q_i = c_i q: collinear" if key == "a" else "q_i = A^-1(c_i(Aq+b)-b): not collinear"
        ax.set_title(f"({key}) phi(x) = {setting['kernel']}\n{kind}", fontsize=10)
        maps = setting["weights"]
        lo = min(float(w.min()) for w in maps.values())
        hi = max(float(w.max()) for w in maps.values())
        for col, (name, w) in enumerate(maps.items(), start=1):
            ax = axes[row, col]
            im = ax.imshow(w.numpy(), cmap="viridis", vmin=lo, vmax=hi)
            for i in range(w.shape[0]):
                for j in range(w.shape[1]):
                    val = float(w[i, j])
                    dark = val < lo + 0.55 * (hi - lo)
                    ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=10,
                            color="white" if dark else "black")
            ax.set_xticks(range(w.shape[1]), [f"k{j + 1}" for j in range(w.shape[1])])
            ax.set_yticks(range(w.shape[0]), [f"q{i + 1}" for i in range(w.shape[0])])
            ax.set(xlabel="key", ylabel="query")
            phi = "" if name == "softmax" else f", phi = {setting['kernel']}"
            spread = row_spread(w)
            verdict = "rows identical: confused" if spread < 1e-9 else "rows distinct"
            ax.set_title(f"{name}{phi}\n{verdict} (max diff {spread:.2f})", fontsize=10)
        fig.colorbar(im, ax=axes[row, 1:].tolist(), shrink=0.9, label="attention weight w_ij")
    fig.suptitle("InLine Fig. 1's idea: linear attention gives different queries the same weights;"
                 " softmax and InLine (eq. 5) do not.\nEach row of a map is one query's weights"
                 " over the 4 keys (it sums to 1; InLine's can be negative).", fontsize=11)
    save_png(fig, path)
    return fig


def save_png(fig, path, colors=256):
    """Save a matplotlib figure as a small PNG: rendered at the figure's dpi, then reduced to a
    palette of `colors` (a few tens of KB instead of a few hundred). Steps 04 and 05 use it too."""
    import io
    from PIL import Image  # installed with matplotlib
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    Image.open(buf).convert("RGB").quantize(colors).save(path, optimize=True)


NAMES = ["softmax", "linear-relu", "linear-identity", "inline-identity", "inline-relu"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Step 03: injectivity of softmax, linear, InLine.")
    p.add_argument("--tokens", type=int, default=197, help="number of keys N")
    p.add_argument("--dim", type=int, default=32, help="head dimension d")
    p.add_argument("--directions", type=int, default=64, help="query directions (confusion count)")
    p.add_argument("--tol", type=float, default=1e-3, help="L1 distance below which two "
                   "attention distributions count as the same (the rows sum to 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="DIR", help="also draw DIR/fig1_injectivity.png (matplotlib)")
    args = p.parse_args(argv)
    if args.plot and os.path.exists(args.plot) and not os.path.isdir(args.plot):
        p.error(f"--plot {args.plot}: exists and is not a directory")
    g = torch.Generator().manual_seed(args.seed)
    n, d = args.tokens, args.dim
    k = torch.randn(n, d, generator=g, dtype=torch.float64)  # one head's keys

    col = collisions(k, g)
    print(f"N = {n} random keys, d = {d}; max |w(q) - w(q')| over the N weights of each pair:")
    print(f"   {'attention':18s} {'q vs 2q':>10} {'q vs q_neg':>11}"
          f"  (q_neg: negative coordinates x5)")
    for name, pair in col["pairs"].items():
        print(f"   {name:18s} {pair['q vs 2q']:>10.2e} {pair['q vs q_neg']:>11.2e}")
    print("   (InLine with the ReLU kernel still confuses q and q_neg: phi = ReLU itself forgets"
          "\n   the negative coordinates, which is why InLine uses the identity kernel.)")
    ab = col["relu_ab"]
    print(f"   kernel ReLU(A x + b): q and q' = A^-1(2(Aq + b) - b) (cosine {ab['cosine']:+.2f},"
          f" not collinear)\n   get linear-attention weights differing by {ab['linear']:.2e};"
          f" softmax: {ab['softmax']:.2e}")

    conf = confusion_counts(k, args.directions, args.tol, g)
    print(f"\nConfusion count (in the spirit of Fig. 2): {conf['queries']} distinct queries ="
          f" {args.directions} directions x lengths {conf['lengths']};\n   pairs of them whose"
          f" attention distributions are the same (L1 distance < {args.tol:g}), of"
          f" {conf['pairs']} pairs:")
    for name, count in conf["confused"].items():
        print(f"   {name:18s} {count:>6}")
    print(f"   ({args.directions} x 6 = {conf['same direction pairs']} pairs share a direction:"
          f" exactly what a scale-blind map confuses)")

    props = inline_properties(k, g)
    print(f"\nInLine weights (identity kernel, s = d^-0.5 / N): rows sum to 1 (max error"
          f" {props['row_sum_error']:.1e}),\n   yet {100 * props['negative_share']:.0f}%"
          f" of them are negative (min {props['min']:.2e}, uniform 1/N = {props['uniform']:.2e});"
          f"\n   linear-time form vs N x N form, float64: max difference"
          f" {props['fast_vs_n_by_n']:.1e}")
    out = {"collisions": col, "confusion": conf, "inline": props}

    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        out["figure1"] = fig1 = figure1()
        path = os.path.join(args.plot, "fig1_injectivity.png")
        out["figures"] = {path: plot_figure1(fig1, path)}
        print(f"\nFig. 1 (2-D, 4 keys, 4 queries with phi(q_i) = c_i phi(q), c = {FIG1_LENGTHS}):"
              f" largest difference between two queries' weights")
        for key, setting in fig1.items():
            print(f"   ({key}) phi(x) = {setting['kernel']:13s} " + "  ".join(
                f"{name} {row_spread(w):.2f}" for name, w in setting["weights"].items()))
        print(f"   wrote {path}")
    return out


if __name__ == "__main__":
    main()
