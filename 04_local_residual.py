"""Step 04 - local modeling: the local attention residual, and the full InLine attention module.

InLine's second claim (Han et al., NeurIPS 2024, Sec. 5): besides being injective, softmax
attention in a trained ViT puts much of each query's attention on its few spatial neighbours
(the paper's Fig. 4 sums the weights in each query's 3x3 neighbourhood: far above the uniform
9/197 in DeiT-T's early layers), and masking a query's 3x3 neighbourhood costs more accuracy than
masking random tokens (Table 1). Linear attention spreads its weight much more evenly.

Why: softmax's exp() sharpens. Neighbouring patches of an image look alike, so q_i.k_j is largest
for j near i, and exp(q_i.k_j s) turns a modest lead into most of the mass. A kernel dot product
phi(q_i).phi(k_j) grows only linearly with the similarity, so far-away tokens keep a large share.

InLine restores local modeling by adding a *local attention residual* to its (global, injective)
attention output. For patch token i at grid position p(i), per channel c:

    out_i[c] = InLine_i[c] + sum_{o in w x w} r[c, o] * v_{p(i)+o}[c]    (paper Sec. 5.2, eq. 6)

a depthwise w x w convolution over the value map (window w = 3 in the paper and the official
code), whose kernel r is *predicted per sample* from the mean token: r = residual(mean_i x_i), with
    residual = Sequential(Conv1d(C, C, 1, groups=heads), GELU(), Conv1d(C, w*w*C, 1, groups=heads)).
The class token (if any) is left out of the convolution and gets no residual; the module reads the
grid from N (N = H*W, or 1 + H*W with a class token first, H = W). This is the official InLine
module (same parameter names: `qkv`, `proj`, `residual.0`, `residual.2`); with 6 heads and
window=3, InLine-DeiT-T has 6,477,736 parameters. The paper ablates this step in its Table 3
(InLine-Swin-T: attention windows 7^2 to 56^2, each with and without the local residual); on
DeiT-T, whose attention is global, that is 06's `--attn injective` against `--attn inline`.

Run it to see the local attention mass of softmax, linear and InLine attention on token maps whose
neighbours are alike (as an image's are), and InLine-DeiT-T's parameter count. `--plot DIR` also
draws one query's attention maps (DIR/attention_maps.png), the table as bars (DIR/local_mass.png).
"""
import argparse
import importlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

softmax = importlib.import_module("01_softmax_attention")
injective = importlib.import_module("03_injectivity")


def grid_size(n):
    """(side, number of class tokens) for N = side*side or N = 1 + side*side tokens."""
    side = math.isqrt(n)
    if n > 0 and side * side == n:
        return side, 0
    side = math.isqrt(max(n - 1, 0))
    if n > 1 and side * side == n - 1:
        return side, 1
    raise ValueError(f"N={n} tokens is not a square grid: expected N = H*W or N = 1 + H*W "
                     f"(a class token first) with H = W")


