import pytest
import torch

from conftest import assert_close, load, rand

la = load("02_linear_attention")
bench = load("tools.bench")  # the memory measurement (a tool)

# Every kernel of the registry is tested: a kernel a student adds to KERNELS runs through the
# same tests. The kernels of the papers are also written out here, independently of the code.
KERNELS = sorted(la.KERNELS)
UNKNOWN = "no_such_kernel"
PHI = {
    "identity": lambda x: x,
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "leaky_relu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "elu": lambda x: torch.where(x > 0, x + 1, torch.exp(x)),  # ELU(x) + 1, RALA's kernel
    "exp": lambda x: torch.exp(0.2 * x),  # exp_kernel(x, t=0.2) in the official InLine code
}
LINEAR = ("linear attention (step 02): w_ij = phi(q_i).phi(k_j) / (sum_t phi(q_i).phi(k_t) + eps),"
          " out_i = sum_j w_ij v_j")


def positive(kernel):
    """Whether phi(x) >= 0 everywhere (tried on a spread of values): then the weights are >= 0."""
    return bool((la.feature_map(torch.linspace(-30, 30, 601, dtype=torch.float64), kernel) >= 0).all())


def qkv(kernel, B=2, H=3, N=17, d=6):
    # a kernel that can be negative (identity, ...): shift q, k so that phi(q_i) . sum_t phi(k_t)
    # stays well away from 0
    s = 0.0 if positive(kernel) else 1.0
    return rand(B, H, N, d, seed=1, shift=s), rand(B, H, N, d, seed=2, shift=s), rand(B, H, N, d, seed=3)


def test_the_papers_kernels_are_registered():
    assert set(PHI) <= set(la.KERNELS), f"missing kernels: {set(PHI) - set(la.KERNELS)}"
    assert UNKNOWN not in la.KERNELS


@pytest.mark.parametrize("kernel", KERNELS)
def test_feature_map(kernel):
    x = rand(4, 5, seed=9)
    y = la.feature_map(x, kernel)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    # elementwise: each entry depends on that entry only
    assert torch.allclose(torch.stack([la.feature_map(e, kernel) for e in x.flatten()]).reshape(x.shape), y)
    if kernel in PHI:  # one of the papers' kernels: its formula, written out
        assert_close(y, PHI[kernel](x), f"kernel {kernel!r} (step 02's docstring)", atol=1e-15)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_equals_explicit_formula(kernel):
    q, k, v = qkv(kernel)
    fq, fk = la.feature_map(q, kernel), la.feature_map(k, kernel)  # checked by test_feature_map
    sim = torch.einsum("bhid,bhjd->bhij", fq, fk)
    w = sim / (sim.sum(-1, keepdim=True) + 1e-6)
    assert_close(la.linear_attention_weights(q, k, kernel), w, LINEAR + f", kernel {kernel!r}",
                 atol=1e-12)
    out = torch.einsum("bhij,bhjd->bhid", w, v)
    assert_close(la.linear_attention(q, k, v, kernel), out,
                 "phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1) must equal " + LINEAR
                 + f", kernel {kernel!r}", atol=1e-10)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if positive(k)])
def test_weights_sum_to_one_for_positive_kernels(kernel):
    q, k, _ = qkv(kernel)
    q = q.abs()  # a ReLU query with no positive entry scores 0 against every key (0 / 0)
    w = la.linear_attention_weights(q, k, kernel, eps=0.0)
    assert (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]), atol=1e-12)


