"""kvq_torch on the GPU: each op against the torch formula of kvq's numeric contract (exact codes
and scales), bad arguments raise, and the ops work under torch.compile and in a CUDA graph.
Skipped (with the reason) where torch, CUDA or the built extension is missing.

    cd examples/torch && TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace && python -m pytest -q tests
"""
import math

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
kvq_torch = pytest.importorskip("kvq_torch", reason="the extension is not built (python setup.py build_ext --inplace in examples/torch)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape, dtype=torch.float16, seed=0, nonfinite=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.rand(*shape, generator=g, device="cuda") * 2 - 1) * (1 + 20 * (torch.rand(*shape, generator=g, device="cuda") < 0.02))
    if nonfinite and x.numel() > 100:
        flat = x.view(-1)
        flat[7], flat[50] = float("nan"), float("inf")
    return x.to(dtype)


def torch_quantize(x, granularity, group):
    """kvq's contract in torch: scale = amax of the finite values / 127 (1 if not positive), code =
    round-half-even(x / scale) clamped to +-127, NaN -> 0. x [..., T, D]."""
    xf = x.float()
    finite = torch.where(torch.isfinite(xf), xf.abs(), torch.zeros_like(xf))
    t, d = x.shape[-2], x.shape[-1]
    if granularity == "per_token":
        g = d if group <= 0 or group >= d else group
        n = -(-d // g)
        pad = torch.nn.functional.pad(finite, (0, n * g - d))
        amax = pad.view(*x.shape[:-1], n, g).amax(-1)
        expand = lambda s: s.repeat_interleave(g, -1)[..., :d]
    else:
        g = t if group <= 0 or group >= t else group
        n = -(-t // g)
        pad = torch.nn.functional.pad(finite, (0, 0, 0, n * g - t))
        amax = pad.view(*x.shape[:-2], n, g, d).amax(-2)
        expand = lambda s: s.repeat_interleave(g, -2)[..., :t, :]
    # A tensor divisor: ATen divides a CUDA tensor by a Python scalar as a multiply by its reciprocal,
    # which is not the correctly rounded quotient of the contract.
    scale = amax / torch.full_like(amax, 127.0)
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    q = xf / expand(scale)
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q).clamp(-127, 127).round().to(torch.int8)
    return q, scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity,group", [("per_token", 0), ("per_token", 32), ("per_channel", 0),
                                               ("per_channel", 128)])
def test_quantize_is_the_contract(dtype, granularity, group):
    x = rand(3, 300, 128, dtype=dtype, seed=1)
    q, scales = kvq_torch.quantize(x, granularity, group)
    want_q, want_scales = torch_quantize(x, granularity, group)
    assert torch.equal(scales, want_scales)
    assert torch.equal(q, want_q)
    assert torch.equal(kvq_torch.quantize_with_scales(x, scales, granularity, group), q)
    y = kvq_torch.dequantize(q, scales, granularity, group, dtype)
    if granularity == "per_token":  # each element's scale
        scale_full = want_scales.repeat_interleave(group or 128, -1)[..., :128]
    else:
        scale_full = want_scales.repeat_interleave(group or 300, -2)[..., :300, :]
    assert torch.equal(y, (q.float() * scale_full).to(dtype))


def test_a_per_head_view_needs_no_copy():
    cache = rand(64, 8, 128, seed=2)  # [T, H, D]: head 3 is a strided [T, D] view
    x = cache[:, 3, :]
    q, scales = kvq_torch.quantize(x, "per_token")
    assert q.stride() == x.stride()
    assert torch.equal(q, torch_quantize(x.contiguous(), "per_token", 0)[0])


