"""relattn.nn decoder layer and stack: torch's decoder with position="none", gradients, shared tables,
checkpointing, and incremental decoding with a KVCache (self-attention appended, memory projected once)."""
import pytest
import torch
from torch import nn

from relattn import nn as rnn
from test_nn import copy_mha_weights, randomize_

E, H = 32, 4
F64 = torch.float64


def copy_decoder_layer_weights(theirs: nn.TransformerDecoderLayer, ours: rnn.RelativeTransformerDecoderLayer):
    copy_mha_weights(theirs.self_attn, ours.self_attn)
    copy_mha_weights(theirs.multihead_attn, ours.multihead_attn)
    for name in ("linear1", "linear2", "norm1", "norm2", "norm3"):
        getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_none_matches_torch(norm_first):
    torch.manual_seed(0)
    theirs = nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, activation="gelu", batch_first=True,
                                        norm_first=norm_first)
    randomize_(theirs)
    ours = rnn.RelativeTransformerDecoderLayer(E, H, 64, dropout=0.0, activation="gelu", norm_first=norm_first,
                                               position="none")
    copy_decoder_layer_weights(theirs, ours)
    tgt, memory = torch.randn(3, 9, E), torch.randn(3, 13, E)
    memory_mask = torch.zeros(3, 13, dtype=torch.bool)
    memory_mask[1, 10:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(9)
    got = ours(tgt, memory, tgt_is_causal=True, memory_key_padding_mask=memory_mask)
    want = theirs(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=memory_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decoder_none_matches_torch():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True, norm_first=True)
    theirs = nn.TransformerDecoder(layer, 3, nn.LayerNorm(E))
    randomize_(theirs)
    ours = rnn.RelativeTransformerDecoder(
        rnn.RelativeTransformerDecoderLayer(E, H, 64, dropout=0.0, norm_first=True, position="none"), 3,
        nn.LayerNorm(E))
    for t, o in zip(theirs.layers, ours.layers):
        copy_decoder_layer_weights(t, o)
    ours.norm.load_state_dict(theirs.norm.state_dict())
    tgt, memory = torch.randn(2, 7, E), torch.randn(2, 11, E)
    tgt_padding = torch.zeros(2, 7, dtype=torch.bool)
    tgt_padding[0, :2] = True  # left padding: every query keeps a key
    torch.testing.assert_close(ours(tgt, memory, tgt_key_padding_mask=tgt_padding),
                               theirs(tgt, memory, tgt_key_padding_mask=tgt_padding), atol=1e-5, rtol=1e-5)


def _decoder(position="t5", layers=3, norm_first=True, share=False, checkpoint=False, dtype=F64, **kw):
    torch.manual_seed(0)
    scheme = dict(t5=dict(num_buckets=8, max_distance=16, bidirectional=False), shaw=dict(max_distance=3),
                  alibi={}, clip_bias=dict(max_distance=2), none={})[position]
    layer = rnn.RelativeTransformerDecoderLayer(E, H, 48, dropout=0.0, norm_first=norm_first, position=position,
                                                **scheme, **kw, dtype=dtype)
    decoder = rnn.RelativeTransformerDecoder(layer, layers, nn.LayerNorm(E, dtype=dtype),
                                             share_relative_tables=share, checkpoint=checkpoint)
    randomize_(decoder)
    return decoder


def test_relative_positions_reach_the_self_attention_only():
    decoder = _decoder("clip_bias")
    layer = decoder.layers[0]
    assert set(layer.self_attn.relative_tables()) == {"rel_bias"}
    assert layer.multihead_attn.position == "none" and layer.multihead_attn.relative_tables() == {}
    # Shifting the memory's order changes nothing for a position-free cross-attention ...
    tgt, memory = torch.randn(2, 6, E, dtype=F64), torch.randn(2, 9, E, dtype=F64)
    perm = torch.randperm(9)
    torch.testing.assert_close(decoder(tgt, memory, tgt_is_causal=True),
                               decoder(tgt, memory[:, perm], tgt_is_causal=True))
    # ... while the target's relative bias matters.
    with torch.no_grad():
        before = decoder(tgt, memory, tgt_is_causal=True)
        layer.self_attn.rel_bias.add_(1.0 * torch.randn_like(layer.self_attn.rel_bias))
        assert not torch.allclose(decoder(tgt, memory, tgt_is_causal=True), before)


@pytest.mark.parametrize("share", [False, True])
def test_gradients_shared_tables_and_checkpointing(share):
    decoder = _decoder("shaw", share=share)
    tgt = torch.randn(2, 8, E, dtype=F64, requires_grad=True)
    memory = torch.randn(2, 5, E, dtype=F64, requires_grad=True)
    grads = []
    for checkpoint in (False, True):
        decoder.checkpoint = checkpoint
        decoder.zero_grad()
        tgt.grad = memory.grad = None
        decoder(tgt, memory, tgt_is_causal=True).square().sum().backward()
        named = {n: p.grad.clone() for n, p in decoder.named_parameters()}
        grads.append((named, tgt.grad.clone(), memory.grad.clone()))
        for name, g in named.items():
            assert g.abs().sum() > 0, name
    for a, b in zip(grads[0][0].values(), grads[1][0].values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2])
    tables = [layer.self_attn.rel_k for layer in decoder.layers]
    assert all(t is tables[0] for t in tables) == share


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static_shapes"])
@pytest.mark.parametrize("position", ["t5", "shaw", "alibi", "none"])
def test_incremental_decoding_equals_causal_run(position, static):
    decoder = _decoder(position, num_kv_heads=2).eval()
    tgt, memory = torch.randn(3, 12, E, dtype=F64), torch.randn(3, 10, E, dtype=F64)
    memory_padding = torch.zeros(3, 10, dtype=torch.bool)
    memory_padding[2, 6:] = True
    tgt_padding = torch.zeros(3, 12, dtype=torch.bool)
    tgt_padding[1, :2] = True  # a left-padded prompt
    cache = rnn.KVCache(16, static_shapes=static)
    # the self-attention's key padding mask covers the cached keys: the whole slot with static shapes
    cached_padding = torch.cat([tgt_padding, torch.zeros(3, 4, dtype=torch.bool)], 1) if static else tgt_padding
    projected = []
    for layer in decoder.layers:  # count the memory projections of the cross-attention
        layer.multihead_attn.k_proj.register_forward_hook(lambda *args: projected.append(1))
    with torch.no_grad():
        want = decoder(tgt, memory, tgt_key_padding_mask=tgt_padding, memory_key_padding_mask=memory_padding,
                       tgt_is_causal=True)
        projected.clear()
        outs, start = [], 0
        for n in (4, 1, 1, 3, 1, 1, 1):
            mask = cached_padding if static else tgt_padding[:, :start + n]
            outs.append(decoder(tgt[:, start:start + n], memory, tgt_key_padding_mask=mask,
                                memory_key_padding_mask=memory_padding, tgt_is_causal=True, cache=cache))
            start += n
    assert start == 12 and (cache.lengths.tolist() == [12] * 3 if static else len(cache) == 12)
    assert len(projected) == len(decoder.layers)  # once per layer, at the first call
    real = ~tgt_padding
    torch.testing.assert_close(torch.cat(outs, 1)[real], want[real], rtol=1e-10, atol=1e-10)