def local_attention_mass(weights, window=3):
    """Share of each patch query's attention on the keys in its window x window neighbourhood.

    weights: (..., N, N) attention weights over a square token grid (class token, if any, first).
    Returns (..., H*W): for each patch query, the sum of its weights on the patch keys within the
    window (clipped at the border). The class token's row and column are left out; the weights are
    not renormalised, so a uniform distribution over N tokens scores window**2 / N away from the
    border (the paper's Fig. 4 baseline 9/197).
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window={window}: expected a positive odd size")
    if weights.dim() < 2 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"expected (..., N, N) weights, got shape {tuple(weights.shape)}")
    side, cls = grid_size(weights.shape[-1])
    w = weights[..., cls:, cls:]                                   # (..., P, P) patch x patch
    idx = torch.arange(side, device=w.device)                     # on the weights' device
    rows, cols = torch.cartesian_prod(idx, idx).unbind(1)         # (P,) each patch's row, column
    near = ((rows[:, None] - rows[None, :]).abs() <= window // 2) & \
           ((cols[:, None] - cols[None, :]).abs() <= window // 2)  # (P, P) neighbourhood mask
    return (w * near.to(w.dtype)).sum(dim=-1)                      # (..., P)


class InLineAttention(injective.InjectiveLinearAttention):
    """InLine attention: injective linear attention (step 03) + the local attention residual, a
    per-sample predicted window x window depthwise convolution of the values (official: 3)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0,
                 kernel="identity", window=3):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, kernel=kernel)
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window={window}: expected a positive odd size (3 is the official)")
        self.window = window
        self.residual = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size=1, groups=num_heads),
            nn.GELU(),
            nn.Conv1d(dim, window * window * dim, kernel_size=1, groups=num_heads),
        )

    def local_residual(self, x, v):
        """sum_o r[c, o] v_{p+o}[c] per patch token; x: (B, N, C), v: (B, H, N, d) -> (B, N, C)."""
        B, N, C = x.shape
        side, cls = grid_size(N)
        w = self.window
        r = self.residual(x.mean(dim=1)[:, :, None])  # (B, w*w*C, 1)  kernels from the mean token
        r = r.reshape(B * C, 1, w, w)                 # one w x w kernel per sample and channel
        v_map = self.merge_heads(v)[:, cls:]          # (B, H*W, C) patch values, heads side by side
        v_map = v_map.transpose(1, 2).reshape(1, B * C, side, side)  # (1, B*C, H, W)
        out = F.conv2d(v_map, r, padding=w // 2, groups=B * C)  # (1, B*C, H, W), per sample
        out = out.reshape(B, C, side * side).transpose(1, 2)  # (B, H*W, C)
        return F.pad(out, (0, 0, cls, 0))                     # (B, N, C), zero for the class token

    def forward(self, x):
        q, k, v = self.split_heads(x)                                        # (B, H, N, d)
        out = self.merge_heads(self.attend(q, k, v)) + self.local_residual(x, v)  # (B, N, C)
        return self.proj_drop(self.proj(out))


# ----------------------------------------------------------------------------------------------
# demo


def smooth_tokens(side, dim, blur, generator):
    """A (side*side, dim) token map whose neighbours are alike: Gaussian noise blurred `blur` times
    with a 3x3 box filter, each channel scaled to zero mean and unit variance."""
    x = torch.randn(1, dim, side, side, generator=generator, dtype=torch.float64)
    box = torch.full((dim, 1, 3, 3), 1 / 9, dtype=torch.float64)
    for _ in range(blur):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), box, groups=dim)
    x = (x - x.mean((2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)
    return x.reshape(dim, side * side).T


NAMES = ["softmax", "linear-relu", "linear-elu", "inline-identity"]  # step 03's weights_of names
WINDOWS = (3, 5, 7)


def smooth_map_tokens(side, dim, blur, generator):
    """(1 + side*side, dim) tokens: a random class token, then a smooth_tokens map."""
    return torch.cat([torch.randn(1, dim, generator=generator, dtype=torch.float64),
                      smooth_tokens(side, dim, blur, generator)])  # (N, d)


def local_mass_table(side=14, dim=32, samples=8, seed=0, names=NAMES, blurs=(0, 4)):
    """The demo's table: for each attention and blur, the mean weight of a patch query on its own
    token ('self') and its local attention mass in each window of WINDOWS, on q = k = the tokens
    of `samples` random maps (step 03's weights_of). Returns {"n", "uniform", "rows"}."""
    g = torch.Generator().manual_seed(seed)
    n = side * side + 1  # with a class token
    rows = []
    for blur in blurs:
        for name in names:
            masses, own = {win: 0.0 for win in WINDOWS}, 0.0
            for _ in range(samples):
                tok = smooth_map_tokens(side, dim, blur, g)                 # (N, d)
                w = injective.weights_of(name, tok, tok)                    # (N, N)
                own += float(w.diagonal()[1:].mean()) / samples
                for win in masses:
                    masses[win] += float(local_attention_mass(w, win).mean()) / samples
            rows.append({"attention": name, "blur": blur, "self": own, "mass": masses})
    return {"n": n, "uniform": {win: win * win / n for win in WINDOWS}, "rows": rows}


def inline_parameters(seed=0):
    """InLineAttention(192, 6 heads)'s parameters beyond SoftmaxAttention(192, 3)'s, per part, the
    DeiT-T total they give, and the shapes of the residual branch's output and the module's."""
    torch.manual_seed(seed)  # the modules' initial weights and the input
    sm, inl = softmax.SoftmaxAttention(192, num_heads=3), InLineAttention(192, num_heads=6)
    extra = sum(p.numel() for p in inl.parameters()) - sum(p.numel() for p in sm.parameters())
    x = torch.randn(2, 197, 192)
    with torch.no_grad():
        r, y = inl.residual(x.mean(dim=1)[:, :, None]), inl(x)
    return {"extra": extra, "residual.0": sum(p.numel() for p in inl.residual[0].parameters()),
            "residual.2": sum(p.numel() for p in inl.residual[2].parameters()), "x": tuple(x.shape),
            "deit_t": 5_717_416 + 12 * extra, "kernels": tuple(r.shape), "out": tuple(y.shape)}


def query_maps(side=14, dim=32, blur=4, seed=0, query=None, names=NAMES):
    """One patch query's weights over the side x side patches, for each attention, on one smooth
    map (q = k = tokens). query: (row, col), the centre by default. Returns {"query", "maps":
    {name: (side, side)}, "cls": {name: weight on the class token}, "mass": {name: {win: mass}}}."""
    g = torch.Generator().manual_seed(seed)
    row, col = (side // 2, side // 2) if query is None else query
    i = 1 + row * side + col                       # the query's token (class token first)
    tok = smooth_map_tokens(side, dim, blur, g)    # (N, d)
    out = {"query": (row, col), "maps": {}, "cls": {}, "mass": {}}
    for name in names:
        w = injective.weights_of(name, tok, tok)   # (N, N)
        out["maps"][name] = w[i, 1:].reshape(side, side)
        out["cls"][name] = float(w[i, 0])
        out["mass"][name] = {win: float(local_attention_mass(w, win)[i - 1]) for win in WINDOWS}
    return out


def plot_attention_maps(qm, path):
    """The query's weights on the grid, one panel per attention, its 3x3 window outlined."""
    from matplotlib.figure import Figure  # not pyplot: no window, nothing process-wide
    from matplotlib.patches import Rectangle
    names = list(qm["maps"])
    fig = Figure(figsize=(3.6 * len(names), 3.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(names))
    r, c = qm["query"]
    for ax, name in zip(axes, names):
        w = qm["maps"][name]
        im = ax.imshow(w.numpy(), cmap="magma")
        ax.add_patch(Rectangle((c - 1.5, r - 1.5), 3, 3, fill=False, ec="cyan", lw=1.5))
        ax.plot(c, r, "+", color="cyan", ms=8)
        ax.set_title(f"{name}\n3x3 mass {qm['mass'][name][3]:.2f} (uniform"
                     f" {9 / (w.numel() + 1):.2f})", fontsize=9)
        ax.set(xticks=range(0, w.shape[1], 2), yticks=range(0, w.shape[0], 2),
               xlabel="patch column", ylabel="patch row")
        fig.colorbar(im, ax=ax, shrink=0.75, label="weight w_ij")
    side = qm["maps"][names[0]].shape[0]
    fig.suptitle(f"Attention weights of one query (+, its 3x3 window outlined) over a {side}x{side}"
                 f" token map whose neighbours are alike (q = k = tokens);\neach panel has its own"
                 " colour scale: softmax is local, the kernel forms spread theirs", fontsize=10)
    injective.save_png(fig, path)
    return fig


def plot_local_mass(table, path):
    """The demo's table as bars: local attention mass per attention and window, per blur, with
    the uniform baseline window**2 / N."""
    from matplotlib.figure import Figure
    blurs = sorted({row["blur"] for row in table["rows"]})
    fig = Figure(figsize=(6 * len(blurs), 3.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(blurs), sharey=True)
    colors = {3: "tab:blue", 5: "tab:orange", 7: "tab:green"}
    for ax, blur in zip(axes, blurs):
        rows = [row for row in table["rows"] if row["blur"] == blur]
        for j, win in enumerate(WINDOWS):
            x = [i + (j - 1) * 0.27 for i in range(len(rows))]
            ax.bar(x, [row["mass"][win] for row in rows], width=0.27, color=colors[win],
                   label=f"{win}x{win} window")
            ax.hlines(table["uniform"][win], -0.5, len(rows) - 0.5, colors=colors[win],
                      linestyles="--", lw=1)
        ax.set_xticks(range(len(rows)), [row["attention"] for row in rows])
        ax.set(xlim=(-0.5, len(rows) - 0.5), ylim=(0, 1), ylabel="local attention mass",
               xlabel="attention weights (inline: eq. 5, without its local residual)")
        what = "plain noise, no spatial structure" if blur == 0 else "neighbours alike, image-like"
        ax.set_title(f"blur {blur}: {what}", fontsize=10)
    axes[0].legend(fontsize=8, loc="upper right", title="dashed: uniform k*k/N", title_fontsize=8)
    fig.suptitle("Share of a patch query's attention in its k x k neighbourhood (InLine Fig. 4's"
                 " measure), mean over queries and maps", fontsize=11)
    injective.save_png(fig, path)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description="Step 04: local attention mass and InLine attention.")
    p.add_argument("--side", type=int, default=14, help="grid side (14: DeiT at 224 px)")
    p.add_argument("--dim", type=int, default=32, help="head dimension d")
    p.add_argument("--samples", type=int, default=8, help="random token maps to average over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="DIR", help="also draw DIR/{attention_maps,local_mass}.png")
    args = p.parse_args(argv)
    if args.plot and os.path.exists(args.plot) and not os.path.isdir(args.plot):
        p.error(f"--plot {args.plot}: exists and is not a directory")
    side, d = args.side, args.dim
    table = local_mass_table(side, d, args.samples, args.seed)
    n = table["n"]

    print(f"Local attention mass (paper Fig. 4): the share of each patch query's attention that"
          f" falls\nin its w x w neighbourhood, on {side}x{side} token maps + a class token (N ="
          f" {n}), q = k = tokens,\nd = {d}, mean over queries and {args.samples} maps. 'blur 4':"
          f" neighbouring tokens are alike, as in an\nimage (noise blurred 4 times); 'blur 0':"
          f" plain noise, no spatial structure. 'self': weight on the query's own token.")
    print(f"   {'attention':16s} {'blur':>4} | {'self':>5} | "
          + " | ".join(f"{win}x{win} mass (x uniform)" for win in WINDOWS))
    u = table["uniform"]
    for row in table["rows"]:
        print(f"   {row['attention']:16s} {row['blur']:>4} | {row['self']:>5.3f} | " + " | ".join(
            f"{m:>8.3f} (x{m / u[win]:>5.1f}) " for win, m in row["mass"].items()))
    print(f"   uniform baseline k*k/N: 3x3 {u[3]:.3f}, 5x5 {u[5]:.3f}, 7x7 {u[7]:.3f}"
          f" (a little less at the border)."
          "\n   Softmax's exp() turns 'my neighbours look like me' into most of the mass; the"
          "\n   kernel forms gain far less from the same structure (ELU+1 almost nothing), and with"
          "\n   no structure only softmax still concentrates (on the query itself). InLine"
          "\n   therefore adds locality explicitly, with its 3x3 local residual:")

    par = inline_parameters(args.seed)
    print(f"\nInLineAttention(192, 6 heads) adds {par['extra']:,} parameters per block (residual.0:"
          f" {par['residual.0']:,}, residual.2: {par['residual.2']:,});\n   DeiT-T 5,717,416 + 12 x"
          f" {par['extra']:,} = {par['deit_t']:,} parameters (InLine-DeiT-T: 6,477,736).")
    print(f"   For x of shape {par['x']} the residual branch predicts {par['kernels']}:"
          f" one 3x3 kernel per sample and channel; out {par['out']}.")
    out = {"table": table, "parameters": par}

    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        out["query_maps"] = qm = query_maps(side, d, 4, args.seed)
        paths = [os.path.join(args.plot, f) for f in ("attention_maps.png", "local_mass.png")]
        out["figures"] = {paths[0]: plot_attention_maps(qm, paths[0]),
                          paths[1]: plot_local_mass(table, paths[1])}
        print(f"\nwrote {paths[0]} (query at row {qm['query'][0]}, column {qm['query'][1]};"
              f" 3x3 mass " + ", ".join(f"{name} {m[3]:.2f}" for name, m in qm["mass"].items())
              + f")\nwrote {paths[1]}")
    return out


if __name__ == "__main__":
    main()
