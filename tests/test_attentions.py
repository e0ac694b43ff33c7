"""The interface of attentions.py's docstring, checked for every registered attention: the course's
six, any attention you add to ATTENTIONS, and a toy added here the way a student adds one (so the
checks are shown to take a newcomer). The numbers of each step's own formulas are its own tests."""
import inspect

import pytest
import torch
import torch.nn as nn

from conftest import assert_close, load, rand

registry = load("attentions")
softmax = load("01_softmax_attention")
deit = load("06_train_deit")


class ToyAttention(softmax.SoftmaxAttention):
    """A student's attention: softmax over cosine similarities (temperature 10), with an on/off
    part, an output gate (as RALA's)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, gate=True):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.gate = nn.Linear(dim, dim) if gate else None

    def attend(self, q, k, v):
        return softmax.softmax_attention(*(nn.functional.normalize(t, dim=-1) for t in (q, k)),
                                         v, scale=10.0)

    def attention_weights(self, x):
        q, k, _ = self.split_heads(x)
        return softmax.softmax_attention_weights(*(nn.functional.normalize(t, dim=-1)
                                                   for t in (q, k)), scale=10.0)

    def forward(self, x):
        out = self.merge_heads(self.attend(*self.split_heads(x)))       # (B, N, C)
        return self.proj_drop(self.proj(out if self.gate is None else out * self.gate(x)))


NAMES = list(registry.ATTENTIONS) + ["toy"]


@pytest.fixture(params=NAMES)
def name(request, monkeypatch):
    """Each registered attention's name, and "toy", registered for the test as a student would."""
    monkeypatch.setitem(registry.ATTENTIONS, "toy", ToyAttention)
    return request.param


def make(name, dim=24, heads=3, **options):
    torch.manual_seed(0)
    return registry.ATTENTIONS[name](dim, num_heads=heads, **options).double()


def test_the_course_order_and_the_steps_classes():
    steps = [load(f) for f in ("01_softmax_attention", "02_linear_attention", "03_injectivity",
                               "04_local_residual", "05_rank_augmentation")]
    assert list(registry.ATTENTIONS)[:6] == ["softmax", "linear", "injective", "inline", "rala",
                                             "final"]
    assert list(registry.ATTENTIONS.values())[:6] == [
        steps[0].SoftmaxAttention, steps[1].LinearAttention, steps[2].InjectiveLinearAttention,
        steps[3].InLineAttention, steps[4].RALAttention, steps[4].RankAugmentedInLineAttention]
    assert not hasattr(steps[4], "ATTENTIONS"), "one registry: attentions.py, not step 05"


def test_switches_are_the_keywords_that_default_to_true():
    assert registry.switches(registry.ATTENTIONS["final"]) == ["reweight", "gate", "local"]
    assert registry.switches(ToyAttention) == ["gate"]
    for name in ("softmax", "linear", "injective", "inline", "rala"):
        assert registry.switches(registry.ATTENTIONS[name]) == [], name  # qkv_bias is no part


def test_constructor_signature(name):
    params = list(inspect.signature(registry.ATTENTIONS[name]).parameters.values())
    assert [p.name for p in params[:5]] == ["dim", "num_heads", "qkv_bias", "attn_drop",
                                            "proj_drop"], f"{name}: the constructor's arguments"
    assert [p.default for p in params[2:5]] == [True, 0.0, 0.0], f"{name}: their defaults"
    assert all(p.default is not p.empty for p in params[1:]), f"{name}: options need defaults"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(make(name, qkv_bias=False)) < count(make(name)), f"{name}: qkv_bias=False " \
        f"must drop the projections' biases"
    make(name, attn_drop=0.0, proj_drop=0.1)


@pytest.mark.parametrize("B,N", [(2, 17), (1, 16), (3, 50)])  # 1 + 4 x 4, 4 x 4, 1 + 7 x 7
def test_forward_keeps_the_shape(name, B, N):
    m, x = make(name), rand(B, N, 24, seed=N)
    y = m(x)
    assert y.shape == (B, N, 24) and y.dtype == torch.float64, f"{name}: (B, N, C) -> (B, N, C)"
    assert torch.isfinite(y).all()
    assert torch.allclose(m(x[:1]), y[:1], atol=1e-12), f"{name}: samples are independent"


def test_errors_name_the_numbers(name):
    cls = registry.ATTENTIONS[name]
    with pytest.raises(ValueError, match=r"\b20\b.*\b3\b|\b3\b.*\b20\b"):
        cls(20, num_heads=3)
    m, x = make(name), rand(1, 18, 24, seed=1)  # 18 tokens: no square grid, with or without cls
    try:
        assert m(x).shape == (1, 18, 24), f"{name}: a module that needs no grid takes any N"
    except ValueError as e:
        assert "18" in str(e), f"{name}: the error must name N=18: {e}"


