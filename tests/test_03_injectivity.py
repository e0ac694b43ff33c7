import pytest
import torch

from conftest import assert_close, load, rand

sm = load("01_softmax_attention")
la = load("02_linear_attention")
inj = load("03_injectivity")

KERNELS = sorted(la.KERNELS)  # every registered kernel, a student's new one included
EQ5 = "eq. 5 of InLine: w_ij = s (phi(q_i).phi(k_j) - mean_t phi(q_i).phi(k_t)) + 1/N"



def explicit_inline_weights(q, k, phi, scale):
    """Eq. 5 element by element: w_ij = s (phi(q_i).phi(k_j) - mean_t phi(q_i).phi(k_t)) + 1/N."""
    B, H, M, d = q.shape
    N = k.shape[-2]
    w = torch.empty(B, H, M, N, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(M):
                sims = [float(phi(q[b, h, i]) @ phi(k[b, h, j])) for j in range(N)]
                mean = sum(sims) / N
                for j in range(N):
                    w[b, h, i, j] = scale * (sims[j] - mean) + 1.0 / N
    return w


@pytest.mark.parametrize("kernel", KERNELS)
def test_weights_match_eq5(kernel):
    q, k = rand(2, 2, 6, 4, seed=1), rand(2, 2, 6, 4, seed=2)
    phi = lambda x: la.feature_map(x, kernel)  # noqa: E731  (the kernels are checked in test_02)
    ref = explicit_inline_weights(q, k, phi, 0.37)
    assert_close(inj.inline_attention_weights(q, k, kernel, scale=0.37), ref,
                 EQ5 + f", kernel {kernel!r}", atol=1e-13)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_equals_n_by_n_form(kernel):
    q, k, v = rand(2, 3, 40, 8, seed=3), rand(2, 3, 40, 8, seed=4), rand(2, 3, 40, 8, seed=5)
    w = inj.inline_attention_weights(q, k, kernel, scale=0.05)
    assert_close(inj.inline_attention(q, k, v, kernel, scale=0.05), w @ v,
                 "InLine's linear form s phi(Q) (phi(K) - mean phi(K))^T V + mean V must equal "
                 + EQ5 + f" times V, kernel {kernel!r}", atol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_sum_to_one(kernel):
    w = inj.inline_attention_weights(rand(1, 2, 30, 8, seed=6), rand(1, 2, 30, 8, seed=7), kernel, scale=0.3)
    assert_close(w.sum(-1), torch.ones(1, 2, 30, dtype=torch.float64),
                 "the rows of " + EQ5 + " sum to 1", atol=1e-12)


def test_weights_can_be_negative():
    w = inj.inline_attention_weights(rand(1, 1, 50, 8, seed=8), rand(1, 1, 50, 8, seed=9), scale=0.2)
    assert (w < 0).any()


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck(kernel):
    q, k, v = (rand(1, 1, 5, 3, seed=s).requires_grad_() for s in (10, 11, 12))
    assert torch.autograd.gradcheck(lambda a, b, c: inj.inline_attention(a, b, c, kernel, 0.7), (q, k, v))


def test_collinear_queries_collide_for_linear_not_for_inline():
    k = rand(1, 1, 50, 8, seed=13)
    q = rand(1, 1, 1, 8, seed=14).abs()  # positive, so ReLU keeps every coordinate
    for c in (0.5, 2.0, 7.0):
        qs = torch.cat([q, c * q], dim=2)  # (1, 1, 2, 8): q and c q
        w_lin = la.linear_attention_weights(qs, k, "relu", eps=0.0)[0, 0]
        assert torch.allclose(w_lin[0], w_lin[1], atol=1e-14)  # identical: confusion
        w_inl = inj.inline_attention_weights(qs, k, "identity", scale=8 ** -0.5 / 50)[0, 0]
        assert (w_inl[0] - w_inl[1]).abs().max() > 1e-3      # distinguished
        # and InLine's difference is exactly the centred similarity, scaled: w(cq) - w(q) = (c-1)(w(q) - 1/N)
        assert torch.allclose(w_inl[1] - w_inl[0], (c - 1) * (w_inl[0] - 1 / 50), atol=1e-14)


def test_inline_is_injective_on_random_queries():
    # w(q) = s (K - mean K) q + 1/N: with N - 1 >= d generic keys the map q -> w(q) is invertible
    k = rand(1, 1, 40, 8, seed=15)
    q = rand(1, 1, 20, 8, seed=16)
    w = inj.inline_attention_weights(q, k, scale=0.1)[0, 0]      # (20, 40)
    kc = (k - k.mean(-2, keepdim=True))[0, 0]                     # (40, 8)
    q_back = torch.linalg.lstsq(kc, ((w - 1 / 40) / 0.1).T).solution.T
    assert torch.allclose(q_back, q[0, 0], atol=1e-10)


# ----------------------------------------------------------------------------------------------
# the paper's three propositions on injectivity, one case each, with the conditions step 03 states

SPAN_ONLY = [[1.0, 0.0], [0.0, 1.0]]               # span R^2, but rank([K, 1]) = 2 < d + 1
WITH_ONES = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]   # rank([K, 1]) = 3 = d + 1


def keys(rows):
    k = torch.tensor(rows, dtype=torch.float64)
    ones = torch.ones(len(rows), 1, dtype=torch.float64)
    return k[None, None], int(torch.linalg.matrix_rank(torch.cat([k, ones], dim=1)))


def test_softmax_is_injective_exactly_under_the_rank_condition_on_keys_and_ones():
    q = torch.tensor([[[[1.0, 1.0], [2.0, 2.0]]]], dtype=torch.float64)   # q and 2q, not equal
    k, rank = keys(SPAN_ONLY)
    assert rank == 2
    w = sm.softmax_attention_weights(q, k)[0, 0]
    # the logits move by the same amount for every key, which softmax ignores: confusion
    assert torch.allclose(w, torch.full((2, 2), 0.5, dtype=torch.float64), atol=1e-15)
    k, rank = keys(WITH_ONES)
    assert rank == 3
    w = sm.softmax_attention_weights(q, k)[0, 0]
    assert (w[0] - w[1]).abs().max() > 0.05
    # and q is recovered from its weights: log w_j - log w_1 = s q.(k_j - k_1), k_j - k_1 span R^2
    qs = rand(1, 1, 6, 2, seed=20)
    logw = sm.softmax_attention_weights(qs, k)[0, 0].log()           # (6, 3)
    diffs = (k[0, 0, 1:] - k[0, 0, :1]) * 2 ** -0.5                  # s (k_j - k_1), (2, 2)
    q_back = torch.linalg.solve(diffs, (logw[:, 1:] - logw[:, :1]).T).T
    assert torch.allclose(q_back, qs[0, 0], atol=1e-12)


def test_linear_attention_is_not_injective_for_a_kernel_that_is_not_homogeneous():
    # phi = exp (official: exp(0.2 x)) is no ReLU: yet phi(q + t 1) = e^(0.2 t) phi(q), a
    # multiple of phi(q), which the division cancels: q and q + t (1, ..., 1) collide
    k = rand(1, 1, 30, 6, seed=21)
    q = rand(1, 1, 1, 6, seed=22)
    qs = torch.cat([q, q + 1.0, q - 3.0], dim=2)                     # (1, 1, 3, 6), distinct
    w = la.linear_attention_weights(qs, k, "exp", eps=0.0)[0, 0]
    assert torch.allclose(w[0], w[1], atol=1e-15) and torch.allclose(w[0], w[2], atol=1e-15)
    assert (sm.softmax_attention_weights(qs, k)[0, 0].diff(dim=0).abs().max()) > 1e-3


def test_inline_is_injective_exactly_under_the_rank_condition():
    q = torch.tensor([[[[1.0, 1.0], [2.0, 2.0]]]], dtype=torch.float64)
    k, _ = keys(SPAN_ONLY)   # the centred keys (0.5, -0.5), (-0.5, 0.5) span only a line
    w = inj.inline_attention_weights(q, k, "identity", scale=0.3)[0, 0]
    assert torch.allclose(w, torch.full((2, 2), 0.5, dtype=torch.float64), atol=1e-15)
    k, _ = keys(WITH_ONES)   # the centred keys span R^2: q is recovered from its weights
    w = inj.inline_attention_weights(q, k, "identity", scale=0.3)[0, 0]
    kc = (k - k.mean(-2, keepdim=True))[0, 0]                        # (3, 2)
    q_back = torch.linalg.lstsq(kc, ((w - 1 / 3) / 0.3).T).solution.T
    assert torch.allclose(q_back, q[0, 0], atol=1e-12)
    # phi itself must be injective too: ReLU forgets negative coordinates, and so does InLine-relu
    qn = torch.tensor([[[[1.0, -1.0], [1.0, -5.0]]]], dtype=torch.float64)
    w = inj.inline_attention_weights(qn, k, "relu", scale=0.3)[0, 0]
    assert torch.allclose(w[0], w[1], atol=1e-15)


def test_module_formula_and_scale():
    torch.manual_seed(0)
    m = inj.InjectiveLinearAttention(48, num_heads=6).double()
    assert m.kernel == "identity"
    x = rand(2, 17, 48, seed=17)
    q, k, v = m.split_heads(x)
    w = inj.inline_attention_weights(q, k, scale=8 ** -0.5 / 17)   # head_dim**-0.5 / N
    ref = m.proj((w @ v).transpose(1, 2).reshape(2, 17, 48))
    assert_close(m(x), ref, "InjectiveLinearAttention: proj(merge_heads(" + EQ5
                 + " times V)), s = head_dim**-0.5 / N", atol=1e-12)
    assert inj.InjectiveLinearAttention(48, num_heads=6, kernel="relu").kernel == "relu"


def test_errors():
    with pytest.raises(ValueError, match="dim=10 is not divisible by num_heads=4"):
        inj.InjectiveLinearAttention(10, num_heads=4)
    with pytest.raises(ValueError, match="unknown kernel 'no_such_kernel'"):
        inj.InjectiveLinearAttention(16, num_heads=4, kernel="no_such_kernel")
    with pytest.raises(ValueError, match=r"v .* must have the B, H, N of k"):
        inj.inline_attention(rand(1, 1, 5, 3), rand(1, 1, 5, 3), rand(1, 1, 4, 3))


# ----------------------------------------------------------------------------------------------
# the demo: what it prints is what it computed, and the claims hold (at the default sizes)


def test_demo_claims_and_printout(capsys):
    from conftest import run_demo
    r, out = run_demo(inj, [], capsys)
    pairs = r["collisions"]["pairs"]
    # q vs 2q: every linear kernel is blind to the scale, softmax and InLine are not
    for name in ("linear-relu", "linear-identity"):
        assert pairs[name]["q vs 2q"] == 0.0, f"{name}: linear attention gives q and 2q the same weights"
    for name in ("softmax", "inline-identity", "inline-relu"):
        assert pairs[name]["q vs 2q"] > 1e-3, f"{name} must tell q from 2q"
    # q vs q_neg (only the coordinates ReLU zeroes differ): only the ReLU kernels are blind
    for name in ("linear-relu", "inline-relu"):
        assert pairs[name]["q vs q_neg"] == 0.0, name
    for name in ("softmax", "linear-identity", "inline-identity"):
        assert pairs[name]["q vs q_neg"] > 1e-3, name
    ab = r["collisions"]["relu_ab"]
    assert abs(ab["cosine"]) < 0.9, "q and q' must not be collinear"
    assert ab["linear"] < 1e-12 and ab["softmax"] > 1e-2
    # the confusion count: exactly the pairs that share a direction, for linear attention only
    conf = r["confusion"]
    assert conf["queries"] == 64 * 4 and conf["pairs"] == 256 * 255 // 2
    assert conf["same direction pairs"] == 64 * 6
    for name, count in conf["confused"].items():
        expected = conf["same direction pairs"] if name.startswith("linear") else 0
        assert count == expected, f"{name}: {count} confused pairs, expected {expected}"
    p = r["inline"]
    assert p["row_sum_error"] < 1e-12 and p["fast_vs_n_by_n"] < 1e-12
    assert 0 < p["negative_share"] < 0.5 and p["min"] < 0
    # the printout shows these numbers
    for name, pair in pairs.items():
        assert f"{name:18s} {pair['q vs 2q']:>10.2e} {pair['q vs q_neg']:>11.2e}" in out
    assert f"differing by {ab['linear']:.2e}; softmax: {ab['softmax']:.2e}" in out
    for name, count in conf["confused"].items():
        assert f"{name:18s} {count:>6}" in out
    assert f"{100 * p['negative_share']:.0f}% of them are negative" in out
    assert "figure1" not in r and "Fig. 1" not in out  # figures only with --plot


def test_figure1_numbers():
    fig1 = inj.figure1()
    assert list(fig1) == ["a", "b"]
    for key, setting in fig1.items():
        w = setting["weights"]
        assert list(w) == ["softmax", "linear", "InLine"] and all(m.shape == (4, 4) for m in w.values())
        for name, m in w.items():
            assert torch.allclose(m.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-12), (key, name)
        assert inj.row_spread(w["linear"]) < 1e-12, f"({key}): linear attention's rows must be identical"
        assert inj.row_spread(w["softmax"]) > 0.1 and inj.row_spread(w["InLine"]) > 0.1, key
    q = fig1["a"]["queries"]
    assert torch.allclose(q[:, 0] * q[0, 1] - q[:, 1] * q[0, 0], torch.zeros(4, dtype=torch.float64))  # collinear
    q, A, b = fig1["b"]["queries"], fig1["b"]["A"], fig1["b"]["b"]
    phi = torch.relu(q @ A.T + b)
    c = torch.tensor(inj.FIG1_LENGTHS, dtype=torch.float64)
    assert torch.allclose(phi, c[:, None] * phi[1], atol=1e-12), "(b): phi(q_i) = c_i phi(q)"
    cross = q[:, 0] * q[1, 1] - q[:, 1] * q[1, 0]
    assert cross.abs().max() > 0.5, "(b): the queries must not be collinear"


def test_plot_writes_figure1(tmp_path, capsys):
    from conftest import png_size, run_demo
    r, out = run_demo(inj, ["--tokens", "40", "--dim", "8", "--directions", "4",
                            "--plot", str(tmp_path / "figs")], capsys)
    path = str(tmp_path / "figs" / "fig1_injectivity.png")
    assert list(r["figures"]) == [path] and f"wrote {path}" in out
    assert png_size(path) == (1300, 760)
    # the six maps drawn are the returned weights, and their cells print those values
    fig = r["figures"][path]
    drawn = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    expected = [w for s in r["figure1"].values() for w in s["weights"].values()]
    assert len(drawn) == len(expected) == 6
    for d, w in zip(drawn, expected):
        assert torch.allclose(torch.as_tensor(d.data), w)
    cells = [t.get_text() for ax in fig.axes if ax.images for t in ax.texts]
    assert cells == [f"{float(v):.2f}" for w in expected for v in w.flatten()]


@pytest.mark.parametrize("step", ["03_injectivity", "04_local_residual", "05_rank_augmentation"])
def test_plot_into_a_file_is_a_clear_error(step, tmp_path, capsys):
    f = tmp_path / "not_a_dir"
    f.write_text("")
    with pytest.raises(SystemExit):
        load(step).main(["--plot", str(f)])
    assert f"--plot {f}: exists and is not a directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# mistakes the tests above let through (tools/mutants.py): each test names the one it catches


def test_default_scale_is_eq5s_s_equal_1():
    q, k, v = rand(1, 2, 6, 4, seed=30), rand(1, 2, 7, 4, seed=31), rand(1, 2, 7, 3, seed=32)
    w = inj.inline_attention_weights(q, k)
    assert_close(w, explicit_inline_weights(q, k, lambda x: x, 1.0), EQ5 + ", default s = 1", atol=1e-13)
    assert_close(inj.inline_attention(rand(1, 2, 7, 4, seed=30), k, v),
                 inj.inline_attention_weights(rand(1, 2, 7, 4, seed=30), k) @ v,
                 "InLine's linear form, default s = 1", atol=1e-12)


def test_module_weights_and_buffer_use_the_modules_scale():
    # N = 17 tokens, head_dim 8: s = 8**-0.5 / 17 (a scale without / N, or / d, is another s)
    torch.manual_seed(0)
    m = inj.InjectiveLinearAttention(48, num_heads=6).double()
    x = rand(2, 17, 48, seed=33)
    q, k, v = m.split_heads(x)
    w = m.attention_weights(x)
    assert_close(w, explicit_inline_weights(q, k, lambda t: t, 8 ** -0.5 / 17),
                 "InjectiveLinearAttention.attention_weights: " + EQ5 + ", s = head_dim**-0.5 / N",
                 atol=1e-13)
    assert_close(w @ v, m.attend(q, k, v), "attend(q, k, v) = attention_weights(x) @ v", atol=1e-12)
    kc = k - k.mean(dim=-2, keepdim=True)
    assert_close(m.kv_buffer(x), torch.einsum("bhnd,bhne->bhde", kc, v),
                 "kv_buffer = sum_j (k_j - mean k) v_j^T", atol=1e-12)
    assert inj.InjectiveLinearAttention(48).num_heads == 8  # timm's default, as steps 01, 02


@pytest.mark.parametrize("name", ["softmax", "linear-relu", "linear-identity", "inline-identity"])
def test_weights_of_is_the_step_functions_one_head(name):
    # M = 3 queries, N = 5 keys, d = 4 (all different): the inline scale is the module's d**-0.5 / N
    q, k = rand(3, 4, seed=34, shift=0.5), rand(5, 4, seed=35, shift=0.5)
    family, _, kernel = name.partition("-")
    expected = {"softmax": lambda: sm.softmax_attention_weights(q[None, None], k[None, None]),
                "linear": lambda: la.linear_attention_weights(q[None, None], k[None, None], kernel, eps=0.0),
                "inline": lambda: inj.inline_attention_weights(q[None, None], k[None, None], kernel,
                                                               scale=4 ** -0.5 / 5)}[family]()[0, 0]
    assert_close(inj.weights_of(name, q, k), expected, f"weights_of({name!r}): (M, N) weights", atol=1e-14)


def test_confusion_pairs_counts_l1_distances_below_tol():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.7, 0.3, 0.0], [0.0, 0.0, 1.0]],
                     dtype=torch.float64)
    # L1 distances: rows 0-1 0.5, 0-2 0.6, 1-2 0.1, row 3 to each other row 2
    assert inj.confusion_pairs(w, 0.5) == 1           # 1-2 only: 0-1 is not *below* 0.5
    assert inj.confusion_pairs(w, 0.55) == 2          # 1-2, 0-1
    assert inj.confusion_pairs(w, 0.65) == 3          # 1-2, 0-1, 0-2
    assert inj.confusion_pairs(w, 2.5) == 6           # every pair of 4 rows
    assert inj.confusion_pairs(w, 0.05) == 0


