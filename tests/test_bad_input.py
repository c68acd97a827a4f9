"""Malformed calls across the public API: each raises ValueError / TypeError naming the argument."""
from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn import layouts

f32 = torch.float32
q4 = torch.randn(1, 2, 8, 16)
kv4 = torch.randn(1, 2, 8, 16)
x2 = torch.randn(3, 16)
w16 = torch.ones(16)
cu = torch.tensor([0, 4, 8], dtype=torch.int32)
p3 = torch.randn(8, 2, 16)
lens = torch.tensor([3], dtype=torch.int32)
cache = torch.randn(1, 2, 8, 16)
dense_layout = layouts.dense(2, 8, block=16)

CASES = [
    # rms_norm
    ("rms_norm x not a tensor", lambda: pyattn.rms_norm([1.0], w16), TypeError, "x must be a torch.Tensor"),
    ("rms_norm x int", lambda: pyattn.rms_norm(torch.ones(2, 16, dtype=torch.int32), w16), TypeError, "x must have dtype"),
    ("rms_norm x 0-d", lambda: pyattn.rms_norm(torch.tensor(1.0), None), ValueError, "x must have at least 1 dims"),
    ("rms_norm weight shape", lambda: pyattn.rms_norm(x2, torch.ones(15)), ValueError, "weight must have shape"),
    ("rms_norm weight 2-D", lambda: pyattn.rms_norm(x2, torch.ones(1, 16)), ValueError, "weight must be 1-D"),
    ("rms_norm weight dtype", lambda: pyattn.rms_norm(x2, torch.ones(16, dtype=torch.int64)), TypeError, "weight must have dtype"),
    ("rms_norm eps 0", lambda: pyattn.rms_norm(x2, w16, 0.0), ValueError, "eps must be > 0"),
    ("rms_norm eps str", lambda: pyattn.rms_norm(x2, w16, "1e-6"), TypeError, "eps must be a number"),
    ("rms_norm residual shape", lambda: pyattn.rms_norm(x2, w16, residual=torch.randn(2, 16)), ValueError, "residual must have shape"),
    ("rms_norm residual dtype", lambda: pyattn.rms_norm(x2, w16, residual=x2.half()), TypeError, "residual has dtype"),
    ("rms_norm backend name", lambda: pyattn.rms_norm(x2, w16, backend="gpu"), ValueError, "backend must be one of"),
    ("rms_norm backend type", lambda: pyattn.rms_norm(x2, w16, backend=1), TypeError, "backend must be a string"),
    ("rms_norm hidden 0", lambda: pyattn.rms_norm(torch.randn(3, 0), None), ValueError, r"x.shape\[-1\]"),
    # glu / glu_ffn
    ("glu activation", lambda: pyattn.glu(x2, x2, "tanh"), ValueError, "activation must be one of"),
    ("glu activation type", lambda: pyattn.glu(x2, x2, 1), TypeError, "activation must be a string"),
    ("glu up shape", lambda: pyattn.glu(x2, torch.randn(3, 15)), ValueError, "up must have shape"),
    ("glu up dtype", lambda: pyattn.glu(x2, x2.half()), TypeError, "up has dtype"),
    ("glu gate type", lambda: pyattn.glu(None, x2), TypeError, "gate must be a torch.Tensor"),
    ("glu_ffn odd w_gate_up", lambda: pyattn.glu_ffn(x2, torch.randn(7, 16), torch.randn(16, 3)), ValueError, "w_gate_up must have an even"),
    ("glu_ffn hidden mismatch", lambda: pyattn.glu_ffn(x2, torch.randn(8, 15), torch.randn(16, 4)), ValueError, "w_gate_up has shape"),
    ("glu_ffn w_down shape", lambda: pyattn.glu_ffn(x2, torch.randn(8, 16), torch.randn(16, 5)), ValueError, "w_down must have shape"),
    ("glu_ffn w_down 1-D", lambda: pyattn.glu_ffn(x2, torch.randn(8, 16), torch.randn(16)), ValueError, "w_down must be 2-D"),
    ("glu_ffn bias_gate_up shape", lambda: pyattn.glu_ffn(x2, torch.randn(8, 16), torch.randn(16, 4), bias_gate_up=torch.randn(4)), ValueError, "bias_gate_up must have shape"),
    ("glu_ffn bias_down shape", lambda: pyattn.glu_ffn(x2, torch.randn(8, 16), torch.randn(16, 4), bias_down=torch.randn(4)), ValueError, "bias_down must have shape"),
    ("glu_ffn weight dtype", lambda: pyattn.glu_ffn(x2, torch.randn(8, 16).half(), torch.randn(16, 4)), TypeError, "w_gate_up has dtype"),
    ("glu_ffn activation", lambda: pyattn.glu_ffn(x2, torch.randn(8, 16), torch.randn(16, 4), activation="swish"), ValueError, "activation must be one of"),
    # attention
    ("attention q 3-D", lambda: pyattn.attention(q4[0], kv4, kv4), ValueError, "q must be 4-D"),
    ("attention k type", lambda: pyattn.attention(q4, "k", kv4), TypeError, "k must be a torch.Tensor"),
    ("attention k dtype", lambda: pyattn.attention(q4, kv4.half(), kv4), TypeError, "k has dtype"),
    ("attention head dim", lambda: pyattn.attention(q4, torch.randn(1, 2, 8, 8), kv4), ValueError, "k head dim 8"),
    ("attention v shape", lambda: pyattn.attention(q4, kv4, torch.randn(1, 2, 7, 16)), ValueError, "v must have the shape of k"),
    ("attention gqa heads", lambda: pyattn.attention(torch.randn(1, 3, 8, 16), kv4, kv4), ValueError, "number of query heads"),
    ("attention batch", lambda: pyattn.attention(q4, torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)), ValueError, "k batch size"),
    ("attention head dim 512", lambda: pyattn.attention(torch.randn(1, 1, 2, 512), torch.randn(1, 1, 2, 512), torch.randn(1, 1, 2, 512)), ValueError, "head dim must be in"),
    ("attention window type", lambda: pyattn.attention(q4, kv4, kv4, window=4), TypeError, "window must be a"),
    ("attention window negative", lambda: pyattn.attention(q4, kv4, kv4, window=(-1, 0)), ValueError, "window left size must be >= 0"),
    ("attention window float", lambda: pyattn.attention(q4, kv4, kv4, window=(1.5, 0)), TypeError, "window left size must be an int"),
    ("attention dropout 1", lambda: pyattn.attention(q4, kv4, kv4, dropout_p=1.0), ValueError, "dropout_p must be in"),
    ("attention dropout str", lambda: pyattn.attention(q4, kv4, kv4, dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    ("attention scale str", lambda: pyattn.attention(q4, kv4, kv4, scale="1"), TypeError, "scale must be a float"),
    ("attention alignment", lambda: pyattn.attention(q4, kv4, kv4, causal=True, causal_alignment="center"), ValueError, "causal_alignment must be"),
    ("attention key_padding_mask shape", lambda: pyattn.attention(q4, kv4, kv4, key_padding_mask=torch.ones(1, 7, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    ("attention key_padding_mask dtype", lambda: pyattn.attention(q4, kv4, kv4, key_padding_mask=torch.ones(1, 8, dtype=torch.int32)), TypeError, "key_padding_mask must have dtype"),
    ("attention attn_mask shape", lambda: pyattn.attention(q4, kv4, kv4, attn_mask=torch.ones(3, 8, dtype=torch.bool)), ValueError, "attn_mask must be broadcastable"),
    ("attention attn_mask dtype", lambda: pyattn.attention(q4, kv4, kv4, attn_mask=torch.ones(8, 8, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
    ("attention attn_mask type", lambda: pyattn.attention(q4, kv4, kv4, attn_mask=[[True]]), TypeError, "attn_mask must be a torch.Tensor"),
    ("attention bias shape", lambda: pyattn.attention(q4, kv4, kv4, bias=torch.randn(8, 7)), ValueError, "bias must be broadcastable"),
    ("attention bias 5-D", lambda: pyattn.attention(q4, kv4, kv4, bias=torch.randn(1, 1, 1, 8, 8)), ValueError, "bias must be broadcastable"),
    ("attention alibi shape", lambda: pyattn.attention(q4, kv4, kv4, alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape"),
    ("attention generator type", lambda: pyattn.attention(q4, kv4, kv4, dropout_p=0.1, generator=1), TypeError, "generator must be a torch.Generator"),
    ("attention backend", lambda: pyattn.attention(q4, kv4, kv4, backend="flash"), ValueError, "backend must be one of"),
    # varlen_attention
    ("varlen q 4-D", lambda: pyattn.varlen_attention(q4, p3, p3, cu, cu, 4, 4), ValueError, "q must be 3-D"),
    ("varlen cu dtype", lambda: pyattn.varlen_attention(p3, p3, p3, cu.long(), cu, 4, 4), TypeError, "cu_seqlens_q must have dtype"),
    ("varlen cu start", lambda: pyattn.varlen_attention(p3, p3, p3, torch.tensor([1, 8], dtype=torch.int32), cu, 8, 4), ValueError, "cu_seqlens_q must start at 0"),
    ("varlen cu decreasing", lambda: pyattn.varlen_attention(p3, p3, p3, cu, torch.tensor([0, 6, 5, 8], dtype=torch.int32), 4, 6), ValueError, "cu_seqlens_k must be non-decreasing"),
    ("varlen cu total", lambda: pyattn.varlen_attention(p3, p3, p3, torch.tensor([0, 4, 7], dtype=torch.int32), cu, 4, 4), ValueError, r"cu_seqlens_q\[-1\]"),
    ("varlen cu count", lambda: pyattn.varlen_attention(p3, p3, p3, cu, torch.tensor([0, 8], dtype=torch.int32), 4, 8), ValueError, "same number of sequences"),
    ("varlen cu 1 entry", lambda: pyattn.varlen_attention(p3, p3, p3, torch.tensor([0], dtype=torch.int32), cu, 4, 4), ValueError, "cu_seqlens_q must have at least 2"),
    ("varlen max_seqlen_q small", lambda: pyattn.varlen_attention(p3, p3, p3, cu, cu, 3, 4), ValueError, "max_seqlen_q must be >="),
    ("varlen max_seqlen_k type", lambda: pyattn.varlen_attention(p3, p3, p3, cu, cu, 4, None), TypeError, "max_seqlen_k must be an int"),
    ("varlen alibi shape", lambda: pyattn.varlen_attention(p3, p3, p3, cu, cu, 4, 4, alibi_slopes=torch.ones(3, 2)), ValueError, "alibi_slopes must have shape"),
    # sdpa
    ("sdpa query type", lambda: pyattn.sdpa(None, kv4, kv4), TypeError, "query must be a torch.Tensor"),
    ("sdpa query 1-D", lambda: pyattn.sdpa(torch.randn(4), kv4, kv4), ValueError, "query must have at least 2 dims"),
    ("sdpa rank mismatch", lambda: pyattn.sdpa(q4, kv4[0], kv4[0]), ValueError, "same number of dims"),
    ("sdpa gqa", lambda: pyattn.sdpa(torch.randn(1, 4, 8, 16), kv4, kv4), ValueError, "enable_gqa"),
    ("sdpa value length", lambda: pyattn.sdpa(q4, kv4, torch.randn(1, 2, 7, 16)), ValueError, "key and value must have the same sequence length"),
    # block-sparse attention and layouts
    ("block_sparse layout type", lambda: pyattn.block_sparse_attention(q4, kv4, kv4, torch.ones(1, 1)), TypeError, "layout must be a pyattn.BlockMask"),
    ("block_sparse layout lengths", lambda: pyattn.block_sparse_attention(q4, kv4, kv4, layouts.dense(2, 32, block=16)), ValueError, r"layout was built for \(Nq, Nk\)"),
    ("block_sparse causal type", lambda: pyattn.block_sparse_attention(q4, kv4, kv4, dense_layout, causal=1), TypeError, "causal must be a bool"),
    ("block_sparse key_padding_mask", lambda: pyattn.block_sparse_attention(q4, kv4, kv4, dense_layout, key_padding_mask=torch.ones(1, 8)), TypeError, "key_padding_mask must have dtype"),
    ("BlockMask.from_dense type", lambda: pyattn.BlockMask.from_dense([[1]]), TypeError, "layout must be a torch.Tensor"),
    ("BlockMask.from_dense float", lambda: pyattn.BlockMask.from_dense(torch.ones(2, 2)), TypeError, "layout must be bool or an integer"),
    ("BlockMask.from_dense rank", lambda: pyattn.BlockMask.from_dense(torch.ones(2, dtype=torch.bool)), ValueError, "layout must be"),
    ("BlockMask.from_dense lengths", lambda: pyattn.BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), block_size=16, seq_lengths=(80, 32)), ValueError, "seq_lengths"),
    ("BlockMask.from_bool_mask dtype", lambda: pyattn.BlockMask.from_bool_mask(torch.ones(1, 1, 8, 8)), TypeError, "mask must be bool"),
    ("BlockMask block_size", lambda: pyattn.BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), block_size=8), ValueError, "block_size must be one of"),
    ("BlockMask.from_bool_mask rank", lambda: pyattn.BlockMask.from_bool_mask(torch.ones(8, 8, dtype=torch.bool)), ValueError, "mask must be 4-D"),
    ("layouts.sliding_window blocks", lambda: layouts.sliding_window(2, 64, 16, num_sliding_window_blocks=0), ValueError, "num_sliding_window_blocks"),
    ("layouts.fixed attention", lambda: layouts.fixed(2, 64, 16, attention="sideways"), ValueError, "attention"),
    # lsh_attention
    ("lsh qk 3-D", lambda: pyattn.lsh_attention(q4[0], kv4), ValueError, "qk"),
    ("lsh v shape", lambda: pyattn.lsh_attention(q4, torch.randn(1, 2, 7, 16)), ValueError, "v"),
    ("lsh n_hashes", lambda: pyattn.lsh_attention(q4, kv4, n_hashes=0), ValueError, "n_hashes"),
    ("lsh n_buckets odd", lambda: pyattn.lsh_attention(q4, kv4, n_buckets=3), ValueError, "n_buckets"),
    ("lsh chunk_length", lambda: pyattn.lsh_attention(q4, kv4, chunk_length=0), ValueError, "chunk_length"),
    ("lsh key_padding_mask shape", lambda: pyattn.lsh_attention(q4, kv4, key_padding_mask=torch.ones(1, 7, dtype=torch.bool)), ValueError, "key_padding_mask"),
    # decode_attention
    ("decode q 3-D", lambda: pyattn.decode_attention(q4[0], cache, cache, lens), ValueError, "q must be 4-D"),
    ("decode cache_seqlens dtype", lambda: pyattn.decode_attention(q4, cache, cache, lens.long()), TypeError, "cache_seqlens must have dtype"),
    ("decode cache_seqlens shape", lambda: pyattn.decode_attention(q4, cache, cache, torch.tensor([1, 2], dtype=torch.int32)), ValueError, "cache_seqlens must have shape"),
    ("decode capacity", lambda: pyattn.decode_attention(q4, cache, cache, torch.tensor([9], dtype=torch.int32)), ValueError, "exceeds the cache capacity"),
    ("decode v_cache shape", lambda: pyattn.decode_attention(q4, cache, torch.randn(1, 2, 7, 16), lens), ValueError, "v_cache must have the shape"),
    ("decode k_new alone", lambda: pyattn.decode_attention(q4, cache, cache, lens, k_new=q4), ValueError, "k_new and v_new"),
    ("decode num_splits", lambda: pyattn.decode_attention(q4, cache, cache, lens, num_splits=0), ValueError, "num_splits"),
    ("decode block_table dtype", lambda: pyattn.decode_attention(q4, cache, cache, lens, block_table=torch.zeros(1, 1)), TypeError, "block_table must have dtype"),
    ("decode cache strided", lambda: pyattn.decode_attention(q4, torch.randn(1, 2, 8, 32)[..., ::2], cache, lens), ValueError, "k_cache must have a unit stride"),
    # nn modules
    ("RMSNorm input size", lambda: pyattn.nn.RMSNorm(16)(torch.randn(2, 8)), ValueError, "weight must have shape"),
    ("GLUFeedForward activation", lambda: pyattn.nn.GLUFeedForward(16, 8, activation="tanh")(x2), ValueError, "activation"),
    ("GLUFeedForward input size", lambda: pyattn.nn.GLUFeedForward(16, 8)(torch.randn(2, 8)), ValueError, "hidden"),
    ("RMSNorm hidden_size", lambda: pyattn.nn.RMSNorm(0), ValueError, "hidden_size must be a positive int"),
    ("MultiheadAttention embed_dim", lambda: pyattn.nn.MultiheadAttention(10, 3), ValueError, "embed_dim"),
    ("MultiheadAttention num_heads", lambda: pyattn.nn.MultiheadAttention(8, 0), ValueError, "num_heads"),
    ("MultiheadAttention dropout", lambda: pyattn.nn.MultiheadAttention(8, 2, dropout=1.5), ValueError, "dropout"),
    ("MultiheadAttention key_padding_mask shape", lambda: _mha()(x3, x3, x3, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
     ValueError, "key_padding_mask must have shape"),
    ("MultiheadAttention query rank", lambda: _mha()(torch.randn(5, 7), x3, x3), ValueError, "key must be 2-D like query"),
    ("GroupedQueryAttention embed_dim", lambda: pyattn.nn.GroupedQueryAttention(10, 3), ValueError, "embed_dim"),
    # integrations
    ("patch model type", lambda: pyattn.patch("model"), TypeError, "model must be a torch.nn.Module"),
    ("unpatch model type", lambda: pyattn.unpatch(3), TypeError, "model must be a torch.nn.Module"),
    # model configs
    ("BertConfig vocab_size", lambda: _models().BertConfig(vocab_size=0), ValueError, "vocab_size must be a positive int"),
    ("BertConfig heads", lambda: _models().BertConfig(hidden_size=10, num_attention_heads=3), ValueError, "num_attention_heads"),
    ("BertConfig dropout", lambda: _models().BertConfig(hidden_dropout_prob=1.0), ValueError, "hidden_dropout_prob"),
    ("LlamaConfig heads", lambda: _llama().LlamaForCausalLM(_llama().LlamaConfig(hidden_size=10, num_attention_heads=3)),
     ValueError, "num_attention_heads"),
    ("LlamaConfig kv heads", lambda: _llama().LlamaForCausalLM(_llama().LlamaConfig(hidden_size=32, num_attention_heads=4,
                                                                                   num_key_value_heads=3)),
     ValueError, "num_key_value_heads"),
]


def _mha():
    return pyattn.nn.MultiheadAttention(8, 2, batch_first=True)


def _models():
    import pyattn.models
    return pyattn.models


def _llama():
    import pyattn.models.llama
    return pyattn.models.llama


x3 = torch.randn(2, 5, 8)


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_call(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_at_least_60_cases():
    assert len(CASES) >= 60
