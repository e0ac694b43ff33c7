import pytest
import torch

from conftest import load, rand

sm = load("01_softmax_attention")
inj = load("03_injectivity")
loc = load("04_local_residual")



def test_grid_size():
    assert loc.grid_size(196) == (14, 0)
    assert loc.grid_size(197) == (14, 1)
    assert loc.grid_size(1) == (1, 0)
    assert loc.grid_size(2) == (1, 1)
    for bad in (0, 3, 198, 200):
        with pytest.raises(ValueError, match=f"N={bad} tokens is not a square grid"):
            loc.grid_size(bad)


def test_local_mass_on_hand_built_weights():
    # 3x3 grid, uniform weights 1/9: a corner sees 4 of 9 tokens in its 3x3 window, an edge 6, the centre 9
    w = torch.full((9, 9), 1 / 9, dtype=torch.float64)
    expected = torch.tensor([4, 6, 4, 6, 9, 6, 4, 6, 4], dtype=torch.float64) / 9
    assert torch.allclose(loc.local_attention_mass(w, 3), expected)
    # window 1 is the query itself
    assert torch.allclose(loc.local_attention_mass(torch.eye(9, dtype=torch.float64), 1), torch.ones(9, dtype=torch.float64))
    # all of query 0's weight on key 8 (opposite corner): outside a 3x3 window, inside a 5x5 one
    w = torch.zeros(9, 9, dtype=torch.float64)
    w[:, 8] = 1.0
    assert loc.local_attention_mass(w, 3)[0] == 0 and loc.local_attention_mass(w, 5)[0] == 1
    # with a class token: its row and column are left out, nothing is renormalised
    w = torch.zeros(10, 10, dtype=torch.float64)
    w[:, 0] = 0.5           # half of every row on the class token
    w[1:, 1:] = 0.5 * torch.eye(9, dtype=torch.float64)  # the other half on the query itself
    assert torch.allclose(loc.local_attention_mass(w, 3), torch.full((9,), 0.5, dtype=torch.float64))
    # batched
    assert loc.local_attention_mass(torch.rand(2, 3, 17, 17), 3).shape == (2, 3, 16)


def test_local_mass_errors():
    with pytest.raises(ValueError, match="window=4"):
        loc.local_attention_mass(torch.eye(9), 4)
    with pytest.raises(ValueError, match="N=8 tokens is not a square grid"):
        loc.local_attention_mass(torch.eye(8), 3)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., N, N\) weights"):
        loc.local_attention_mass(torch.ones(9, 10), 3)


# Every helper of steps 01-04 makes its tensors on its input's device (and in its dtype). Meta
# tensors have a device and no data: a helper that builds, say, a mask on the CPU and combines it
# with CUDA (here: meta) weights stops with a device mismatch, as it would on a GPU.
la = load("02_linear_attention")
HELPERS = {
    "softmax_attention": lambda q, k, v: sm.softmax_attention(q, k, v),
    "softmax_attention_weights": lambda q, k, v: sm.softmax_attention_weights(q, k),
    **{f"linear_attention[{kn}]": (lambda q, k, v, kn=kn: la.linear_attention(q, k, v, kn))
       for kn in la.KERNELS},
    "linear_attention_weights": lambda q, k, v: la.linear_attention_weights(q, k, "elu"),
    "inline_attention": lambda q, k, v: inj.inline_attention(q, k, v, scale=0.1),
    "inline_attention_weights": lambda q, k, v: inj.inline_attention_weights(q, k, scale=0.1),
    "centred_kv_buffer": lambda q, k, v: inj.centred_kv_buffer(k, v),
    "local_attention_mass": lambda q, k, v: loc.local_attention_mass(
        sm.softmax_attention_weights(q, k), 3),
    "InLineAttention.local_residual": lambda q, k, v: loc.InLineAttention(24, num_heads=3).to(
        device="meta", dtype=q.dtype).local_residual(torch.empty(2, 17, 24, **spec(q)), v),
}


def spec(t):
    return {"device": t.device, "dtype": t.dtype}


@pytest.mark.parametrize("name", HELPERS)
def test_helpers_make_their_tensors_on_the_input_device(name):
    q, k, v = (torch.empty(2, 3, 17, 8, device="meta", dtype=torch.float64) for _ in range(3))
    out = HELPERS[name](q, k, v)
    assert out.device.type == "meta" and out.dtype == torch.float64, (name, out.device, out.dtype)