@pytest.mark.parametrize("call,match", [
    (lambda: kvq_torch.quantize(torch.ones(4, 8), "per_token"), "x must be a CUDA tensor"),
    (lambda: kvq_torch.quantize(torch.ones(4, 8, device="cuda", dtype=torch.int32), "per_token"), "x must be float32"),
    (lambda: kvq_torch.quantize(torch.ones(8, 4, device="cuda").t(), "per_token"), "channels must be contiguous"),
    (lambda: kvq_torch.quantize(torch.ones(4, 8, device="cuda"), "per_row"), "granularity"),
    (lambda: kvq_torch.quantize(torch.ones(2, 2, 4, 8, device="cuda"), "per_token"), "x must be"),
    (lambda: kvq_torch.quantize_with_scales(torch.ones(4, 8, device="cuda"), torch.ones(3, 1, device="cuda"),
                                            "per_token"), "scales must be"),
    (lambda: kvq_torch.dequantize(torch.ones(4, 8, device="cuda"), torch.ones(4, 1, device="cuda")), "q must be int8"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_under_torch_compile():
    x = rand(256, 128, seed=3)

    def f(x):
        q, s = kvq_torch.quantize(x, "per_token")
        return kvq_torch.dequantize(q, s, "per_token", 0, torch.float16) * 2

    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_in_a_cuda_graph_replays_with_new_contents():
    x = rand(512, 128, seed=4)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        kvq_torch.quantize(x, "per_token")  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, scales = kvq_torch.quantize(x, "per_token")
    for seed in (5, 6):
        x.copy_(rand(512, 128, seed=seed))
        graph.replay()
        want_q, want_s = torch_quantize(x, "per_token", 0)
        assert torch.equal(q, want_q) and torch.equal(scales, want_s)


# --- the paged cache ------------------------------------------------------------------------------

def make_cache(scheme, layout="NHD", page_size=16, sinks=0, dtype=torch.float16):
    return kvq_torch.PagedKvCache(num_pages=64, page_size=page_size, kv_heads=2, head_dim=128, max_seqs=4,
                                  max_pages_per_seq=12, scheme=scheme, layout=layout, dtype=dtype, sink_tokens=sinks)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_is_quantize_per_token_and_gather_its_dequantize(layout):
    cache = make_cache("per_token_head", layout)
    k, v = rand(40, 2, 128, seed=7, nonfinite=False), rand(40, 2, 128, seed=8, nonfinite=False)
    cache.append(k[:30], v[:30], [0, 1], [21, 9])  # a prefill chunk of each
    cache.append(k[30:32], v[30:32], [0, 1], [1, 1])  # a decode step
    ks, vs = cache.gather([0, 1])
    rows = {0: torch.cat([k[:21], k[30:31]]), 1: torch.cat([k[21:30], k[31:32]])}
    vrows = {0: torch.cat([v[:21], v[30:31]]), 1: torch.cat([v[21:30], v[31:32]])}
    for s in (0, 1):
        for x, got in ((rows[s], ks[s]), (vrows[s], vs[s])):
            q, scale = torch_quantize(x, "per_token", 0)
            assert torch.equal(got, (q.float() * scale).to(torch.float16))
    assert cache.error_count.item() == 0


def test_keys_per_channel_page_full_pages_are_quantize_per_channel():
    cache = make_cache("keys_per_channel_page")
    k, v = rand(37, 2, 128, seed=9, nonfinite=False), rand(37, 2, 128, seed=10, nonfinite=False)
    cache.append(k[:20], v[:20], [0], [20])
    cache.append(k[20:], v[20:], [0], [17])  # page 1 closes from the open buffer and this chunk
    ks, _ = cache.gather([0])
    for p in range(2):  # full pages: codes and scales of kvq::quantize per channel, group = page_size
        page = k[16 * p:16 * (p + 1)]
        for h in range(2):
            q, scale = torch_quantize(page[:, h, :], "per_channel", 16)
            assert torch.equal(ks[0][16 * p:16 * (p + 1), h, :], (q.float() * scale).to(torch.float16))
    assert torch.equal(ks[0][32:], k[32:])  # the open page: full precision


@pytest.mark.parametrize("scheme", ["per_token_head", "keys_per_channel_page"])
def test_decode_attention_is_attention_over_the_dequantized_cache(scheme):
    cache = make_cache(scheme)
    lens = [0, 1, 37, 150]
    k = rand(sum(lens), 2, 128, seed=11, nonfinite=False)
    v = rand(sum(lens), 2, 128, seed=12, nonfinite=False)
    cache.append(k, v, [0, 1, 2, 3], lens)
    q = rand(4, 8, 128, seed=13, nonfinite=False)  # 8 query heads over 2 KV heads
    out, lse = cache.attend(q, [0, 1, 2, 3])
    ks, vs = cache.gather([0, 1, 2, 3], torch.float32)
    for b in range(4):
        if lens[b] == 0:
            assert torch.all(out[b] == 0) and torch.all(torch.isneginf(lse[b]))
            continue
        kk = ks[b].double().repeat_interleave(4, 1)  # [T, 8, D]
        vv = vs[b].double().repeat_interleave(4, 1)
        s = torch.einsum("hd,thd->ht", q[b].double(), kk) / math.sqrt(128)
        want = torch.einsum("ht,thd->hd", torch.softmax(s, -1), vv)
        # The kernel multiplies fp16 queries by keys dequantized to fp16 (tensor cores), accumulates in
        # fp32 and rounds the output to fp16: |error| well under 1e-2 for these O(1) scores and values.
        torch.testing.assert_close(out[b].double(), want, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(lse[b].double(), torch.logsumexp(s, -1), atol=1e-2, rtol=1e-3)


def test_decode_attention_in_a_cuda_graph_and_under_compile():
    cache = make_cache("per_token_head")
    cache.append(rand(100, 2, 128, seed=14, nonfinite=False), rand(100, 2, 128, seed=15, nonfinite=False), [0, 1], [60, 40])
    table, lens, ids = cache.tables([0, 1])
    q = rand(2, 8, 128, seed=16, nonfinite=False)
    eager = kvq_torch.decode_attention(cache, q, table, lens, 192)[0]
    compiled = torch.compile(lambda q: kvq_torch.decode_attention(cache, q, table, lens, 192)[0], fullgraph=True)
    assert torch.equal(compiled(q), eager)
    kvq_torch.decode_attention(cache, q, table, lens, 192)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = kvq_torch.decode_attention(cache, q, table, lens, 192)
    graph.replay()
    assert torch.equal(out, eager)
    cache.append(rand(2, 2, 128, seed=17, nonfinite=False), rand(2, 2, 128, seed=18, nonfinite=False), [0, 1], [1, 1])
    new_table, new_lens, _ = cache.tables([0, 1])
    table.copy_(new_table)  # the captured call reads these tensors: new lengths, same grid
    lens.copy_(new_lens)
    graph.replay()
    assert torch.equal(out, kvq_torch.decode_attention(cache, q, table, lens, 192)[0])


@pytest.mark.parametrize("scheme", ["per_token_head", "keys_per_channel_page"])
def test_append_and_gather_under_torch_compile(scheme):
    eager, compiled = make_cache(scheme), make_cache(scheme)  # the same free list: the same pages
    k, v = rand(40, 2, 128, seed=19, nonfinite=False), rand(40, 2, 128, seed=20, nonfinite=False)

    def append(cache, k, v, slots, ids, positions):
        kvq_torch.append_kv(cache, k, v, slots, ids, positions)

    step = torch.compile(append, fullgraph=True)
    for rows, counts in ((slice(0, 30), [21, 9]), (slice(30, 32), [1, 1])):  # a prefill chunk, a decode step
        append(eager, k[rows], v[rows], *eager.plan([0, 1], counts))
        step(compiled, k[rows], v[rows], *compiled.plan([0, 1], counts))
    for name in ("k_codes", "v_codes", "k_scales", "v_scales") + (("k_open",) if eager.k_open is not None else ()):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    table, lens, ids = eager.tables([0, 1])
    gather = torch.compile(lambda t, n, i: kvq_torch.gather_kv(eager, t, n, torch.float16, i), fullgraph=True)
    span = eager.max_pages_per_seq * eager.page_size
    for got, want in zip(gather(table, lens, ids), kvq_torch.gather_kv(eager, table, lens, torch.float16, ids)):
        for b, n in enumerate((22, 10)):  # each sequence's rows (the rest of its span is not written)
            assert torch.equal(got[b * span:b * span + n], want[b * span:b * span + n])


def test_append_in_a_cuda_graph_replays_decode_steps():
    scheme = "keys_per_channel_page"  # pages of 16 close and open across the steps
    cache, twin = make_cache(scheme), make_cache(scheme)
    k, v = rand(2, 2, 128, seed=21, nonfinite=False), rand(2, 2, 128, seed=22, nonfinite=False)
    slots, ids, positions = (t.clone() for t in cache.plan([0, 1], [1, 1]))
    kvq_torch.append_kv(cache, k, v, slots, ids, positions)  # step 1 eagerly, outside the capture
    kvq_torch.append_kv(twin, k, v, *twin.plan([0, 1], [1, 1]))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run
        kvq_torch.append_kv(cache, k, v, slots, ids, positions)
    for step in range(20):  # steps 2 to 21, replayed with new rows and new slots
        k.copy_(rand(2, 2, 128, seed=100 + step, nonfinite=False))
        v.copy_(rand(2, 2, 128, seed=200 + step, nonfinite=False))
        for dst, src in zip((slots, ids, positions), cache.plan([0, 1], [1, 1])):
            dst.copy_(src)
        graph.replay()
        kvq_torch.append_kv(twin, k, v, *twin.plan([0, 1], [1, 1]))
    torch.cuda.synchronize()
    for name in ("k_codes", "v_codes", "k_scales", "v_scales", "k_open"):
        assert torch.equal(getattr(cache, name), getattr(twin, name)), name
    assert cache.error_count.item() == 0


def test_paged_bad_arguments_raise():
    cache = make_cache("per_token_head")
    k = rand(2, 2, 128)
    with pytest.raises(RuntimeError, match="slot_mapping must be"):
        kvq_torch.append_kv(cache, k, k, torch.zeros(3, dtype=torch.int64, device="cuda"))
    with pytest.raises(RuntimeError, match="k must be"):
        kvq_torch.append_kv(cache, rand(2, 3, 128), rand(2, 3, 128), torch.zeros(2, dtype=torch.int64, device="cuda"))
    with pytest.raises(RuntimeError, match="needs seq_ids"):
        kvq_torch.append_kv(make_cache("keys_per_channel_page"), k, k, torch.zeros(2, dtype=torch.int64, device="cuda"))
    table, lens, _ = cache.tables([0])
    with pytest.raises(RuntimeError, match="decode_attention"):  # 3 query heads over 2 KV heads
        kvq_torch.decode_attention(cache, rand(1, 3, 128), table, lens, 64)


def test_the_readme_example_runs():
    """The top-level README's "From PyTorch" example, as written there."""
    import os
    import re
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "..", "README.md")
    with open(readme) as f:
        text = f.read()
    section = text.split("## From PyTorch", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(code, scope)
    assert scope["out"].shape == (1, 32, 128) and scope["lse"].shape == (1, 32)
    assert torch.isfinite(scope["out"].float()).all() and torch.isfinite(scope["lse"]).all()
