"""Step 05 - rank augmentation: RALA, and the final module (InLine + RALA's rank augmentations).

RALA (Fan et al., CVPR 2025) looks at linear attention from the side of its ranks. Per head,
everything linear attention knows about the N keys and values is squeezed into the d x d
*KV buffer*, of rank <= d (d = 32 in the course's DeiT-T and the tables below, so a head's rank here
is capped at 32; RAVLT has 64 per head, up to 96 in -B, -L: rerun the tables with `--head-dim 64`)

    KV = sum_j phi(k_j) v_j^T = N mean(phi(k)) mean(v)^T + sum_j (phi(k_j) - mean phi(k)) v_j^T

and every output row is phi(q_i)^T KV / z_i, so the N x d output has rank <= rank(KV). A positive
kernel gives all phi(k_j) a large common part; where the values share a large mean too (tokens
alike), the rank-1 first term dominates and KV's *effective* rank falls towards 1 (table 1 below,
background scene: 1.26 of 32), with zero-mean values not (random tokens: 18.64). The outputs fall
further, the phi(q_i) sharing a common part too (table 2, random tokens: ELU+1 3.82, softmax
26.09). Softmax has the same cap, an N x d output (background: 3.60), and its N x N weights are
not numerically full rank when the logits are small. RALA raises the rank twice (its Fig. 6):

  1. KV buffer: re-weight each token by how much the (mean) query cares about it,
         alpha_j = N * softmax_j( s * mean_i(phi(q_i)) . phi(k_j) )      (sum_j alpha_j = N)
         KV = sum_j alpha_j phi(k_j) v_j^T
     so the buffer is no longer an equal-weight sum dominated by the common part (table 1,
     background scene: 1.26 -> 4.91; on random tokens alpha lowers it, 18.64 -> 15.17);
  2. output: multiply the output element-wise by a gate o = x W_o computed from the input token,
     out = proj((attention + lepe) * o). rank(A * B) <= rank(A) rank(B), but a head's output
     stays N x d: the gate can lift its rank up to d, not beyond (table 3: gate off vs final).

rala_attention(q, k, v), with phi = ELU + 1, computes (as the official code does, eps on the mean)

    out_i = phi(q_i)^T (sum_j alpha_j phi(k_j) v_j^T) / (N (phi(q_i).mean_j alpha_j phi(k_j) + eps))

and RALAttention is the official RALA block attention for (B, N, C) tokens: one `qkvo` linear
(q, k, v, gate o in that order), `lepe` (a 5x5 depthwise convolution on the value map of the patch
tokens), `proj`. No RoPE: DeiT has absolute position embeddings.

The final module, RankAugmentedInLineAttention, is this course's own combination: neither paper
proposes or evaluates it. It composes InLine (step 04: injective weights and the local residual)
with both rank augmentations:

    w_ij = s * (phi(q_i).alpha_j phi(k_j) - mean_t phi(q_i).alpha_t phi(k_t)) + 1/N
    out  = proj((sum_j w_ij v_j + local_residual) * gate(x))

InLine's rows still sum to 1 whatever alpha is: the bracket is a similarity minus its own mean
over j, so it sums to 0 over j for *any* positive re-weighting of the keys, and the 1/N terms sum
to 1. (RALA needs its division for that; InLine never divides, so re-weighting cannot break the
normalisation or make a denominator vanish.) Each part is a constructor flag: reweight=False,
gate=False computes exactly what InLineAttention (InLine's module) computes; RALA's module is
RALAttention; reweight and gate repeat RALA's ablation of its two augmentations, on InLine (06:
--no-reweight, --no-gate). The papers' headline models are hybrids (RAVLT: softmax in its last
two stages; InLine-Swin, -CSwin: in later stages); the course's DeiT-T runs (06: one attention in
all blocks) compare with InLine-DeiT-T, InLine in every block: 74.5% top-1 in the InLine paper.

Run it for the rank tables; `--plot DIR` also draws the singular values behind them (DIR/
kv_spectra.png, DIR/output_spectra.png). Speed and memory: `python tools/bench.py modules`.
"""
import argparse
import importlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