def test_cache_reorder_covers_the_memory():
    decoder = _decoder("t5").eval()
    tgt, memory = torch.randn(2, 7, E, dtype=F64), torch.randn(2, 5, E, dtype=F64)
    index = torch.tensor([1, 1, 0])
    cache = rnn.KVCache(8)
    with torch.no_grad():
        decoder(tgt[:, :4], memory, tgt_is_causal=True, cache=cache)
        cache.reorder(index)
        got = decoder(tgt[index, 4:], memory[index], tgt_is_causal=True, cache=cache)
        want = decoder(tgt[index], memory[index], tgt_is_causal=True)[:, 4:]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bad_input():
    decoder = _decoder("none", layers=1)
    tgt, memory = torch.randn(2, 4, E, dtype=F64), torch.randn(2, 5, E, dtype=F64)
    with pytest.raises(ValueError, match="memory_mask is only accepted together with is_causal=True"):
        decoder(tgt, memory, memory_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_layers must be positive"):
        rnn.RelativeTransformerDecoder(decoder.layers[0], 0)
    with torch.no_grad():
        cache = rnn.KVCache(8)
        decoder(tgt, memory, tgt_is_causal=True, cache=cache)
        with pytest.raises(ValueError, match="batch 3, .* the cached keys batch 2"):
            decoder(torch.randn(3, 1, E, dtype=F64), torch.randn(3, 5, E, dtype=F64), tgt_is_causal=True,
                    cache=cache)
        cross = decoder.layers[0].multihead_attn
        memory3 = torch.randn(3, 5, E, dtype=F64)
        with pytest.raises(ValueError, match="cross-attention keys batch 2"):
            cross(torch.randn(3, 1, E, dtype=F64), memory3, memory3, cache=cache)
        with pytest.raises(ValueError, match="causal cross-attention with a cache"):
            decoder(tgt[:, :1], memory, tgt_is_causal=True, memory_is_causal=True, cache=rnn.KVCache(8))


def test_decoder_compiles_fullgraph():
    torch._dynamo.reset()
    decoder = _decoder("t5", dtype=torch.float32, share=True, checkpoint=True)
    tgt, memory = torch.randn(2, 7, E), torch.randn(2, 9, E)
    memory_padding = torch.zeros(2, 9, dtype=torch.bool)
    memory_padding[0, 6:] = True

    def forward(t, m):
        return decoder(t, m, memory_key_padding_mask=memory_padding, tgt_is_causal=True)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, forward):
        decoder.zero_grad()
        out = fn(tgt, memory)
        out.square().sum().backward()
        results.append((out, [p.grad.clone() for p in decoder.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_state_dict_names_follow_torch():
    ours = rnn.RelativeTransformerDecoderLayer(E, H, 64, position="none")
    theirs = nn.TransformerDecoderLayer(E, H, 64, batch_first=True)
    # torch packs q/k/v into in_proj; every other name matches torch's decoder layer.
    ours_names = {n.split(".")[0] for n in ours.state_dict()}
    theirs_names = {n.split(".")[0] for n in theirs.state_dict()}
    assert ours_names == theirs_names
