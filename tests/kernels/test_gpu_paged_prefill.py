"""GPU, the paged prefill kernel for mixed serving steps: bf16 and fp16 at realistic sizes (T up to 4096,
contexts up to 8k, page 16), every head dim, int64 offsets, decode-only use against the decode kernel,
and the KV write plus the kernel captured in a CUDA graph. Skipped without CUDA."""

import pytest
import torch
from frugalserve.kernels import dispatch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.reference import paged_prefill_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
HEAD_DIMS = [8, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256]
DTYPES = [torch.bfloat16, torch.float16]
PAGE = 16


def _rand(*shape, seed, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32,
                        device="cuda")


def _step(spec, hq, hkv, d, dtype, seed, page=PAGE, pad_rows=5):
    """Random caches and packed queries for `spec` [(Lq, seq_len)], shuffled pages, `pad_rows` spare rows."""
    lens = [n for _, n in spec]
    B = len(spec)
    width = max((n + page - 1) // page for n in lens) + 1
    P = B * width + 5
    kc, vc = _rand(P, page, hkv, d, seed=seed, dtype=dtype), _rand(P, page, hkv, d, seed=seed + 1, dtype=dtype)
    g = torch.Generator(device="cuda").manual_seed(seed + 2)
    bt = torch.randperm(P, device="cuda", generator=g)[: B * width].view(B, width).int()
    q = _rand(sum(lq for lq, _ in spec) + pad_rows, hq, d, seed=seed + 3, dtype=dtype)
    return q, kc, vc, bt, _cu([lq for lq, _ in spec]), torch.tensor(lens, dtype=torch.int32, device="cuda")


def _run(q, kc, vc, bt, cu, lens, s, max_seqlen_q):
    """The kernel into a NaN-poisoned output; asserts the rows past cu_seqlens_q[B] stay untouched."""
    from frugalserve.kernels.paged_prefill import paged_prefill_attention

    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kc, vc, bt, cu, lens, max_seqlen_q=max_seqlen_q, alibi_slopes=s, out=out)
    n = int(cu[-1])
    assert torch.isnan(out[n:]).all()
    return out[:n]


