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