softmax = importlib.import_module("01_softmax_attention")
linear = importlib.import_module("02_linear_attention")
injective = importlib.import_module("03_injectivity")
locality = importlib.import_module("04_local_residual")


# ----------------------------------------------------------------------------------------------
# measuring rank


def numerical_rank(m, rtol=1e-3):
    """Number of singular values above rtol * the largest, per matrix: (..., r, c) -> (...).
    The tolerance is relative and stated, since every float matrix is 'full rank' at eps."""
    s = torch.linalg.svdvals(m.double())                # (..., min(r, c)), descending
    return (s > rtol * s[..., :1]).sum(dim=-1)


def effective_rank(m):
    """exp(entropy of the normalised singular values) (Roy & Vetterli, 2007): (..., r, c) -> (...).
    A matrix with k equal singular values scores k; one dominant direction scores about 1."""
    s = torch.linalg.svdvals(m.double())
    p = s / s.sum(dim=-1, keepdim=True)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1))


# ----------------------------------------------------------------------------------------------
# RALA attention


def rala_token_weights(q, k, scale=None):
    """alpha_j = N softmax_j(s * mean_i(q_i) . k_j) for already feature-mapped q, k: (B, H, N)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_mean = q.mean(dim=-2, keepdim=True)                       # (B, H, 1, d)
    logits = scale * (q_mean @ k.transpose(-2, -1))             # (B, H, 1, N)
    return k.shape[-2] * logits.softmax(dim=-1)[..., 0, :]      # (B, H, N), sums to N


def reweighted_keys(q, k, scale=None):
    """alpha_j k_j for already feature-mapped q, k: (B, H, N, d) -> (B, H, N, d)."""
    return k * rala_token_weights(q, k, scale)[..., None]


def rala_attention(q, k, v, scale=None, eps=1e-6):
    """RALA in O(N d^2): phi = ELU+1, keys re-weighted by alpha. (B, H, N, d) -> (B, H, N, d)."""
    softmax.check_qkv(q, k, v)
    q, k = linear.feature_map(q, "elu"), linear.feature_map(k, "elu")  # (B, H, N, d)
    n = k.shape[-2]
    k = reweighted_keys(q, k, scale)                     # (B, H, N, d)  alpha_j phi(k_j)
    kv = linear.kv_buffer(k, v) / n                      # (B, H, d, d)  re-weighted KV buffer / N
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps  # (B, H, N, 1)
    return (q @ kv) / z


def rala_attention_weights(q, k, scale=None, eps=1e-6):
    """The N x N form of rala_attention, for analysis. (B, H, N, d) -> (B, H, N, N)."""
    softmax.check_qkv(q, k)
    q, k = linear.feature_map(q, "elu"), linear.feature_map(k, "elu")
    k = reweighted_keys(q, k, scale)                     # (B, H, N, d)  alpha_j phi(k_j)
    sim = q @ k.transpose(-2, -1) / k.shape[-2]          # (B, H, N, N)
    return sim / (sim.sum(dim=-1, keepdim=True) + eps)


class RALAttention(nn.Module):
    """The official RALA attention (without RoPE) for (B, N, C) tokens, N = H*W or 1 + H*W."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        softmax.check_heads(dim, num_heads)
        if attn_drop:
            raise ValueError(f"attn_drop={attn_drop}: RALA never forms the N x N weights; use 0")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkvo = nn.Linear(dim, 4 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project(self, x):
        """(B, N, C) -> q, k, v and the gate o, each (B, H, N, d)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        B, N, C = x.shape
        qkvo = self.qkvo(x).reshape(B, N, 4, self.num_heads, self.head_dim)  # (B, N, 4, H, d)
        return qkvo.permute(2, 0, 3, 1, 4).unbind(0)                         # 4 x (B, H, N, d)

    def split_heads(self, x):
        """(B, N, C) -> q, k, v, each (B, H, N, d)."""
        return self.project(x)[:3]

    def attend(self, q, k, v):
        """The attention core: (B, H, N, d) -> (B, H, N, d)."""
        return linear.in_float32(rala_attention, q, k, v, scale=self.scale)  # float32 sums (02)

    def attention_weights(self, x):
        """(B, N, C) -> (B, H, N, N): attend()'s alpha-re-weighted weights (no lepe, no gate)."""
        q, k, _ = self.split_heads(x)
        return rala_attention_weights(q, k, self.scale)

    def kv_buffer(self, x):
        """(B, N, C) -> (B, H, d, d): sum_j alpha_j phi(k_j) v_j^T, the re-weighted KV buffer."""
        q, k, v = self.split_heads(x)
        q, k = linear.feature_map(q, "elu"), linear.feature_map(k, "elu")
        return linear.kv_buffer(reweighted_keys(q, k, self.scale), v)

    def forward(self, x):
        q, k, v, o = self.project(x)                              # (B, H, N, d) each
        B, N, C = x.shape
        side, cls = locality.grid_size(N)
        merge = softmax.SoftmaxAttention.merge_heads
        out = merge(self.attend(q, k, v))                         # (B, N, C)
        v_map = merge(v)[:, cls:].reshape(B, side, side, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        lepe = self.lepe(v_map).flatten(2).transpose(1, 2)        # (B, H*W, C)
        out = out + F.pad(lepe, (0, 0, cls, 0))                   # class token: no lepe
        return self.proj_drop(self.proj(out * merge(o)))          # gate o: (B, N, C)


# ----------------------------------------------------------------------------------------------
# the final module's core, with its gradient written by hand


def read_buffer(q, kv, v_mean):
    """out_i = q_i^T KV + v_mean for every head, as one fused GEMM (baddbmm): q (B, H, N, d), the
    buffer kv (B, H, d, d) with the scale already in it, v_mean (B, H, 1, d) -> (B*H, N, d)."""
    B, H, n, d = q.shape
    return torch.baddbmm(v_mean.reshape(B * H, 1, d), q.reshape(B * H, n, d),
                         kv.reshape(B * H, d, d))


class ReweightedInLineCore(torch.autograd.Function):
    """The final module's attention (eq. 5 on re-weighted keys, identity kernel), per head:

        z_j = s k_j . q_mean,  alpha = N softmax_j(z),  U = alpha * (V - v_mean)   (N, d)
        KV = K^T U  (d, d),    out = c Q KV + v_mean (+ local),  c = s / N

    (q_mean, v_mean: the means of the queries and values over the N tokens. local, if given: the
    local residual of the last M rows, the patch tokens; added here, its gradient is a view of G's
    last M rows, where an in-place add on this output outside would make autograd copy the whole
    output in backward.) Autograd would save every intermediate (V - v_mean, U, the dot
    products); this saves q, k, v, alpha and c KV, recomputes the rest in backward, and frees each
    temporary as soon as it is used. The gradients, with G = dL/dout (tests: gradcheck, and
    forward() = reference() in float64):

        dQ = G (c KV)^T,  dKV = c Q^T G,  dv_mean = sum_i G_i - sum_j dV_j
        dK = U dKV^T + dz q_mean^T,  dU = K dKV,  dV = alpha * dU,  dalpha_j = dU_j . (v_j - v_mean)
        dz = alpha * (dalpha - mean_t alpha_t dalpha_t)    (the softmax's Jacobian, N folded in)
        dq_mean = sum_j dz_j k_j
    with s folded into dz. Inputs (B, H, N, d), (B, H, 1, d) means, local (B, H, M, d) or None;
    output (B*H, N, d)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # in float32 under the
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)   # autocast of each device
    def forward(ctx, q, k, v, q_mean, v_mean, s, local=None):
        n = q.shape[-2]
        alpha = n * torch.softmax(s * (k * q_mean).sum(-1, keepdim=True), dim=-2)  # (B, H, N, 1)
        kv = (s / n) * (k.mT @ (alpha * (v - v_mean)))                           # c KV (B, H, d, d)
        ctx.save_for_backward(q, k, v, q_mean, v_mean, alpha, kv)
        ctx.s, ctx.m = s, None if local is None else local.shape[-2]
        out = read_buffer(q, kv, v_mean)                             # c q_i^T KV + v_mean
        if local is not None:
            out.view(q.shape)[:, :, n - ctx.m:].add_(local)          # + local on the patch rows
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # the backward: with the forward's autocast state
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        q, k, v, q_mean, v_mean, alpha, kv = ctx.saved_tensors
        s, (B, H, n, d) = ctx.s, q.shape
        g = g.view(B, H, n, d)                                      # dL/dout
        dq = g @ kv.mT                                              # G (c KV)^T
        dkv = (s / n) * (q.mT @ g)                                  # c Q^T G        (B, H, d, d)
        dv_mean = g.sum(-2, keepdim=True)                           # + v_mean in out
        vc = v - v_mean                                             # V - v_mean
        dk = (alpha * vc) @ dkv.mT                                  # U dKV^T
        dv = k @ dkv                                                # dU
        dalpha = vc.mul_(dv).sum(-1, keepdim=True)                  # dU_j . (v_j - v_mean)
        del vc
        dv.mul_(alpha)                                              # dV = alpha * dU
        dv_mean -= dv.sum(-2, keepdim=True)                         # U = alpha * (V - v_mean)
        dz = (s * alpha) * (dalpha - (alpha * dalpha).sum(-2, keepdim=True) / n)  # s dz (B,H,N,1)
        dk.addcmul_(dz, q_mean)                                     # z_j = s k_j . q_mean
        dq_mean = (dz * k).sum(-2, keepdim=True)
        dlocal = None if ctx.m is None else g[:, :, n - ctx.m:]     # out's last M rows
        return dq, dk, dv, dq_mean, dv_mean, None, dlocal


# ----------------------------------------------------------------------------------------------
# the final module


class RankAugmentedInLineAttention(locality.InLineAttention):
    """InLine (injective weights + local residual) with RALA's re-weighted KV buffer and output
    gate. Flags: reweight (alpha on the keys), gate (output gate, a `gate` Linear), local (the
    window x window local residual, window=3 as InLine). reweight=False, gate=False is
    InLineAttention, parameter for parameter."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0,
                 kernel="identity", reweight=True, gate=True, local=True, window=3):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, kernel=kernel,
                         window=window)
        self.reweight = reweight
        self.gate = nn.Linear(dim, dim) if gate else None
        if not local:
            self.residual = None

    def mapped(self, q, k):
        """(phi(q), alpha_j phi(k_j)) (alpha only with reweight): the keys eq. 5 then sees."""
        q, k = linear.feature_map(q, self.kernel), linear.feature_map(k, self.kernel)
        return q, (reweighted_keys(q, k, self.scale) if self.reweight else k)  # (B, H, N, d)

    def attend(self, q, k, v):
        return linear.in_float32(self.reweighted_inline, q, k, v)  # float32 sums (step 02)

    def reweighted_inline(self, q, k, v):
        """eq. 5 on (phi(q), alpha * phi(k)); the kernel is already applied, so "identity"."""
        q, k = self.mapped(q, k)
        return injective.inline_attention(q, k, v, "identity", scale=self.scale / q.shape[-2])

    def attention_weights(self, x):
        """(B, N, C) -> (B, H, N, N): eq. 5's weights on re-weighted keys (no residual, no gate)."""
        q, k = self.mapped(*self.split_heads(x)[:2])
        return injective.inline_attention_weights(q, k, "identity", scale=self.scale / q.shape[-2])

    def kv_buffer(self, x):
        """(B, N, C) -> (B, H, d, d): the centred buffer (alpha phi(K) - mean alpha phi(K))^T V."""
        q, k, v = self.split_heads(x)
        return injective.centred_kv_buffer(self.mapped(q, k)[1], v)

    def reference(self, x):
        """The module, written as its definition: eq. 5 on re-weighted keys (attend), the local
        residual (step 04) and the gate. forward() computes the same function faster; the tests
        check the two agree in float64, outputs and gradients."""
        q, k, v = self.split_heads(x)                         # (B, H, N, d)
        out = self.merge_heads(self.attend(q, k, v))          # (B, N, C)
        if self.residual is not None:
            out = out + self.local_residual(x, v)
        if self.gate is not None:
            out = out * self.gate(x)
        return self.proj_drop(self.proj(out))

    # -- the same function, arranged for speed. Each line says which identity it uses.

    def residual_kernels(self, x_mean):
        """residual(mean token) with its two grouped 1x1 convolutions as one bmm each over the head
        groups (a grouped 1x1 convolution is a block-diagonal matrix): (B, C) -> (B*C, 1, w, w)."""
        conv1, act, conv2 = self.residual
        B, C = x_mean.shape
        G, w = self.num_heads, self.window
        h = x_mean.view(B, G, C // G).transpose(0, 1)                      # (G, B, C/G)
        h = torch.baddbmm(conv1.bias.view(G, 1, -1), h, conv1.weight.view(G, C // G, -1).mT)
        h = torch.baddbmm(conv2.bias.view(G, 1, -1), act(h), conv2.weight.view(G, -1, C // G).mT)
        return h.transpose(0, 1).reshape(B * C, 1, w, w)        # (G, B, w*w*C/G) -> kernels

    def fast_attend(self, q, k, v, q_mean, k_mean, v_mean, local=None):
        """attend() from q, k, v (B, H, N, d) and their means over the tokens (B, H, 1, d), plus
        the local residual `local` (B, H, M, d) on the last M rows (the patch tokens) if given."""
        B, H, n, d = q.shape
        if self.reweight:
            # alpha_j = N softmax_j(s mean_i(q_i) . k_j): mean_i q_i is the mean token's query;
            # sum_j (a_j k_j - mean_t a_t k_t) v_j^T = K^T diag(a) V - (K^T a) mean(v)^T
            #   = K^T (a * (V - mean(v))): InLine's centring by algebra, alpha folded into V
            out = ReweightedInLineCore.apply(q, k, v, q_mean, v_mean, self.scale, local)
            return out.view(B, H, n, d)
        # alpha = 1: sum_j (k_j - mean k) v_j^T = K^T V - N mean(k) mean(v)^T
        kv = k.mT @ v - n * k_mean.mT @ v_mean                           # (B, H, d, d)
        # out_i = s/N q_i^T KV + mean_j v_j  (eq. 5, s/N the module's scale)
        out = read_buffer(q, self.scale / n * kv, v_mean).view(B, H, n, d)
        if local is not None:
            out[:, :, n - local.shape[2]:].add_(local)                   # class token: none
        return out

    def fast_local_residual(self, v, r, plain=None):
        """local_residual() from the head-split values v (B, H, N, d) and the kernels r
        (B*C, 1, w, w): the depthwise convolution on a channels-last map -> (B, H, H*W, d).
        plain (default: on CUDA): the map copied to the usual (1, B*C, S, S) layout first."""
        B, H, N, d = v.shape
        side, cls = locality.grid_size(N)
        # (1, B*C, S, S) in channels_last memory = (S, S, B, H, d): one copy, then the fast kernel
        v_map = v[:, :, cls:].permute(2, 0, 1, 3).reshape(1, side, side, B * H * d)
        v_map = v_map.permute(0, 3, 1, 2)  # measured fastest on CPU; a GPU's is untimed so far
        v_map = v_map.contiguous() if (v.is_cuda if plain is None else plain) else v_map
        out = F.conv2d(v_map, r, padding=self.window // 2, groups=B * H * d)
        return out.permute(0, 2, 3, 1).reshape(side * side, B, H, d).permute(1, 2, 0, 3)

    def shifted_local_residual(self, v, r):
        """The same as a sum of w*w shifted products, local_p = sum_o r_o * v_{p+o} (zero outside
        the grid): what forward() uses under torch.compile, which fuses the w*w products into one
        loop (measured faster there than its convolution; in eager, the convolution is faster)."""
        B, H, N, d = v.shape
        side, cls = locality.grid_size(N)
        w, p = self.window, self.window // 2
        v_map = F.pad(v[:, :, cls:].reshape(B, H, side, side, d), (0, 0, p, p, p, p))
        r = r.view(B, H, d, w, w)                                  # channel c = (head, j)
        out = 0
        for a in range(w):
            for b in range(w):                                     # offset (a - p, b - p)
                out = out + v_map[:, :, a:a + side, b:b + side] * r[..., a, b][:, :, None, None]
        return out.reshape(B, H, side * side, d)

    def forward(self, x):
        if self.kernel != "identity":  # the shortcuts need phi linear: mean phi(q) = phi(mean q)
            return self.reference(x)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        B, N, C = x.shape
        H, d = self.num_heads, self.head_dim
        if self.residual is not None:
            locality.grid_size(N)  # N must be a grid: fail here with its message
        x_mean = x.mean(dim=1)                                     # (B, C)
        # one GEMM, then each of q, k, v head-split by one copy (and the GEMM's output freed); in
        # backward, unbind's gradient stacks the three straight back into its (B, N, 3, H, d) layout
        q, k, v = (t.transpose(1, 2).contiguous()                  # (B, H, N, d) each
                   for t in self.qkv(x).view(B, N, 3, H, d).unbind(2))
        # mean_i (x_i W^T + b) = mean(x) W^T + b: the means of q, k, v from the mean token
        q_mean, k_mean, v_mean = self.qkv(x_mean).view(B, 3, H, 1, d).transpose(0, 1).unbind(0)
        local = None
        if self.residual is not None:
            # under torch.compile the shifted products, which the compiler fuses; else the conv
            local_residual = (self.shifted_local_residual if torch.compiler.is_compiling()
                              else self.fast_local_residual)
            local = local_residual(v, self.residual_kernels(x_mean))     # (B, H, M, d), M patches
        out = linear.in_float32(self.fast_attend, q, k, v, q_mean, k_mean, v_mean, local)
        out = out.transpose(1, 2)                                  # (B, N, H, d), a view
        if self.gate is not None:
            # the gate o = x W_g^T + b_g, per channel; the product writes the merged layout
            # (B, N, H, d) = (B, N, C) (o first: the output takes its memory order)
            out = self.gate(x).view(B, N, H, d) * out
        return self.proj_drop(self.proj(out.reshape(B, N, C)))   # merge the heads


# ----------------------------------------------------------------------------------------------
# demo: rank tables


def background_scene(n, d, objects, generator):
    """q, k, v (1, 1, n, d) of a scene where `objects` distinct tokens are drowned by n - objects
    near-copies of one background token, and every query looks for the objects (along e_0)."""
    r = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)  # noqa: E731
    u = torch.zeros(d, dtype=torch.float64)
    u[0] = 1.0
    k = torch.cat([r(1, d) - 2 * u + 0.05 * r(n - objects, d), r(objects, d) + 3 * u])
    v = torch.cat([r(1, d) + 0.05 * r(n - objects, d), r(objects, d)])
    q = 3 * u + 0.5 * r(n, d)
    return q[None, None], k[None, None], v[None, None]


def rank_of(m, rtol):
    """{"numerical", "effective", "singular_values"} of one matrix (singular values descending)."""
    return {"numerical": int(numerical_rank(m, rtol)), "effective": float(effective_rank(m)),
            "singular_values": torch.linalg.svdvals(m.double())}


def ranks(r):
    """A rank_of result as the tables print it: numerical rank, then effective rank."""
    return f"{r['numerical']:>4d} {r['effective']:>7.2f}"


def rank_scenes(n, d, objects, generator):
    """The two one-head scenes of the tables: {name: (q, k, v)}, each (1, 1, n, d)."""
    random = torch.randn(3, 1, 1, n, d, generator=generator, dtype=torch.float64)
    return {"random tokens": tuple(random),
            f"background + {objects} objects": background_scene(n, d, objects, generator)}


def kv_buffer_ranks(scenes, rtol):
    """Table 1: {scene: {"plain": sum_j phi(k_j) v_j^T, "alpha": sum_j alpha_j phi(k_j) v_j^T}},
    phi = ELU + 1, each as rank_of."""
    elu = lambda x: linear.feature_map(x, "elu")  # noqa: E731
    out = {}
    for name, (q, k, v) in scenes.items():
        plain = linear.kv_buffer(elu(k), v)                               # (1, 1, d, d)
        alpha = linear.kv_buffer(reweighted_keys(elu(q), elu(k)), v)      # (1, 1, d, d)
        out[name] = {"plain": rank_of(plain[0, 0], rtol), "alpha": rank_of(alpha[0, 0], rtol)}
    return out


def head_output_ranks(scenes, rtol):
    """Table 2: {attention: {scene: rank_of(the N x d output of one head)}}."""
    fns = {"softmax": softmax.softmax_attention,
           "linear (ELU+1)": lambda q, k, v: linear.linear_attention(q, k, v, "elu"),
           "InLine": lambda q, k, v: injective.inline_attention(q, k, v, scale=q.shape[-1] ** -0.5
                                                                / q.shape[-2]),
           "RALA": rala_attention}
    return {name: {scene: rank_of(fn(*qkv)[0, 0], rtol) for scene, qkv in scenes.items()}
            for name, fn in fns.items()}


# table 3: every module of steps 01-05 (by attentions.py's names), then the final one's parts off
MODULE_VARIANTS = [
    ("softmax", softmax.SoftmaxAttention, {}), ("linear", linear.LinearAttention, {}),
    ("injective", injective.InjectiveLinearAttention, {}), ("inline", locality.InLineAttention, {}),
    ("rala", RALAttention, {}), ("final", RankAugmentedInLineAttention, {}),
    ("final, reweight off", RankAugmentedInLineAttention, {"reweight": False}),
    ("final, gate off", RankAugmentedInLineAttention, {"gate": False}),
    ("final, local off", RankAugmentedInLineAttention, {"local": False})]


def module_output_ranks(x, seed, rtol):
    """Table 3: {module: rank_of(its N x C output on x (1, N, C))}, every module freshly
    initialised from the same seed (so they share the qkv / proj weights)."""
    out = {}
    for name, cls, kw in MODULE_VARIANTS:
        torch.manual_seed(seed)  # the same qkv / proj weights for every module
        with torch.no_grad():
            y = cls(x.shape[-1], num_heads=6, **kw).double()(x)[0]   # (N, C)
        out[name] = rank_of(y, rtol)
    return out


def plot_spectra(panels, rtol, title, path):
    """sigma_i / sigma_1 of rank_of results on a log scale, one panel per (title, curves), each
    curve (label, rank_of result, line style), and the tolerance of the numerical rank."""
    from matplotlib.figure import Figure  # not pyplot: no window, nothing process-wide
    fig = Figure(figsize=(5.5 * len(panels), 3.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (name, curves) in zip(axes, panels):
        for label, r, style in curves:
            sv = r["singular_values"] / r["singular_values"][0]
            ax.semilogy(range(1, len(sv) + 1), sv, **style,
                        label=f"{label}: rank {r['numerical']}, eff. {r['effective']:.2f}")
        ax.axhline(rtol, color="0.5", ls=":", lw=1, label=f"rtol {rtol:g} (numerical rank)")
        ax.set_title(name, fontsize=10)
        ax.set(xlabel="singular value index i", ylabel="sigma_i / sigma_1")
        ax.legend(fontsize=7.5, loc="lower left")
    fig.suptitle(title, fontsize=10)
    injective.save_png(fig, path)
    return fig


def plot_kv_spectra(kv, rtol, path):
    """The KV buffers' singular values, plain vs alpha-re-weighted, one panel per scene."""
    kinds = [("plain", "sum_j phi(k_j) v_j^T", "tab:blue"),
             ("alpha", "sum_j alpha_j phi(k_j) v_j^T (RALA)", "tab:red")]
    panels = [(scene, [(label, pair[key], {"marker": ".", "color": color})
                       for key, label, color in kinds]) for scene, pair in kv.items()]
    d = len(next(iter(kv.values()))["plain"]["singular_values"])
    return plot_spectra(panels, rtol, f"Singular values of one head's d x d KV buffer (phi = ELU"
                        f" + 1, d = {d}): alpha re-weighting spreads the spectrum where many tokens"
                        " look alike,\nnot on random tokens (eff.: exp of their entropy)", path)


def plot_output_spectra(mods, rtol, path):
    """Each module's N x C output's singular values: the six modules, and the final module with
    each of its parts off."""
    ablations = [name for name in mods if name.startswith("final,")]
    panels = [("the modules of steps 01-05", [n for n in mods if n not in ablations]),
              ("the final module with one part off", ["final"] + ablations)]
    panels = [(title, [(n, mods[n], {"lw": 1.5, "ls": "--" if n == "final, reweight off" else "-"})
                       for n in names]) for title, names in panels]
    return plot_spectra(panels, rtol, "Singular values of each module's N x C output (untrained,"
                        " 6 heads, C = 192, on a smooth 14x14 token map + class token)", path)


def show_ranks(args):
    g = torch.Generator().manual_seed(args.seed)
    n, d, rtol = args.tokens, args.head_dim, args.rtol
    scenes = rank_scenes(n, d, args.objects, g)
    print(f"Rank = numerical rank (singular values > {rtol:g} x the largest) and effective rank"
          f"\n(exp of the entropy of the normalised singular values). One head, N = {n}, d = {d}.")
    print(f"\n1) The d x d KV buffer, phi = ELU + 1 (max rank {d})")
    print(f"   {'scene':28s} | {'sum_j phi(k_j) v_j^T':>21} | {'sum_j alpha_j phi(k_j) v_j^T':>28}")
    kv = kv_buffer_ranks(scenes, rtol)
    for name, r in kv.items():
        print(f"   {name:28s} | {'':>9}{ranks(r['plain'])} | {'':>16}{ranks(r['alpha'])}")
    print(f"\n2) The N x d output of one head, same inputs (max rank {d})")
    print(f"   {'attention':16s} | " + " | ".join(f"{s:>28s}" for s in scenes))
    heads = head_output_ranks(scenes, rtol)
    for name, per_scene in heads.items():
        print(f"   {name:16s} | " + " | ".join(f"{'':>16}{ranks(r)}" for r in per_scene.values()))

    side = 14
    x = locality.smooth_map_tokens(side, 192, 4, g)[None]  # (1, 197, 192), class token first
    print(f"\n3) The N x C output of each module (C = 192, 6 heads, freshly initialised, max rank"
          f" 192) on\n   a {side}x{side} token map + class token whose neighbours are alike")
    mods = module_output_ranks(x, args.seed, rtol)
    for name, r in mods.items():
        print(f"   {name:20s} {ranks(r)}")
    print("   1) The plain buffer collapses towards rank 1 where tokens (so values) are alike,"
          "\n   not on zero-mean random tokens; alpha lifts it there and lowers it on random ones."
          "\n   2) Every output is N x d, softmax's too; ELU+1's phi(q_i) share a common part, so"
          "\n   its outputs collapse even on random tokens. 3) Before any training the gate and the"
          "\n   local terms lift a module's output rank; re-weighting barely moves it (alpha ~ 1).")
    out = {"kv_buffer": kv, "head_outputs": heads, "module_outputs": mods}
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        paths = [os.path.join(args.plot, f) for f in ("kv_spectra.png", "output_spectra.png")]
        out["figures"] = {paths[0]: plot_kv_spectra(kv, rtol, paths[0]),
                          paths[1]: plot_output_spectra(mods, rtol, paths[1])}
        print("\n" + "\n".join(f"wrote {path}" for path in paths))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Step 05: rank, RALA and the final module.")
    p.add_argument("--tokens", type=int, default=197, help="N for the rank tables")
    p.add_argument("--head-dim", type=int, default=32, help="d for the rank tables")
    p.add_argument("--objects", type=int, default=12, help="distinct tokens (objects) of the scene")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of numerical rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="DIR", help="also draw DIR/{kv,output}_spectra.png")
    args = p.parse_args(argv)
    if args.plot and os.path.exists(args.plot) and not os.path.isdir(args.plot):
        p.error(f"--plot {args.plot}: exists and is not a directory")
    return show_ranks(args)


if __name__ == "__main__":
    main()
