"""The helpers of SPEC §3 against the formulas they promise: T5's bucket function (as HF transformers
writes it), the ALiBi paper's slopes, and Shaw's clipping."""
import math

import pytest
import torch

import relattn


def hf_t5_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """HF transformers' T5Attention._relative_position_bucket, line for line (torch, float32 logs)."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def paper_alibi_slopes(n):
    """get_slopes of Press et al., "Train Short, Test Long" (the ALiBi reference code)."""
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio ** i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + paper_alibi_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2])


T5_SETTINGS = [
    (32, 128, True),  # T5's defaults
    (32, 128, False),  # decoder self-attention
    (16, 64, True),
    (8, 20, True),
    (64, 256, False),
    (10, 50, True),  # num_buckets/2 odd
    (7, 30, False),  # odd num_buckets
    (4, 2, True),  # the smallest valid bidirectional table
    (2, 2, False),  # the smallest valid unidirectional table
    (32, 1000, True),  # max_distance beyond the distances tested
]


@pytest.mark.parametrize("num_buckets,max_distance,bidirectional", T5_SETTINGS,
                         ids=lambda x: str(x) if not isinstance(x, bool) else ("bi" if x else "uni"))
def test_t5_buckets_equal_t5_formula(num_buckets, max_distance, bidirectional):
    table = relattn.t5_buckets(num_buckets, max_distance, bidirectional)
    M = max_distance
    assert table.dtype == torch.int64 and table.shape == (2 * M + 1,)
    d = torch.arange(-1000, 1001)  # j - i
    got = table[d.clamp(-M, M) + M]
    expected = hf_t5_relative_position_bucket(d, bidirectional, num_buckets, max_distance)
    mismatch = (got != expected).nonzero().flatten()
    assert mismatch.numel() == 0, (f"distances {d[mismatch][:10].tolist()}: got {got[mismatch][:10].tolist()}, "
                                   f"T5 gives {expected[mismatch][:10].tolist()}")
    assert int(table.min()) >= 0 and int(table.max()) < num_buckets


def test_t5_buckets_defaults():
    assert torch.equal(relattn.t5_buckets(), relattn.t5_buckets(32, 128, True))


@pytest.mark.parametrize("num_heads", range(1, 65))
def test_alibi_slopes_equal_paper(num_heads):
    got = relattn.alibi_slopes(num_heads)
    expected = torch.tensor(paper_alibi_slopes(num_heads), dtype=torch.float64).float()
    assert got.dtype == torch.float32 and got.shape == (num_heads,)
    assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"


def test_alibi_slopes_known_values():
    # The paper: for 8 heads the slopes are 1/2, 1/4, ..., 1/256.
    assert torch.equal(relattn.alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))


@pytest.mark.parametrize("max_distance", [0, 1, 5, 128])
def test_clip_buckets(max_distance):
    got = relattn.clip_buckets(max_distance)
    assert got.dtype == torch.int64
    assert torch.equal(got, torch.arange(2 * max_distance + 1))


def test_helpers_take_a_device():
    assert relattn.clip_buckets(2, device="cpu").device.type == "cpu"
    assert relattn.t5_buckets(device="cpu").device.type == "cpu"
    assert relattn.alibi_slopes(4, device="cpu").device.type == "cpu"


def test_cuda_kernels_built_is_a_bool():
    assert isinstance(relattn.cuda_kernels_built(), bool)