def test_split_heads_gives_the_projected_q_k_v_before_any_kernel(name):
    m, x = make(name), rand(2, 17, 24, seed=30)
    q, k, v = m.split_heads(x)
    assert q.shape == k.shape == v.shape == (2, 3, 17, 8), f"{name}: (B, H, N, C / H) each"
    lin = getattr(m, "qkv", getattr(m, "qkvo", None))  # timm's name (RALA's: q, k, v, gate)
    if lin is not None:
        merged = torch.cat([t.transpose(1, 2).reshape(2, 17, 24) for t in (q, k, v)], dim=-1)
        assert torch.allclose(merged, lin(x)[..., :72], atol=1e-13), \
            f"{name}: split_heads must give the heads of the q, k, v projections, before phi"


@pytest.mark.parametrize("N", [17, 16])
def test_attention_weights_rows_sum_to_one(name, N):
    m, x = make(name), rand(2, N, 24, seed=31)
    w = m.attention_weights(x).detach()
    assert w.shape == (2, 3, N, N) and w.dtype == torch.float64, f"{name}: (B, H, N, N) weights"
    # an eps in a denominator (linear attention's 1e-6) leaves a row short of 1 by eps / its sum
    # of similarities (1e-4 for FLatten's small features at initialisation); a missing or
    # wrong-axis normalisation misses by far more
    assert_close(w.sum(-1), torch.ones(2, 3, N, dtype=torch.float64),
                 f"{name}: every row of attention weights sums to 1", atol=1e-3)
    assert not torch.allclose(w, torch.full_like(w, 1 / N), atol=1e-4), \
        f"{name}: the weights depend on the tokens (not a uniform 1/N)"


def test_attention_weights_are_what_the_core_applies_to_the_values(name):
    m, x = make(name), rand(2, 17, 24, seed=32)
    if not hasattr(m, "attend"):
        pytest.skip(f"{name} has no attend(q, k, v)")
    q, k, v = m.split_heads(x)
    with torch.no_grad():
        w, out = m.attention_weights(x), m.attend(q, k, v)
    assert_close(w @ v.detach(), out, f"{name}: out_i = sum_j w_ij v_j, with w from "
                 f"attention_weights(x) and out from the core attend(q, k, v)", atol=1e-12)


def test_kv_buffer_shape(name):
    m, x = make(name), rand(2, 17, 24, seed=33)
    if not hasattr(m, "kv_buffer"):
        pytest.skip(f"{name} has no kv_buffer")
    assert m.kv_buffer(x).shape in {(2, 3, 8, 8), (2, 3, 17, 17)}, \
        f"{name}: kv_buffer is (B, H, d, d) or (B, H, N, N)"


@pytest.mark.parametrize("method", ["attention_weights", "kv_buffer"])
def test_helpers_make_their_tensors_on_the_input_device(name, method):
    # on the meta device: no data, so this runs anywhere; a tensor made without device= lands on
    # the CPU and fails here, as it would on a GPU (the forward cannot run on meta: autocast)
    m = registry.ATTENTIONS[name](24, num_heads=3).to(device="meta", dtype=torch.float64)
    if not hasattr(m, method):
        pytest.skip(f"{name} has no {method}")
    out = getattr(m, method)(torch.empty(2, 17, 24, device="meta", dtype=torch.float64))
    assert out.device.type == "meta" and out.dtype == torch.float64, (name, out.device, out.dtype)


def test_gradients_reach_every_parameter(name):
    # 06 trains with DDP (find_unused_parameters=False): every parameter needs a gradient
    m, x = make(name), rand(2, 17, 24, seed=34).requires_grad_()
    (m(x) * rand(2, 17, 24, seed=35)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, f"{name}: no gradient to the input"
    for k, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no gradient to {k}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient to {k}"


def test_each_switch_is_accepted_and_changes_the_module(name):
    x = rand(2, 17, 24, seed=36)
    full = make(name)(x)
    for part in registry.switches(registry.ATTENTIONS[name]):
        y = make(name, **{part: False})(x)
        assert y.shape == x.shape, f"{name}: {part}=False"
        assert not torch.allclose(y, full, atol=1e-6), f"{name}: {part}=False changes nothing"


def test_a_registered_attention_trains_in_06(monkeypatch):
    monkeypatch.setitem(registry.ATTENTIONS, "toy", ToyAttention)
    assert deit.ATTENTIONS is registry.ATTENTIONS, "06 takes its attentions from attentions.py"
    model = deit.VisionTransformer(img_size=16, patch_size=4, num_classes=5, embed_dim=24,
                                   depth=2, num_heads=2, drop_path_rate=0.0, attn="toy")
    assert all(type(b.attn) is ToyAttention for b in model.blocks)
    assert model(torch.randn(3, 3, 16, 16)).shape == (3, 5)
    args = deit.get_args(["--attn", "toy", "--img-size", "16", "--patch-size", "4"])
    attn = deit.build_model(args, 5).blocks[0].attn
    assert type(attn) is ToyAttention and attn.gate is not None
    args = deit.get_args(["--attn", "toy", "--img-size", "16", "--patch-size", "4", "--no", "gate"])
    assert deit.build_model(args, 5).blocks[0].attn.gate is None, "--no PART: PART=False"