def test_associativity():
    A, B, C = rand(40, 7, seed=4), rand(7, 40, seed=5), rand(40, 7, seed=6)
    assert torch.allclose((A @ B) @ C, A @ (B @ C), atol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck(kernel):
    q, k, v = (t[:1, :1, :5, :3].clone().requires_grad_() for t in qkv(kernel))
    assert torch.autograd.gradcheck(lambda a, b, c: la.linear_attention(a, b, c, kernel), (q, k, v))


def test_relu_kernel_cannot_tell_q_from_2q():
    # the scale of a query cancels in the normalisation: the root of step 03
    q, k, _ = qkv("relu")
    q = q.abs()  # a ReLU query with no positive entry scores 0 against every key (0 / 0)
    assert torch.allclose(la.linear_attention_weights(q, k, eps=0.0),
                          la.linear_attention_weights(2 * q, k, eps=0.0), atol=1e-12)


def test_linear_memory_at_65536_tokens():
    # an N x N float32 matrix would need 65536**2 * 4 bytes = 16 GiB
    n = 65536
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    out = {}
    peak = bench.peak_memory(lambda: out.setdefault("y", la.linear_attention(q, k, v)))
    assert out["y"].shape == (1, 1, n, 16) and torch.isfinite(out["y"]).all()
    assert peak < 64 * 2**20  # a few (N, d) tensors of 4 MiB each


def test_module():
    torch.manual_seed(0)
    m = la.LinearAttention(24, num_heads=4, kernel="elu").double()
    x = rand(2, 9, 24, seed=7)
    y = m(x)
    assert y.shape == (2, 9, 24)
    q, k, v = m.split_heads(x)
    ref = m.proj(la.linear_attention(q, k, v, "elu").transpose(1, 2).reshape(2, 9, 24))
    assert_close(y, ref, "LinearAttention: proj(merge_heads(" + LINEAR + "))", atol=1e-12)
    # the kernel option matters
    m.kernel = "relu"
    assert not torch.allclose(m(x), y)


def test_errors():
    q, k, v = qkv("relu")
    with pytest.raises(ValueError, match=f"unknown kernel '{UNKNOWN}'.*'elu'"):
        la.linear_attention(q, k, v, kernel=UNKNOWN)
    with pytest.raises(ValueError, match=f"unknown kernel '{UNKNOWN}'"):
        la.LinearAttention(24, num_heads=4, kernel=UNKNOWN)
    with pytest.raises(ValueError, match="dim=24 is not divisible by num_heads=5"):
        la.LinearAttention(24, num_heads=5)
    with pytest.raises(ValueError, match="attn_drop"):
        la.LinearAttention(24, num_heads=4, attn_drop=0.1)
    with pytest.raises(ValueError, match=r"k must be a \(B, H, N, d\) tensor"):
        la.linear_attention(q, k[0], v)


# ----------------------------------------------------------------------------------------------
# the demo: what it prints is what it computed, and the claims hold


def test_demo_claims_and_printout(capsys):
    from conftest import run_demo
    r, out = run_demo(la, ["--sizes", "16", "32", "--min-time", "0.01"], capsys)
    assert set(r["fast_vs_n_by_n"]) == set(la.KERNELS)
    for kernel, diff in r["fast_vs_n_by_n"].items():
        assert diff < 1e-12, f"phi(Q) (phi(K)^T V) must equal the N x N form, kernel {kernel!r}: {diff:.1e}"
        assert f"kernel {kernel:10s} max |fast - N x N form| = {diff:.1e}" in out
    assert r["multiply_adds"] == {"N x N form": 2 * 197 * 197 * 32, "linear form": 2 * 197 * 32 * 32}
    assert f"2*N*N*d = {2 * 197 * 197 * 32:,}; linear form 2*N*d*d = {2 * 197 * 32 * 32:,}" in out
    # the time table: one row per N, the times it returned and their ratio
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("16", "32")]
    assert [row[0] for row in rows] == ["16", "32"] and list(r["times_ms"]) == [16, 32]
    for row, (t_s, t_l) in zip(rows, r["times_ms"].values()):
        assert row[1:] == ["|", f"{t_s:.2f}", "|", f"{t_l:.2f}", "|", f"{t_s / t_l:.1f}x"]
    faster = [n for n, (t_s, t_l) in r["times_ms"].items() if t_l < t_s]
    if faster:
        assert f"Crossover: linear attention is faster from N = {faster[0]} on" in out
    else:
        assert "not faster at any measured N" in out


# ----------------------------------------------------------------------------------------------
# mistakes the tests above let through (tools/mutants.py): each test names the one it catches


def test_in_float32_reads_the_first_tensor_and_turns_autocast_off():
    """The dtype comes from the first tensor (the others may be None), half inputs are computed in
    float32 with autocast off inside (enabled=True would cast the matmuls down again), the result
    comes back in the first tensor's dtype; float64 passes through as it is."""
    seen = {}

    def core(a, b, c, scale=1.0):
        seen.update(dtypes=(a.dtype, b.dtype), c=c, autocast=torch.is_autocast_enabled("cpu"), scale=scale)
        return a * scale + b.to(a.dtype)

    h = rand(2, 3, seed=1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = la.in_float32(core, h, h.half(), None, scale=2.0)
    assert out.dtype == torch.bfloat16, "the result comes back in the first tensor's dtype"
    assert seen == {"dtypes": (torch.float32, torch.float32), "c": None, "autocast": False, "scale": 2.0}
    # the device comes from the first tensor too (autocast has no meta device: it would raise)
    meta = torch.empty(2, 3, device="meta", dtype=torch.float16)
    assert la.in_float32(lambda a, b: 2 * a, h, meta).dtype == torch.bfloat16
    x = rand(2, 3, seed=2)
    out = la.in_float32(core, x, x.float(), None)     # not under autocast: none inside either
    assert out.dtype == torch.float64 and seen["dtypes"] == (torch.float64, torch.float32)
    assert seen["autocast"] is False
    assert_close(out, x + x.float().double(), "in_float32 passes float64 through", atol=1e-6)


def test_module_core_in_float32_is_exact_to_float32():
    # no autocast inside attend(): float32 inputs give float32 accuracy (bf16 matmuls: ~1e-2 off)
    m = la.LinearAttention(24, num_heads=4, kernel="elu")
    q, k, v = (t.float() for t in qkv("elu", H=4, d=6))
    assert_close(m.attend(q, k, v).double(), la.linear_attention(*(t.double() for t in (q, k, v)), "elu"),
                 "LinearAttention.attend in float32 = " + LINEAR + " in float64", atol=1e-5)


def test_default_heads_are_timms():
    assert la.LinearAttention(64).num_heads == 8 and la.LinearAttention(64).kernel == "relu"


def test_demo_reports_the_largest_error(monkeypatch):
    """associativity() reports max |fast - N x N form|: one entry of the fast form off by 1e-3
    must show, for every kernel (a .min() or a mean hides it)."""
    fast = la.linear_attention

    def one_entry_off(*args, **kwargs):
        out = fast(*args, **kwargs).clone()
        out.view(-1)[7] += 1e-3
        return out

    monkeypatch.setattr(la, "linear_attention", one_entry_off)
    for kernel, diff in la.associativity(n=20, d=4)["fast_vs_n_by_n"].items():
        assert abs(diff - 1e-3) < 1e-9, f"kernel {kernel!r}: the demo must report the largest difference"
