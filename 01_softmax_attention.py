"""Step 01 - softmax attention, the O(N^2) baseline.

Every token i of a sequence of N tokens asks a query q_i and every token j offers a key k_j and a
value v_j (all d-dimensional, one set per head). Softmax attention mixes the values with weights

    w_ij = exp(q_i . k_j * s) / sum_t exp(q_i . k_t * s),       s = d**-0.5
    out_i = sum_j w_ij v_j                                           (Vaswani et al., eq. 1)

In matrix form, out = softmax(Q K^T * s) V. The N x N matrix softmax(Q K^T s) is the problem:
time and memory grow as N^2, so doubling the image side (4x the tokens) costs 16x. A DeiT-T at
224 px has N = 1 + 14*14 = 197 tokens; at 896 px it has 3137, and the N x N matrices of one layer
no longer fit in a laptop's cache, and at 1792 px (N = 12545) not in its memory either.

This file gives
  softmax_attention_weights(q, k)   the N x N weights, explicitly (the teaching path)
  softmax_attention(q, k, v)        the output from those weights
  SoftmaxAttention(dim, num_heads)  the module of timm's VisionTransformer (`qkv`, `proj`), which
                                    calls torch's fused F.scaled_dot_product_attention (SDPA),
and small helpers the later steps import: input checks and the time / peak-memory measurement.

Run `python 01_softmax_attention.py` to see SDPA equal the explicit formula, and how time and
memory grow with N for both (on CPU, torch's SDPA is a fused "flash" kernel that never stores
the N x N matrix, so its memory is linear; its time is still quadratic).
"""
import argparse
import contextlib
import os
import sys
import time

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
# measuring time and peak memory (used by the demos and every --bench)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 for a moment (the profiler's C++ side logs there), then restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn, device="cpu"):
    """Extra memory (bytes) that torch allocates for fn() at its peak, above what was allocated
    before the call. On CUDA: the allocator's statistics. On CPU: torch.profiler's record of every
    allocation and free (profile_memory=True), summed in time order. Nothing process-wide is set:
    the profiler is on during this one call only, and timing is never taken from this call.
    None where the profiler gives no memory records."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # a torch whose profiler keeps no raw events
        return None
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # + bytes allocated, - bytes freed
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def timings(fns, repeat=3, device="cpu"):
    """{name: [seconds of each of `repeat` calls]} of the closures in the dict `fns`, interleaved:
    round r calls every fn once, so a change in the machine's load hits all of them alike.
    Call each fn once before (warm-up) and leave that call out."""
    cuda = torch.device(device).type == "cuda"
    out = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            out[name].append(time.perf_counter() - t0)
    return out


def spread(times):
    """(median, min, max) of a list of timings."""
    times = sorted(times)
    return times[len(times) // 2], times[0], times[-1]


def compare(fns, baseline, repeat=3, device="cpu"):
    """Time the closures of the dict `fns` interleaved (`timings`; warm them up first) and set
    each against fns[baseline] round by round, so that a change in the machine's load between
    rounds cancels in the ratio. {name: {"time": (median, min, max) seconds, "ratio": (median,
    min, max) of its time / the baseline's time in the same round}}."""
    t = timings(fns, repeat, device)
    return {name: {"time": spread(ts), "ratio": spread([a / b for a, b in zip(ts, t[baseline])])}
            for name, ts in t.items()}


def unsteady(results, limit=0.1):
    """{name: (max - min) / median} of the entries of compare()'s results whose timings spread
    by more than `limit` of their median: a sign that the machine was busy."""
    spreads = {name: (r["time"][2] - r["time"][1]) / r["time"][0] for name, r in results.items()}
    return {name: s for name, s in spreads.items() if s > limit}


def measure(fn, repeat=3, device="cpu"):
    """(median seconds, peak extra bytes) of fn() running on `device`. The first call measures
    the peak memory (and warms up); a second, timed call decides how many more to time: `repeat`
    in all, or just that one when a call takes over 1 s."""
    peak = peak_memory(fn, device)
    first = timings({"fn": fn}, 1, device)["fn"]
    more = timings({"fn": fn}, repeat - 1, device)["fn"] if first[0] <= 1.0 else []
    return spread(first + more)[0], peak


def fwd_bwd(fn, *inputs):
    """A closure that runs fn(*inputs) forward and backward (inputs need requires_grad)."""
    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).sum().backward()
    return run


def fmt_mb(b):
    return "n/a" if b is None else f"{b / 2**20:.1f}"


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
        out.update(module_vs_explicit=float((m(x) - ref).abs().max()), weights_shape=tuple(w.shape),
                   row_sum_error=float((w.sum(-1) - 1).abs().max()), all_positive=bool((w > 0).all()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Step 01: softmax attention and its O(N^2) cost.")
    p.add_argument("--sizes", type=int, nargs="+", default=[197, 785, 3137, 12545],
                   help="sequence lengths N for the cost table (DeiT at 224, 448, 896, 1792 px)")
    p.add_argument("--heads", type=int, default=3, help="heads (DeiT-T: 3 of 64 channels)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per entry (median shown)")
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
    print(f"\n2) Cost of the attention core, forward + backward, B=1, {H} heads x {d} channels,"
          f" CPU ({torch.get_num_threads()} threads)")
    print(f"   {'N':>6} {'N x N matrix MB':>16} | {'explicit ms':>11} {'peak MB':>9} |"
          f" {'SDPA ms':>9} {'peak MB':>9} | {'time vs prev N':>14}")
    prev = None
    for n in args.sizes:
        q, k, v = (torch.randn(1, H, n, d, requires_grad=True) for _ in range(3))
        t_e, m_e = measure(fwd_bwd(softmax_attention, q, k, v), repeat=args.repeat)
        t_s, m_s = measure(fwd_bwd(F.scaled_dot_product_attention, q, k, v), repeat=args.repeat)
        growth = "" if prev is None else f"x{t_e / prev[0]:.1f} / x{t_s / prev[1]:.1f}"
        print(f"   {n:>6} {H * n * n * 4 / 2**20:>16.1f} | {t_e * 1e3:>11.1f} {fmt_mb(m_e):>9} |"
              f" {t_s * 1e3:>9.1f} {fmt_mb(m_s):>9} | {growth:>14}")
        prev = (t_e, t_s)
    print("   Each step multiplies N by ~4: an O(N^2) cost grows ~16x. The explicit form stores the"
          "\n   N x N weights (and their gradient), so its memory grows ~16x too; SDPA streams them.")
    return r


if __name__ == "__main__":
    main()
