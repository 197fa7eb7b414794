import numpy as np
import pytest

from beitv2.config import ConfigError
from beitv2.masking import BlockwiseMaskGenerator, RandomMaskGenerator, build_mask_generator, count_blocks


@pytest.mark.parametrize("grid,n,min_block", [(14, 75, 16), ((14, 14), 98, 16), (7, 20, 4), (7, 20, 16),
                                              ((8, 12), 40, 16), (4, 16, 16), (6, 1, 16), (10, 0, 16)])
def test_blockwise_exact_count_over_many_draws(grid, n, min_block):
    g = BlockwiseMaskGenerator(grid, n, min_num_patches=min_block, seed=1)
    h, w = (grid, grid) if isinstance(grid, int) else grid
    for _ in range(1500):
        m = g()
        assert m.shape == (h, w) and m.dtype == bool
        assert int(m.sum()) == n


def test_random_generator_exact_count():
    g = RandomMaskGenerator((5, 9), 17, seed=0)
    assert all(int(g().sum()) == 17 for _ in range(500))


def test_mean_number_of_blocks_matches_reference():
    g = BlockwiseMaskGenerator(14, 75, seed=0)
    blocks, topups = [], 0
    for _ in range(3000):
        m = g()
        blocks.append(g.last_num_blocks)
        topups += count_blocks(m) > g.last_num_blocks  # scattered single patches from the top-up
    assert 3.9 < np.mean(blocks) < 4.3  # the official generator: about 4.1 per mask
    assert 0.05 < topups / 3000 < 0.6  # the top-up happens for a sizeable minority of masks


def test_same_seed_same_masks_and_rng_argument():
    a = BlockwiseMaskGenerator(14, 75, seed=7)
    b = BlockwiseMaskGenerator(14, 75, seed=7)
    c = BlockwiseMaskGenerator(14, 75, seed=8)
    ma, mb, mc = [np.stack([g() for _ in range(20)]) for g in (a, b, c)]
    assert np.array_equal(ma, mb) and not np.array_equal(ma, mc)
    r1, r2 = np.random.default_rng([1, 2, 3]), np.random.default_rng([1, 2, 3])
    assert np.array_equal(a(r1), c(r2))  # an explicit rng decides everything


def test_masks_are_blocky_not_random():
    g = BlockwiseMaskGenerator(14, 75, seed=0)
    r = RandomMaskGenerator(14, 75, seed=0)
    mean_b = np.mean([count_blocks(g()) for _ in range(200)])
    mean_r = np.mean([count_blocks(r()) for _ in range(200)])
    assert mean_b < 8 < mean_r


def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="mask.num_masking_patches"):
        BlockwiseMaskGenerator(4, 17)
    with pytest.raises(ConfigError, match="mask.kind"):
        build_mask_generator("spiral", 4, 3)


def test_block_aspect_ratio_spans_tall_and_wide_blocks():
    """Aspect ratios are log-uniform in [min_aspect, 1 / min_aspect] (official `max_aspect = 1 / min_aspect`): single
    16-patch blocks come out taller than wide about as often as wider than tall (seeded: 78 tall, 88 wide of 288)."""
    g = BlockwiseMaskGenerator(14, 16, min_num_patches=16, max_num_patches=16, top_up=False, seed=3)
    tall = wide = singles = 0
    for _ in range(400):
        m = g()
        if g.last_num_blocks != 1:
            continue
        singles += 1
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert h * w == m.sum()  # one filled rectangle
        tall += h > w
        wide += h < w
    assert singles > 200
    # log-uniform aspect: as many tall as wide blocks (squares are the rest); one fixed aspect gives one kind only
    assert tall > 0.2 * singles and wide > 0.2 * singles and abs(tall - wide) < 0.1 * singles


def test_build_mask_generator_defaults_to_the_v2_exact_count():
    g = build_mask_generator("block", 14, 75, seed=0)
    assert all(int(g().sum()) == 75 for _ in range(300))
    v1 = build_mask_generator("block", 14, 75, seed=0, top_up=False)
    assert min(int(v1().sum()) for _ in range(300)) < 75  # without the top-up some masks stop short
