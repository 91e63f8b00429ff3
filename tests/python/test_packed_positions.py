"""Absolute positions of packed sequences: relattn.segment_positions / segment_lengths against a plain
Python count, and the absolute encodings of relattn.nn with segment_ids against each sequence encoded
alone."""
import pytest
import torch

import relattn
from relattn import nn as rnn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_positions(ids: torch.Tensor):
    """(positions, lengths) by counting, row by row, in Python."""
    flat = ids.reshape(-1, ids.shape[-1]).tolist()
    pos, length = [], []
    for row in flat:
        seen = {}
        pos.append([])
        for t in row:
            pos[-1].append(seen.get(t, 0))
            seen[t] = seen.get(t, 0) + 1
        length.append([seen[t] for t in row])
    shape = ids.shape
    return (torch.tensor(pos, dtype=torch.int64).reshape(shape),
            torch.tensor(length, dtype=torch.int64).reshape(shape))


def packed_ids(lengths, total=None):
    """Ids 0, 1, 2, ... repeated by `lengths`, padded to `total` with one more id."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if total is not None and total > ids.numel():
        ids = torch.cat([ids, torch.full((total - ids.numel(),), len(lengths))])
    return ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("kind", ["sorted", "unsorted", "one", "all_distinct"])
def test_positions_and_lengths_match_counting(device, dtype, kind):
    g = torch.Generator().manual_seed(7)
    B, L = 3, 67
    if kind == "sorted":
        ids = torch.sort(torch.randint(0, 9, (B, L), generator=g), dim=1).values
    elif kind == "unsorted":
        ids = torch.randint(0, 5, (B, L), generator=g)
    elif kind == "one":
        ids = torch.full((B, L), 4)
    else:
        ids = torch.randperm(L, generator=g).expand(B, L)
    ids = ids.to(dtype)
    pos, length = reference_positions(ids)
    got_pos = relattn.segment_positions(ids.to(device))
    got_len = relattn.segment_lengths(ids.to(device))
    assert got_pos.dtype == torch.int64 and got_len.dtype == torch.int64
    assert got_pos.device.type == device
    torch.testing.assert_close(got_pos.cpu(), pos, rtol=0, atol=0)
    torch.testing.assert_close(got_len.cpu(), length, rtol=0, atol=0)


def test_positions_of_the_docstring_example():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert relattn.segment_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0]]
    assert relattn.segment_lengths(ids).tolist() == [[3, 3, 3, 2, 2, 1]]


@pytest.mark.parametrize("shape", [(11,), (2, 3, 13), (1, 1)])
def test_any_leading_dims(shape):
    ids = torch.randint(-3, 3, shape, generator=torch.Generator().manual_seed(1))  # negative ids too
    pos, length = reference_positions(ids)
    assert torch.equal(relattn.segment_positions(ids), pos)
    assert torch.equal(relattn.segment_lengths(ids), length)


def test_non_contiguous_ids():
    base = torch.randint(0, 4, (29, 5), generator=torch.Generator().manual_seed(2))
    ids = base.t()  # [5, 29], rows strided
    assert not ids.is_contiguous()
    pos, length = reference_positions(ids.contiguous())
    assert torch.equal(relattn.segment_positions(ids), pos)
    assert torch.equal(relattn.segment_lengths(ids), length)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,), (2, 0, 3)])
def test_empty(shape):
    ids = torch.zeros(shape, dtype=torch.int32)
    for fn in (relattn.segment_positions, relattn.segment_lengths):
        out = fn(ids)
        assert out.shape == ids.shape and out.dtype == torch.int64


@pytest.mark.parametrize("fn", [relattn.segment_positions, relattn.segment_lengths])
def test_bad_input(fn):
    name = fn.__name__
    with pytest.raises(RuntimeError, match=rf"{name}: segment_ids must have an integer dtype, got Float"):
        fn(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match=rf"{name}: segment_ids must have an integer dtype, got Bool"):
        fn(torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=rf"{name}: segment_ids must have at least one dimension"):
        fn(torch.tensor(3))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles(dynamic):
    f = torch.compile(lambda t: (relattn.segment_positions(t), relattn.segment_lengths(t)), fullgraph=True,
                      dynamic=dynamic)
    for ids in (torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]]), torch.tensor([[4, 4, 1], [2, 7, 2]])):
        pos, length = f(ids)
        ref_pos, ref_length = reference_positions(ids)
        assert torch.equal(pos, ref_pos) and torch.equal(length, ref_length)


@pytest.mark.parametrize("op", ["segment_positions", "segment_lengths"])
def test_opcheck(op):
    g = torch.Generator().manual_seed(5)
    for ids in (torch.randint(0, 3, (2, 9), generator=g), torch.randint(0, 3, (4,), generator=g).int(),
                torch.randint(0, 3, (2, 3, 5), generator=g)):
        torch.library.opcheck(getattr(torch.ops.relattn, op).default, (ids,))


# -- the absolute encodings of relattn.nn with segment_ids ------------------------------------------------

LENGTHS = [[5, 17, 1, 9], [32], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2]]  # rows of 32 tokens


def encodings(d_model):
    torch.manual_seed(0)
    return {
        "sinusoidal": rnn.SinusoidalPositionalEncoding(d_model),
        "sinusoidal_table": rnn.SinusoidalPositionalEncoding(d_model, max_len=64),
        "learned": rnn.LearnedPositionalEncoding(40, d_model),
        "mlp": rnn.MLPPositionalEncoding(d_model, hidden=16),
        "mlp_scaled": rnn.MLPPositionalEncoding(d_model, hidden=16, scale=0.25),
    }


def packed_batch(d_model, dtype=torch.float64):
    torch.manual_seed(1)
    ids = torch.stack([packed_ids(row) for row in LENGTHS])
    x = torch.randn(len(LENGTHS), 32, d_model, dtype=dtype)
    return x, ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sinusoidal", "sinusoidal_table", "learned", "mlp", "mlp_scaled"])
@pytest.mark.parametrize("d_model", [8, 7])
def test_packed_encoding_equals_each_sequence_alone(device, name, d_model):
    enc = encodings(d_model)[name].to(device=device, dtype=torch.float64)
    x, ids = packed_batch(d_model)
    x, ids = x.to(device).requires_grad_(), ids.to(device)
    out = enc(x, segment_ids=ids)
    out.pow(2).sum().backward()
    packed_grads = [p.grad.clone() for p in enc.parameters()]
    packed_dx = x.grad.clone()
    enc.zero_grad()
    x.grad = None

    expected = torch.empty_like(x, requires_grad=False)
    for b, row in enumerate(LENGTHS):
        start = 0
        for n in row:
            piece = enc(x[b:b + 1, start:start + n])
            expected[b, start:start + n] = piece[0]
            piece.pow(2).sum().backward()
            start += n
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-6)
    torch.testing.assert_close(packed_dx, x.grad, rtol=1e-12, atol=1e-6)
    for got, p in zip(packed_grads, enc.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["sinusoidal", "learned", "mlp", "mlp_scaled"])
def test_one_segment_equals_no_segments(name):
    enc = encodings(8)[name].double()
    x = torch.randn(2, 19, 8, dtype=torch.float64)
    ids = torch.full((2, 19), 3, dtype=torch.int32)
    torch.testing.assert_close(enc(x, segment_ids=ids), enc(x), rtol=1e-12, atol=1e-6)


def test_unsorted_ids_count_positions_per_id():
    enc = rnn.LearnedPositionalEncoding(8, 4).double()
    x = torch.zeros(1, 6, 4, dtype=torch.float64)
    ids = torch.tensor([[1, 0, 1, 0, 0, 1]])
    out = enc(x, segment_ids=ids)
    assert torch.equal(out[0], enc.weight[torch.tensor([0, 0, 1, 1, 2, 2])])


def test_learned_table_longer_rows_than_max_len():
    enc = rnn.LearnedPositionalEncoding(8, 4)
    x = torch.randn(2, 12, 4)
    # Rows of 12 tokens with sequences of at most 8 fit the 8-row table.
    ok = torch.tensor([[0] * 8 + [1] * 4, [0] * 6 + [1] * 6])
    assert enc(x, segment_ids=ok).shape == x.shape
    with pytest.raises(ValueError, match="sequence length 12 exceeds the table's max_len=8"):
        enc(x)
    too_long = torch.tensor([[0] * 8 + [1] * 4, [0] * 3 + [1] * 9])
    with pytest.raises(ValueError, match="a packed sequence of length 9 exceeds the table's max_len=8"):
        enc(x, segment_ids=too_long)


@pytest.mark.parametrize("name", ["sinusoidal", "learned", "mlp"])
def test_encoding_bad_segment_ids(name):
    enc = encodings(8)[name]
    x = torch.randn(2, 5, 8)
    cls = type(enc).__name__
    with pytest.raises(ValueError, match=rf"{cls}: segment_ids must be \[B, L\] = \[2, 5\] like the input, got \[2, 4\]"):
        enc(x, segment_ids=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=rf"{cls}: segment_ids must be \[B, L\]"):
        enc(x, segment_ids=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="segment_ids must have an integer dtype"):
        enc(x, segment_ids=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=rf"{cls}: segment_ids must be on the input's device \(meta\), got cpu"):
        enc(x.to("meta"), segment_ids=torch.zeros(2, 5, dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
def test_packed_model_equals_each_sequence_alone(device):
    """Token embedding + absolute encoding + relative encoder on packed rows: each sequence's output and
    every parameter gradient equal those of the sequences run one by one."""
    torch.manual_seed(3)
    d = 16
    emb = torch.nn.Embedding(50, d)
    enc = rnn.LearnedPositionalEncoding(32, d)
    layer = rnn.RelativeTransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, position="shaw",
                                               max_distance=4)
    stack = rnn.RelativeTransformerEncoder(layer, num_layers=2)
    modules = torch.nn.ModuleList([emb, enc, stack]).to(device=device, dtype=torch.float64)
    tokens = torch.randint(0, 50, (len(LENGTHS), 32), device=device)
    ids = torch.stack([packed_ids(row) for row in LENGTHS]).to(device)

    def run(tok, seg):
        return stack(enc(emb(tok), segment_ids=seg), segment_ids=seg)

    out = run(tokens, ids)
    out.pow(2).sum().backward()
    packed_grads = [p.grad.clone() for p in modules.parameters()]
    modules.zero_grad()
    for b, row in enumerate(LENGTHS):
        start = 0
        for n in row:
            alone = stack(enc(emb(tokens[b:b + 1, start:start + n])))
            torch.testing.assert_close(out[b:b + 1, start:start + n], alone, rtol=1e-10, atol=1e-10)
            alone.pow(2).sum().backward()
            start += n
    for got, p in zip(packed_grads, modules.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-10)


def test_encodings_with_segment_ids_compile():
    enc = rnn.MLPPositionalEncoding(8, hidden=16)
    x, ids = packed_batch(8, torch.float32)
    compiled = torch.compile(enc, fullgraph=True)
    torch.testing.assert_close(compiled(x, segment_ids=ids), enc(x, segment_ids=ids))