def explicit_local_residual(m, x, v):
    """The residual written out (window w = m.window): out[b, 1+p, c] =
    sum_{|dr|,|dc| <= w//2} kernel[b, c, dr, dc] * vmap[b, c, r+dr, c+dc]."""
    B, N, C = x.shape
    side, cls = loc.grid_size(N)
    w = m.window
    mean = x.mean(dim=1)                                           # (B, C)
    hidden = torch.nn.functional.gelu(m.residual[0](mean[:, :, None]))
    kernel = m.residual[2](hidden)[:, :, 0].reshape(B, C, w, w)    # channel c: outputs w*w*c ..
    vals = v.transpose(1, 2).reshape(B, N, C)[:, cls:].reshape(B, side, side, C)
    out = torch.zeros(B, N, C, dtype=x.dtype)
    for b in range(B):
        for r in range(side):
            for c in range(side):
                acc = torch.zeros(C, dtype=x.dtype)
                for dr in range(-(w // 2), w // 2 + 1):
                    for dc in range(-(w // 2), w // 2 + 1):
                        if 0 <= r + dr < side and 0 <= c + dc < side:
                            acc += kernel[b, :, dr + w // 2, dc + w // 2] * vals[b, r + dr, c + dc]
                out[b, cls + r * side + c] = acc
    return out


@pytest.mark.parametrize("n, window", [(16, None), (17, None), (17, 5)])  # None: the default
def test_inline_module_matches_explicit_formula(n, window):
    torch.manual_seed(0)
    m = loc.InLineAttention(24, num_heads=3, **({} if window is None else {"window": window})).double()
    x = rand(2, n, 24, seed=n)
    q, k, v = m.split_heads(x)
    w = inj.inline_attention_weights(q, k, scale=8 ** -0.5 / n)     # eq. 5, s = head_dim^-0.5 / N
    out = (w @ v).transpose(1, 2).reshape(2, n, 24) + explicit_local_residual(m, x, v)
    assert torch.allclose(m(x), m.proj(out), atol=1e-12)


def test_zeroed_residual_reduces_to_injective_linear_attention():
    torch.manual_seed(0)
    m = loc.InLineAttention(24, num_heads=3).double()
    x = rand(2, 17, 24, seed=3)
    base = inj.InjectiveLinearAttention(24, num_heads=3).double()
    base.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("residual")})
    assert (m(x) - base(x)).abs().max() > 1e-6          # the residual matters...
    with torch.no_grad():
        m.residual[2].weight.zero_()
        m.residual[2].bias.zero_()
    assert torch.allclose(m(x), base(x), atol=1e-14)    # ...and is all that differs


def test_parameter_names_and_inline_deit_t_count():
    m = loc.InLineAttention(192, num_heads=6)
    assert m.window == 3, (f"the official InLine-DeiT-T shapes and 6,477,736 parameters are for "
                           f"window=3; this module's default is window={m.window}")
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "qkv.weight": (576, 192), "qkv.bias": (576,), "proj.weight": (192, 192), "proj.bias": (192,),
        "residual.0.weight": (192, 32, 1), "residual.0.bias": (192,),
        "residual.2.weight": (1728, 32, 1), "residual.2.bias": (1728,),
    }
    extra = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in sm.SoftmaxAttention(192, 3).parameters())
    assert 5_717_416 + 12 * extra == 6_477_736


def test_gradcheck_module():
    torch.manual_seed(0)
    m = loc.InLineAttention(6, num_heads=2).double()
    x = rand(1, 5, 6, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,))


def test_module_errors():
    m = loc.InLineAttention(12, num_heads=3)
    with pytest.raises(ValueError, match="N=15 tokens is not a square grid"):
        m(torch.randn(1, 15, 12))
    with pytest.raises(ValueError, match="dim=12 is not divisible by num_heads=5"):
        loc.InLineAttention(12, num_heads=5)
    with pytest.raises(ValueError, match="window=4: expected a positive odd size"):
        loc.InLineAttention(12, num_heads=3, window=4)


