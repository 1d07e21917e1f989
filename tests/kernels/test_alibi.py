import math

import pytest
import torch
from frugalserve.kernels.alibi import alibi_slopes, alibi_slopes_list


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 32, 40, 64, 71])
def test_slopes_match_transformers_falcon(n):
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    bias = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n, torch.float32).view(n, 2)[:, 1]
    # Falcon rounds its slopes to bfloat16; ours are exact float32
    assert torch.equal(bias, alibi_slopes(n).bfloat16().float())


def test_power_of_two_is_geometric():
    assert alibi_slopes_list(8) == pytest.approx([2.0 ** -(i + 1) for i in range(8)])
    s = alibi_slopes_list(16)
    assert s[0] == pytest.approx(2 ** -0.5) and s[-1] == pytest.approx(2.0**-8)


def test_non_power_of_two_rule():
    # n=12: the 8 slopes of 8 heads, then every other slope of 16 heads (the paper's repo rule)
    s16 = alibi_slopes_list(16)
    assert alibi_slopes_list(12) == pytest.approx(alibi_slopes_list(8) + s16[0::2][:4])


def test_mpt_gen_slopes_equivalent():
    for n in (5, 12, 24, 48):
        p = 2 ** math.ceil(math.log2(n))
        m = torch.arange(1, p + 1, dtype=torch.float32) * (8 / p)
        s = 1.0 / torch.pow(2, m)
        mpt = torch.cat([s[1::2], s[::2]])[:n]
        torch.testing.assert_close(torch.sort(mpt).values, torch.sort(alibi_slopes(n)).values)


def test_bad_count():
    with pytest.raises(ValueError):
        alibi_slopes(0)
