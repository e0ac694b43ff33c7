"""The attention modules by name: the registry that step 06 (`--attn NAME`) and tools/ use.

Add your own attention with one new file and one line here:
  1. write `07_my_attention.py` with a class, e.g. a subclass of step 01's SoftmaxAttention that
     replaces `attend` and `attention_weights` (as LinearAttention in step 02 does);
  2. add `"mine": importlib.import_module("07_my_attention").MyAttention,` to ATTENTIONS below.
Then `python -m pytest tests/test_attentions.py` checks the interface below for every entry,
yours too, and `python 06_train_deit.py --attn mine` trains it (`--no PART`: see `switches`).

The interface; 06, tools/bench.py and tools/analyze.py need the first three:
  - `Module(dim, num_heads=..., qkv_bias=True, attn_drop=0.0, proj_drop=0.0, **options)`: these
    five first, options keywords with defaults; `dim % num_heads != 0` raises ValueError naming
    both numbers.
  - `forward(x)`: (B, N, C) -> (B, N, C), a gradient to every parameter (06 trains with DDP). A
    module that needs the 2-D layout reads it from N = H*W or N = 1 + H*W (class token first,
    H = W: step 04's grid_size) and raises ValueError naming N for any other N.
  - `attention_weights(x)`: (B, N, C) -> (B, H, N, N), the weight w_ij of query i on key j, each
    row summing to 1: the weights the core applies to the values (no local term, no gate).
    analyze.py measures their locality and confusions.
  - `split_heads(x)`: (B, N, C) -> q, k, v, each (B, H, N, C / H), before any feature map.
  - `attend(q, k, v)`, optional: the core, (B, H, N, d) -> (B, H, N, d); where there is one, it
    must equal attention_weights(x) @ v for q, k, v = split_heads(x) (a subclass of
    SoftmaxAttention inherits softmax's: replace it, or the tests say so).
  - `kv_buffer(x)`, optional: (B, H, d, d), what the core keeps of keys and values (softmax: its
    (B, H, N, N) weights); analyze.py reports its effective rank where there is one.
The tests check the interface, not your formula: test that in your own tests/test_07_*.py.
"""
import importlib
import inspect

ATTENTIONS = {  # the course's order; a new attention: one line at the end
    "softmax": importlib.import_module("01_softmax_attention").SoftmaxAttention,
    "linear": importlib.import_module("02_linear_attention").LinearAttention,
    "injective": importlib.import_module("03_injectivity").InjectiveLinearAttention,
    "inline": importlib.import_module("04_local_residual").InLineAttention,
    "rala": importlib.import_module("05_rank_augmentation").RALAttention,
    "final": importlib.import_module("05_rank_augmentation").RankAugmentedInLineAttention,
}


def switches(cls):
    """The on/off parts of a module: its constructor's keywords that default to True, qkv_bias
    aside (the final module: reweight, gate, local; 06's `--no PART` passes PART=False)."""
    return [name for name, p in inspect.signature(cls).parameters.items()
            if p.default is True and name != "qkv_bias"]
