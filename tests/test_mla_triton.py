"""
The MLA decode kernel in mla.py (mla_decode, Triton) against its PyTorch twin mla_decode_ref, and that twin
against the MLA module's absorbed path: out and lse within 1e-5 in fp32 (one bf16 rounding in bf16), with ragged
lengths (1, a tile boundary, a page boundary, a ragged tail), one split and many (so some splits are empty), the
contiguous cache of model.KVCache and a paged cache (64-token pages, shuffled block table). Every cache slot at
or past a row's length, every page a row does not use and every unused block-table entry holds NaN, so a single
out-of-bounds read turns the result into NaN.

Without CUDA the kernels run in Triton's interpreter (numpy on the CPU, slow), so shapes are tiny (B=4, H=4,
d_c=32, d_R=16, up to 200 cached tokens). TRITON_INTERPRET=1 must be set before anything imports triton: this
module sets it at the top, and tests/conftest.py sets it for `pytest tests`. With CUDA the same tests run the
compiled kernels, and one more checks the sampler hook (MLA.forward on CUDA under no_grad) against SDPA.

Run:  python -m pytest tests/test_mla_triton.py -q        (CPU, a few seconds)
"""
import os
import sys

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ['TRITON_INTERPRET'] = '1'  # before the first import of triton, which mla does
pytest.importorskip('triton')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mla import mla_decode, mla_decode_ref, select_impl, triton_interpreted  # noqa: E402
from layers import apply_rope  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

if not CUDA and not triton_interpreted():
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on the "
                       "CPU: set it in the environment (tests/conftest.py does for pytest)")

torch.set_num_threads(1)
DEVICE = 'cuda' if CUDA else 'cpu'
B, H, DC, DR, S_MAX, PAGE = 4, 4, 32, 16, 200, 64
LENS = [1, 96, 64, 197]   # one token; 3 tiles of 32 exactly; exactly one page; a ragged tail in the 4th page
SCALE = 0.3
NAN = float('nan')


def contiguous_batch(dtype=torch.float32, seed=0, lens=LENS):
    """Queries and a (B, S_MAX, .) cache whose slots at or past each row's length are NaN."""
    g = torch.Generator().manual_seed(seed)
    q_nope = torch.randn(B, H, DC, generator=g)                          # (B, H, d_c)
    q_pe = torch.randn(B, H, DR, generator=g)                            # (B, H, d_R)
    kv = torch.randn(B, S_MAX, DC, generator=g)                          # (B, S, d_c)
    pe = torch.randn(B, S_MAX, DR, generator=g)                          # (B, S, d_R)
    for b, n in enumerate(lens):
        kv[b, n:], pe[b, n:] = NAN, NAN
    seqlens = torch.tensor(lens, dtype=torch.int32)
    to = lambda x: x.to(DEVICE, dtype if x.is_floating_point() else x.dtype)  # noqa: E731
    return to(q_nope), to(q_pe), to(kv), to(pe), to(seqlens)