def test_demo_compares_the_queries_it_says(monkeypatch):
    """collisions(): each attention's rows are q, 2q and q_neg (q's negative coordinates x5), the
    ReLU(A x + b) pair has phi(q') = 2 phi(q), each number is the largest difference of those rows;
    confusion_counts(): unit directions times the lengths, pair counts as whole numbers."""
    calls, weights_of = [], inj.weights_of
    monkeypatch.setattr(inj, "weights_of", lambda name, q, k: calls.append(
        (name, q, weights_of(name, q, k))) or calls[-1][2])
    g = torch.Generator().manual_seed(0)
    k = torch.randn(30, 6, generator=g, dtype=torch.float64)
    col = inj.collisions(k, g)
    assert [c[0] for c in calls] == inj.NAMES + ["linear-identity", "softmax"]
    for name, q, w in calls[:len(inj.NAMES)]:
        assert torch.equal(q[1], 2 * q[0]) and torch.equal(q[2], torch.where(q[0] < 0, 5 * q[0], q[0]))
        assert col["pairs"][name] == {"q vs 2q": float((w[0] - w[1]).abs().max()),
                                      "q vs q_neg": float((w[0] - w[2]).abs().max())}, name
    (_, phi, w_ab), (_, _, w_sm) = calls[len(inj.NAMES):]
    assert_close(phi[1], 2 * phi[0], "phi(q') = 2 phi(q)", atol=1e-12)
    assert (phi > 0).all(), "ReLU(A x + b) = A x + b on these queries: not a ReLU that zeroes them"
    assert col["relu_ab"]["linear"] == float((w_ab[0] - w_ab[1]).abs().max())
    assert col["relu_ab"]["softmax"] == float((w_sm[0] - w_sm[1]).abs().max()) > 1e-2
    calls.clear()
    conf = inj.confusion_counts(k, 5, 1e-3, g, lengths=(0.5, 1.0, 3.0))
    queries = calls[0][1].reshape(5, 3, 6)                          # directions x lengths
    assert_close(queries.norm(dim=-1), torch.tensor([[0.5, 1.0, 3.0]] * 5, dtype=torch.float64),
                 "confusion_counts: unit directions times the lengths", atol=1e-12)
    assert_close(queries / queries.norm(dim=-1, keepdim=True), queries[:, :1].expand(5, 3, 6)
                 / queries[:, :1].norm(dim=-1, keepdim=True), "one direction per group", atol=1e-12)
    assert (conf["pairs"], conf["same direction pairs"]) == (15 * 14 // 2, 5 * 3)
    assert type(conf["pairs"]) is int and type(conf["same direction pairs"]) is int  # printed


def test_inline_properties_reports_the_largest_errors(monkeypatch):
    """inline_properties(): s = d**-0.5 / N (the module's), uniform = 1/N, and the largest
    row-sum error and |fast - N x N form| (one entry off by 1e-3 must show)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(30, 6, generator=g, dtype=torch.float64)
    seen, fast, weights_of = {}, inj.inline_attention, inj.weights_of

    def fast_one_off(q, k, v, scale):
        seen["scale"] = scale
        out = fast(q, k, v, scale=scale).clone()
        out.view(-1)[3] += 1e-3
        return out

    def weights_one_off(name, q, k):
        w = weights_of(name, q, k).clone()
        w.view(-1)[4] += 1e-3
        return w

    monkeypatch.setattr(inj, "inline_attention", fast_one_off)
    monkeypatch.setattr(inj, "weights_of", weights_one_off)
    p = inj.inline_properties(k, g)
    assert abs(seen["scale"] - 6 ** -0.5 / 30) < 1e-15, "s = d**-0.5 / N, the module's scale"
    assert p["uniform"] == 1 / 30
    assert abs(p["fast_vs_n_by_n"] - 1e-3) < 1e-9 and abs(p["row_sum_error"] - 1e-3) < 1e-9
