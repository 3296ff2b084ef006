"""LQER's groupwise codes round-trip for any LQER_ASYM_GROUP: the artifact stores codes and scales
only, so the group size must follow from their counts (stored_group)."""

import pytest
import torch

import train_gpt as tg


def reference(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Groupwise asymmetric-range quantization written out: groups of `group`, step max|g| / (2^(b-1) - 0.5)."""
    n, half = x.numel(), 2 ** (bits - 1)
    flat = torch.nn.functional.pad(x.flatten(), (0, -n % group)).view(-1, group)
    step = (flat.abs().amax(1) / (half - 0.5)).clamp_min(tg.SDCLIP_SCALE_FLOOR).half().float()
    return (torch.clamp(torch.round(flat / step[:, None]), -half, half - 1) * step[:, None]).flatten()[:n]


@pytest.mark.parametrize("n,group,used", [(2048, 64, 64), (384, 64, 64), (10, 6, 5), (2000, 48, 48), (300, 100, 100),
                                          (310, 100, 78), (7, 64, 7)])
def test_groups_round_trip_with_the_size_the_counts_give(n, group, used):
    assert tg.stored_group(n, group) == used
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    q, s = tg.quantize_groups(x, 4, group)
    assert s.numel() == -(-n // used)
    assert torch.equal(tg.dequantize_groups(q, s), reference(x, 4, used))


def test_a_dividing_group_is_kept_and_every_size_is_recoverable():
    for n in range(1, 400):
        for group in (1, 3, 6, 16, 48, 64, 100):
            used = tg.stored_group(n, group)
            assert used <= group and -(-n // -(-n // used)) == used
            if n % group == 0:
                assert used == group