def to_paged(kv, pe, lens, seed=0):
    """The same cache as pages of 64 tokens in a shuffled pool with 3 spare pages; all of it NaN except the
    pages rows use. Rows are padded to 4 table entries; the entries a row does not need point at NaN pages."""
    max_blocks = -(-S_MAX // PAGE)                                       # 4
    n_blocks = B * max_blocks + 3
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    kv_pool = torch.full((n_blocks, PAGE, DC), NAN, dtype=kv.dtype, device=kv.device)
    pe_pool = torch.full((n_blocks, PAGE, DR), NAN, dtype=pe.dtype, device=pe.device)
    table = perm[:B * max_blocks].view(B, max_blocks).to(torch.int32)    # (B, max_blocks), unused entries too
    for b, n in enumerate(lens):
        for j in range(-(-n // PAGE)):
            lo, hi = j * PAGE, min((j + 1) * PAGE, S_MAX)
            kv_pool[table[b, j], :hi - lo] = kv[b, lo:hi]                # NaN past the length comes along
            pe_pool[table[b, j], :hi - lo] = pe[b, lo:hi]
    return kv_pool, pe_pool, table.to(kv.device)


def check(out, lse, ref_out, ref_lse, atol=1e-5):
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# the kernel against the reference


@pytest.mark.parametrize('layout', ['contiguous', 'paged'])
@pytest.mark.parametrize('num_splits', [1, 3, 8, None])
def test_kernel_matches_reference(layout, num_splits):
    """1 split; 3 (a 1-token row leaves two empty); 8 (more splits than the 7 tiles of the longest row); the
    heuristic's choice. fp32 within 1e-5."""
    q_nope, q_pe, kv, pe, seqlens = contiguous_batch()
    table = None
    if layout == 'paged':
        kv, pe, table = to_paged(kv, pe, LENS)
    ref_out, ref_lse = mla_decode_ref(q_nope, q_pe, kv, pe, seqlens, SCALE, block_table=table)
    out, lse = mla_decode(q_nope, q_pe, kv, pe, seqlens, SCALE, block_table=table, num_splits=num_splits,
                          impl='triton')
    assert out.shape == (B, H, DC) and out.dtype == q_nope.dtype and lse.shape == (B, H)
    assert lse.dtype == torch.float32
    check(out, lse, ref_out, ref_lse)


def test_reference_ignores_garbage_and_layout():
    """The twin itself: contiguous and paged give the same numbers, and row 0 (one token) is that token's value
    with lse = its score, by hand."""
    q_nope, q_pe, kv, pe, seqlens = contiguous_batch()
    out, lse = mla_decode_ref(q_nope, q_pe, kv, pe, seqlens, SCALE)
    kv_p, pe_p, table = to_paged(kv, pe, LENS)
    out_p, lse_p = mla_decode_ref(q_nope, q_pe, kv_p, pe_p, seqlens, SCALE, block_table=table)
    check(out_p, lse_p, out, lse)  # not bitwise: 256 gathered slots instead of 200 change the summation order
    torch.testing.assert_close(out[0], kv[0, :1].expand(H, DC), atol=1e-6, rtol=0)
    torch.testing.assert_close(lse[0], SCALE * (q_nope[0] @ kv[0, 0] + q_pe[0] @ pe[0, 0]), atol=1e-6, rtol=0)


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """Triton 3.9's interpreter multiplies bf16 tl.dot operands as their raw uint16 bit patterns (it stores bf16
    as uint16 and hands those to np.matmul). Widen them to fp32 first, exactly (a bf16 is the top half of an
    fp32), which is what the GPU's tensor cores compute with fp32 accumulation. Nothing to do on CUDA."""
    if CUDA:
        return
    import triton.language as tl
    from triton.runtime import interpreter
    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype != tl.bfloat16:
            return t
        return interpreter.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, 'create_dot',
                        lambda self, a, b, *rest: create_dot(self, widen(a), widen(b), *rest))


@pytest.mark.parametrize('layout', ['contiguous', 'paged'])
def test_kernel_bf16(layout, interpreter_bf16_dot):
    """bf16 cache and queries: scores accumulate in fp32 and the softmax weights are rounded to bf16 for the
    value product (as in FlashAttention), so out is within about one bf16 rounding of the fp32 reference."""
    q_nope, q_pe, kv, pe, seqlens = contiguous_batch(torch.bfloat16)
    table = None
    if layout == 'paged':
        kv, pe, table = to_paged(kv, pe, LENS)
    ref_out, ref_lse = mla_decode_ref(q_nope, q_pe, kv, pe, seqlens, SCALE, block_table=table)
    out, lse = mla_decode(q_nope, q_pe, kv, pe, seqlens, SCALE, block_table=table, num_splits=3, impl='triton')
    assert out.dtype == torch.bfloat16
    check(out, lse, ref_out, ref_lse, atol=2e-2)


def test_kernel_edge_lengths():
    """A length past the capacity is clamped to it (no read past the cache); an empty row gives 0 and -inf."""
    q_nope, q_pe, kv, pe, _ = contiguous_batch(lens=[S_MAX, S_MAX, 5, 64])
    seqlens = torch.tensor([0, S_MAX + 50, 5, 64], dtype=torch.int32, device=DEVICE)
    out, lse = mla_decode(q_nope, q_pe, kv, pe, seqlens, SCALE, num_splits=2, impl='triton')
    ref_out, ref_lse = mla_decode_ref(q_nope[1:], q_pe[1:], kv[1:], pe[1:], seqlens[1:].clamp(max=S_MAX), SCALE)
    check(out[1:], lse[1:], ref_out, ref_lse)
    assert (out[0] == 0).all() and (lse[0] == float('-inf')).all()


def test_errors():
    q_nope, q_pe, kv, pe, seqlens = contiguous_batch()
    kv_p, pe_p, table = to_paged(kv, pe, LENS)
    bad = {
        'q_nope not 3-d': (q_nope[0], q_pe, kv, pe, seqlens, None),
        'q_pe heads differ': (q_nope, q_pe[:, :2], kv, pe, seqlens, None),
        'kv width != d_c': (q_nope, q_pe, kv[..., :16], pe, seqlens, None),
        'kv and pe lengths differ': (q_nope, q_pe, kv, pe[:, :100], seqlens, None),
        'contiguous batch differs': (q_nope, q_pe, kv[:2], pe[:2], seqlens, None),
        'seqlens shape': (q_nope, q_pe, kv, pe, seqlens[:2], None),
        'seqlens float': (q_nope, q_pe, kv, pe, seqlens.float(), None),
        'table batch differs': (q_nope, q_pe, kv_p, pe_p, seqlens, table[:2]),
    }
    for impl in ('torch', 'triton'):
        for name, args in bad.items():
            with pytest.raises(ValueError):
                mla_decode(*args[:5], SCALE, block_table=args[5], impl=impl)
        with pytest.raises(TypeError):  # mixed dtypes
            mla_decode(q_nope, q_pe, kv.double(), pe, seqlens, SCALE, impl=impl)
    with pytest.raises(ValueError):  # the reference checks the lengths' values too
        mla_decode_ref(q_nope, q_pe, kv, pe, torch.zeros_like(seqlens), SCALE)
    with pytest.raises(ValueError):
        mla_decode(q_nope, q_pe, kv, pe, seqlens, SCALE, impl='cuda')


def test_auto_picks_torch_on_cpu():
    q_nope, q_pe, kv, pe, seqlens = [x.cpu() for x in contiguous_batch()]
    assert select_impl(q_nope, 'auto') == 'torch'
    out, lse = mla_decode(q_nope, q_pe, kv, pe, seqlens, SCALE)
    ref_out, ref_lse = mla_decode_ref(q_nope, q_pe, kv, pe, seqlens, SCALE)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    if CUDA:
        assert select_impl(q_nope.cuda(), 'auto') == 'triton'


# -----------------------------------------------------------------------------
# the reference against the MLA module


def tiny_mla(**kw):
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=H, n_embd=32, attn='mla', mla_impl='absorb',
                    q_lora_rank=12, kv_lora_rank=DC, qk_nope_head_dim=8, qk_rope_head_dim=DR, v_head_dim=12,
                    ffn='dense', **kw)
    return GPT(c).eval()


@torch.no_grad()
def test_reference_matches_mla_module_decode_step():
    """Prefill 5 tokens through a KVCache, decode the 6th, and recompute layer 1's attention output from its
    input: the absorbed query (W_UK folded in), mla_decode_ref over the cached latents (slots past 6 set to NaN),
    W_UV and wo. It must equal what MLA.forward returned; the kernel is run on the same cache too."""
    model = tiny_mla().to(DEVICE)
    P, Bm = 5, 2
    x = torch.randint(0, 64, (Bm, P + 1), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    attn = model.layers[1].attn
    seen = {}
    hook = attn.register_forward_hook(lambda mod, args, out: seen.update(args=args, out=out))
    cache = model.new_cache(Bm, 12)
    model(x[:, :P], cache=cache)
    model(x[:, P:], cache=cache, start=P)                        # the decode step under test
    hook.remove()
    h, cos, sin = seen['args'][:3]                               # (B, 1, C), (B, 1, d_R) x 2
    kvpe = cache.layers[1]['kvpe']                                # (B, 12, d_c + d_R)
    kv, pe = kvpe[..., :-DR], kvpe[..., -DR:]                    # (B, 12, d_c), (B, 12, d_R) views
    kv[:, P + 1:], pe[:, P + 1:] = NAN, NAN                      # never written; now visibly garbage

    dn, dv = attn.qk_nope_head_dim, attn.v_head_dim
    q = attn.wq_b(attn.q_norm(attn.wq_a(h))).view(Bm, 1, H, dn + DR)                  # (B, 1, H, dn+dR)
    q_nope, q_pe = q.split([dn, DR], dim=-1)
    q_pe = apply_rope(q_pe, cos, sin)[:, 0]                                             # (B, H, d_R)
    w = attn.wkv_b.weight.view(H, dn + dv, DC)                                          # (H, dn+dv, d_c)
    q_lat = torch.einsum('bhd,hdc->bhc', q_nope[:, 0], w[:, :dn])                       # (B, H, d_c)
    seqlens = torch.full((Bm,), P + 1, dtype=torch.int32, device=DEVICE)
    for impl in ('torch', 'triton'):
        o, _ = mla_decode(q_lat, q_pe, kv, pe, seqlens, attn.scale, impl=impl)         # (B, H, d_c)
        y = torch.einsum('bhc,hdc->bhd', o, w[:, dn:]).reshape(Bm, 1, H * dv)           # (B, 1, H*dv)
        torch.testing.assert_close(attn.wo(y), seen['out'], atol=1e-5, rtol=0, msg=impl)


@pytest.mark.skipif(not CUDA, reason="the sampler hook only takes the kernel for CUDA tensors")
def test_sampler_hook_matches_sdpa_on_cuda():
    """On CUDA, MLA.forward decodes through mla_decode under no_grad (as sample.generate runs) and through SDPA
    with grad enabled: cached decoding must give the same logits both ways."""
    model = tiny_mla().cuda()
    x = torch.randint(0, 64, (3, 16), device='cuda', generator=torch.Generator('cuda').manual_seed(0))
    runs = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            cache = model.new_cache(3, 16)
            steps = [model(x[:, :6], cache=cache)[0]]
            steps += [model(x[:, t:t + 1], cache=cache, start=t)[0] for t in range(6, 16)]
            runs.append(torch.cat(steps, dim=1).detach())
    torch.testing.assert_close(runs[0], runs[1], atol=1e-4, rtol=0)