# T = 4049 query rows: decodes against 1 .. 8192 cached tokens, a padded sequence, a 2000-token chunk after
# a 6192-token prefix, a whole 1500-token prompt, chunks after ragged prefixes.
REALISTIC = [(1, 8192), (1, 1), (1, 3000), (0, 0), (2000, 8192), (1500, 1500), (500, 700), (1, 17), (45, 4000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [40, 64, 128, 256])
def test_paged_prefill_realistic(d, dtype, assert_close):
    hq, hkv = (16, 4) if d != 256 else (8, 1)
    q, kc, vc, bt, cu, lens = _step(REALISTIC, hq, hkv, d, dtype, seed=d)
    s = alibi_slopes(hq, device="cuda")
    out = _run(q, kc, vc, bt, cu, lens, s, max_seqlen_q=2000)
    ref = paged_prefill_reference(q, kc, vc, bt, cu, lens, alibi_slopes=s)
    assert_close(out, ref[: out.shape[0]], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_paged_prefill_head_dims(d, dtype, assert_close):
    """Every head dim through both tiles (chunk and decode-only), a GQA layout per dim, no ALiBi on odd
    dims' second launch."""
    i = HEAD_DIMS.index(d)
    hq, hkv = [(8, 2), (12, 3), (5, 1), (40, 2)][i % 4]
    spec = [(1, 300), (129, 129), (64, 700), (0, 0), (1, 1), (200, 333)]
    q, kc, vc, bt, cu, lens = _step(spec, hq, hkv, d, dtype, seed=100 + d)
    s = alibi_slopes(hq, device="cuda")
    out = _run(q, kc, vc, bt, cu, lens, s, max_seqlen_q=200)
    assert_close(out, paged_prefill_reference(q, kc, vc, bt, cu, lens, alibi_slopes=s)[: out.shape[0]], dtype)
    dec = [(1, n) for n in (1, 15, 16, 17, 1000)]
    q, kc, vc, bt, cu, lens = _step(dec, hq, hkv, d, dtype, seed=200 + d)
    s = s if i % 2 == 0 else None
    out = _run(q, kc, vc, bt, cu, lens, s, max_seqlen_q=1)
    assert_close(out, paged_prefill_reference(q, kc, vc, bt, cu, lens, alibi_slopes=s)[: out.shape[0]], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [40, 128, 256])
def test_paged_prefill_decode_only_matches_decode(d, dtype, assert_close, tolerances):
    """All Lq = 1, contexts 1 .. 8192: the same as kernels.decode (split-K) within twice the tolerance, and
    each within it of the reference."""
    from frugalserve.kernels.decode import paged_decode_attention

    spec = [(1, n) for n in (1, 17, 100, 1500, 4097, 8192, 16, 33)]
    hq, hkv = 32, 8
    q, kc, vc, bt, cu, lens = _step(spec, hq, hkv, d, dtype, seed=300 + d, pad_rows=0)
    s = alibi_slopes(hq, device="cuda")
    out = _run(q, kc, vc, bt, cu, lens, s, max_seqlen_q=1)
    dec = paged_decode_attention(q[:, None], kc, vc, bt, lens, alibi_slopes=s, max_context_len=8192)[:, 0]
    ref = paged_prefill_reference(q, kc, vc, bt, cu, lens, alibi_slopes=s)
    assert_close(out, ref, dtype)
    assert_close(dec, ref, dtype)
    tol = tolerances[dtype]
    torch.testing.assert_close(out.float(), dec.float(), atol=2 * tol["atol"], rtol=2 * tol["rtol"])


def test_paged_prefill_int64_offsets(assert_close):
    """Cache offsets past 2^31 elements: a 4.3 GB paged cache, both sequences on its last pages."""
    dtype, hkv, d = torch.bfloat16, 8, 128
    P = (1 << 31) // (PAGE * hkv * d) + 96
    kc = torch.empty(P, PAGE, hkv, d, device="cuda", dtype=dtype).normal_()
    vc = torch.empty(P, PAGE, hkv, d, device="cuda", dtype=dtype).normal_()
    bt = torch.arange(P - 80, P, device="cuda", dtype=torch.int32).flip(0).view(2, 40)
    cu, lens = _cu([1, 300]), torch.tensor([600, 640], dtype=torch.int32, device="cuda")
    q = _rand(301, 32, d, seed=11, dtype=dtype)
    s = alibi_slopes(32, device="cuda")
    out = _run(q, kc, vc, bt, cu, lens, s, max_seqlen_q=300)
    assert_close(out, paged_prefill_reference(q, kc, vc, bt, cu, lens, alibi_slopes=s), dtype)


def _capture(fn):
    """Warm up (compile) on a side stream, then capture fn in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.parametrize("d", [40, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_step_cuda_graph(d, dtype, assert_close):
    """A mixed-step bucket (T = 512 tokens, up to 8 sequences, max_seqlen_q = T) with static buffers: the
    KV write of the step's tokens and the paged prefill captured once, replayed with new queries, keys,
    block tables, query splits and lengths (decodes and chunks, padded sequences, one sequence taking every
    row, all padded): equal to the eager call and within tolerance of the reference; rows past the last
    sequence untouched, the new tokens' K/V in the cache."""
    T, B, hq, hkv, max_ctx = 512, 8, 16, 4, 2048
    width = max_ctx // PAGE
    P = B * width + 8
    kc, vc = _rand(P, PAGE, hkv, d, seed=1, dtype=dtype), _rand(P, PAGE, hkv, d, seed=2, dtype=dtype)
    s = alibi_slopes(hq, device="cuda")
    q = torch.empty(T, hq, d, device="cuda", dtype=dtype)
    key = torch.empty(T, hkv, d, device="cuda", dtype=dtype)
    value = torch.empty_like(key)
    slots = torch.empty(T, device="cuda", dtype=torch.int32)
    bt = torch.zeros(B, width, device="cuda", dtype=torch.int32)
    cu = torch.zeros(B + 1, device="cuda", dtype=torch.int32)
    lens = torch.zeros(B, device="cuda", dtype=torch.int32)
    out = torch.empty(T, hq, d, device="cuda", dtype=dtype)

    def body():
        dispatch.write_kv(key, value, kc, vc, slots)
        dispatch.paged_prefill(q, kc, vc, bt, cu, lens, max_seqlen_q=T, alibi_slopes=s, out=out)

    def fill(seed, spec):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q.copy_(torch.randn(q.shape, device="cuda", generator=g))
        key.copy_(torch.randn(key.shape, device="cuda", generator=g))
        value.copy_(torch.randn(value.shape, device="cuda", generator=g))
        tables = torch.randperm(P, device="cuda", generator=g)[: B * width].view(B, width).int()
        bt.copy_(tables)
        spec = spec + [(0, 0)] * (B - len(spec))
        cu.copy_(_cu([lq for lq, _ in spec]))
        lens.copy_(torch.tensor([n for _, n in spec], dtype=torch.int32))
        host = tables.cpu()
        new = torch.full((T,), -1, dtype=torch.int32)  # rows past the last sequence write nothing
        row = 0
        for b, (lq, n) in enumerate(spec):
            pos = torch.arange(n - lq, n)
            new[row:row + lq] = host[b][pos // PAGE] * PAGE + pos % PAGE
            row += lq
        slots.copy_(new)
        return row

    fill(0, [(64, 64 + 100 * b) for b in range(B)])
    graph = _capture(body)
    steps = [
        [(1, 2048), (1, 1), (300, 300), (100, 1500), (1, 700), (50, 60)],
        [(0, 0), (200, 2000), (0, 0), (1, 30), (1, 1024), (0, 0), (64, 64)],
        [(T, 2048)],
        [(1, n) for n in (5, 2048, 1, 17, 16, 100, 1000, 33)],
        [],
    ]
    for seed, spec in enumerate(steps, start=1):
        n = fill(seed, spec)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        captured = out.clone()
        assert torch.isnan(captured[n:]).all()
        assert torch.equal(kc.view(-1, hkv, d)[slots[:n].long()], key[:n])  # the graph wrote the new K/V
        eager = torch.full_like(out, float("nan"))
        dispatch.paged_prefill(q, kc, vc, bt, cu, lens, max_seqlen_q=T, alibi_slopes=s, out=eager)
        assert torch.equal(captured[:n], eager[:n])  # same kernel, same grid, same data
        if n:
            ref = paged_prefill_reference(q, kc, vc, bt, cu, lens, alibi_slopes=s)
            assert_close(captured[:n], ref[:n], dtype)