def official_arrangement(m, x):
    """The computation arranged as the official InLine-DeiT code arranges it (class token first,
    scale folded into k and v, 1 - q.mean(k) s times mean(v)); an independent route to the same
    numbers, so a checkpoint trained with that code means the same here."""
    b, n, c = x.shape
    side, hd = int(n ** 0.5), c // m.num_heads
    q, k, v = (t.reshape(b, n, m.num_heads, hd).permute(0, 2, 1, 3) for t in m.qkv(x).split(c, dim=-1))
    s = hd ** -0.5
    kv = (k.transpose(-2, -1) * (s / n) ** 0.5) @ (v * (s / n) ** 0.5)
    out = q @ kv + (1 - q @ k.mean(dim=2, keepdim=True).transpose(-2, -1) * s) * v.mean(dim=2, keepdim=True)
    out = out.transpose(1, 2).reshape(b, n, c)
    w = m.window  # 3 in the official code
    kern = m.residual(x.mean(dim=1)[:, :, None]).reshape(b * c, 1, w, w)
    vmap = v[:, :, 1:].transpose(1, 2).reshape(b, side, side, c).permute(0, 3, 1, 2).reshape(1, b * c, side, side)
    res = torch.nn.functional.conv2d(vmap, kern, padding=w // 2, groups=b * c).reshape(b, c, n - 1).permute(0, 2, 1)
    out = torch.cat([out[:, :1], out[:, 1:] + res], dim=1)
    return m.proj(out)


def test_matches_the_official_arrangement():
    torch.manual_seed(1)
    m = loc.InLineAttention(192, num_heads=6).double()
    x = rand(2, 197, 192, seed=5)
    assert torch.allclose(m(x), official_arrangement(m, x), atol=1e-13)


# ----------------------------------------------------------------------------------------------
# the demo: what it prints is what it computed, and the claims hold (14 x 14 grid, one map)


def test_demo_claims_and_printout(capsys):
    from conftest import run_demo
    r, out = run_demo(loc, ["--samples", "1"], capsys)
    t = r["table"]
    assert t["n"] == 197 and t["uniform"] == {3: 9 / 197, 5: 25 / 197, 7: 49 / 197}
    row = {(x["attention"], x["blur"]): x for x in t["rows"]}
    assert set(row) == {(name, blur) for name in loc.NAMES for blur in (0, 4)}
    kernel_forms = ["linear-relu", "linear-elu", "inline-identity"]
    u3 = t["uniform"][3]
    # smooth maps: softmax's exp() turns 'my neighbours look like me' into most of the mass,
    # the kernel forms gain far less (ELU+1 almost nothing)
    sm4 = row["softmax", 4]["mass"]
    assert sm4[3] > 0.5 and sm4[3] > 10 * u3
    for name in kernel_forms:
        assert sm4[3] > 2 * row[name, 4]["mass"][3], f"softmax's 3x3 mass must beat {name}'s on smooth maps"
    assert row["linear-elu", 4]["mass"][3] < 1.5 * u3
    # no structure: only softmax still concentrates, and on the query itself
    sm0 = row["softmax", 0]
    assert sm0["mass"][3] > 5 * u3 and sm0["self"] > 0.8 * sm0["mass"][3]
    for name in kernel_forms:
        assert row[name, 0]["mass"][3] < 2 * u3, f"{name} must not concentrate on plain noise"
    for x in t["rows"]:
        for a, b in zip(loc.WINDOWS, loc.WINDOWS[1:]):  # a larger window holds more of the mass
            assert x["mass"][a] <= x["mass"][b] + 1e-12
        assert f"{x['attention']:16s} {x['blur']:>4} | {x['self']:>5.3f} | {x['mass'][3]:>8.3f}" in out
    p = r["parameters"]
    assert p["extra"] == p["residual.0"] + p["residual.2"] == 63_360 and p["deit_t"] == 6_477_736
    assert p["kernels"] == (2, 1728, 1) and p["out"] == p["x"] == (2, 197, 192)
    assert f"adds {p['extra']:,} parameters per block" in out and f"= {p['deit_t']:,} parameters" in out
    assert "figures" not in r and "wrote" not in out


def test_query_maps_are_rows_of_the_weights():
    qm = loc.query_maps(side=6, dim=8, blur=2, seed=1, query=(2, 3))
    g = torch.Generator().manual_seed(1)
    tok = loc.smooth_map_tokens(6, 8, 2, g)
    i = 1 + 2 * 6 + 3
    for name in loc.NAMES:
        w = inj.weights_of(name, tok, tok)
        assert torch.equal(qm["maps"][name], w[i, 1:].reshape(6, 6)) and qm["cls"][name] == float(w[i, 0])
        assert abs(float(qm["maps"][name].sum()) + qm["cls"][name] - 1) < 1e-9, f"{name}: a row sums to 1"
        # the 3x3 mass is the sum of the map over the 3x3 window around (2, 3)
        assert abs(qm["mass"][name][3] - float(qm["maps"][name][1:4, 2:5].sum())) < 1e-12


def test_plot_writes_the_maps_and_the_bars(tmp_path, capsys):
    from conftest import png_size, run_demo
    r, out = run_demo(loc, ["--samples", "1", "--side", "6", "--dim", "8", "--plot", str(tmp_path)], capsys)
    maps, bars = (str(tmp_path / f) for f in ("attention_maps.png", "local_mass.png"))
    assert list(r["figures"]) == [maps, bars] and f"wrote {maps}" in out and f"wrote {bars}" in out
    assert png_size(maps) == (1440, 390) and png_size(bars) == (1200, 390)
    drawn = [ax.images[0].get_array() for ax in r["figures"][maps].axes if ax.images]
    assert len(drawn) == len(loc.NAMES)
    for d, name in zip(drawn, loc.NAMES):
        assert torch.allclose(torch.as_tensor(d.data), r["query_maps"]["maps"][name])
    heights = [p.get_height() for ax in r["figures"][bars].axes for p in ax.patches]
    expected = [x["mass"][win] for blur in (0, 4) for win in loc.WINDOWS
                for x in r["table"]["rows"] if x["blur"] == blur]
    assert heights == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# mistakes the tests above let through (tools/mutants.py): each test names the one it catches


def test_local_mass_default_window_batches_and_bad_shapes():
    w = torch.rand(2, 3, 17, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # batched = each (b, h) alone (the grid is read from the last dimension, not the first), and
    # the default window is InLine's 3
    each = torch.stack([torch.stack([loc.local_attention_mass(w[b, h], 3) for h in range(3)])
                        for b in range(2)])
    assert torch.allclose(loc.local_attention_mass(w), each, atol=1e-15)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., N, N\) weights, got shape \(9,\)"):
        loc.local_attention_mass(torch.ones(9), 3)


def test_window_one_is_allowed_and_the_default_heads_are_timms():
    torch.manual_seed(0)
    m = loc.InLineAttention(12, num_heads=3, window=1).double()   # a positive odd size: 1 too
    assert m.residual[2].out_channels == 12 and m(rand(1, 10, 12, seed=6)).shape == (1, 10, 12)
    assert loc.InLineAttention(64).num_heads == 8


def test_smooth_tokens_are_standardised_per_channel():
    x = loc.smooth_tokens(6, 4, 2, torch.Generator().manual_seed(0))   # (36, 4)
    assert x.shape == (36, 4)
    assert torch.allclose(x.mean(dim=0), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(x.std(dim=0), torch.ones(4, dtype=torch.float64), atol=1e-12)


def test_local_mass_table_is_the_mean_over_the_maps():
    names, blurs = ["softmax", "linear-elu", "inline-identity"], (0, 2)
    t = loc.local_mass_table(side=4, dim=4, samples=2, seed=3, names=names, blurs=blurs)
    assert t["n"] == 17 and t["uniform"] == {win: win * win / 17 for win in loc.WINDOWS}
    g = torch.Generator().manual_seed(3)   # the maps in the order the table draws them
    rows = iter(t["rows"])
    for blur in blurs:
        for name in names:
            ws = [inj.weights_of(name, tok, tok) for tok in
                  (loc.smooth_map_tokens(4, 4, blur, g) for _ in range(2))]
            row = next(rows)
            assert (row["attention"], row["blur"]) == (name, blur)
            assert row["self"] == pytest.approx(sum(float(w.diagonal()[1:].mean()) for w in ws) / 2, abs=1e-12)
            for win in loc.WINDOWS:   # patch queries only: the class token's row and column left out
                mean = sum(float(loc.local_attention_mass(w, win).mean()) for w in ws) / 2
                assert row["mass"][win] == pytest.approx(mean, abs=1e-12), (name, blur, win)


def test_demo_helpers_default_to_the_demo():
    import inspect
    defaults = lambda f: {k: p.default for k, p in inspect.signature(f).parameters.items()}  # noqa: E731
    # DeiT at 224 px: a 14 x 14 grid, head dimension 32, 8 maps; query_maps: image-like maps (blur 4)
    assert {k: defaults(loc.local_mass_table)[k] for k in ("side", "dim", "samples")} == \
        {"side": 14, "dim": 32, "samples": 8}
    assert {k: defaults(loc.query_maps)[k] for k in ("side", "dim", "blur")} == {"side": 14, "dim": 32, "blur": 4}
    assert loc.query_maps(side=5, dim=4, blur=1)["query"] == (2, 2)   # the centre by default
