"""One seeding function: distinct coordinates give distinct streams, by construction and on a sampled check."""

import numpy as np
import pytest

from rl.seeding import _C1, _C2, _M63, BITS, PURPOSES, _mix, row_seeds, stream_seed, stream_seeds


def _unmix(z: int) -> int:
    """Inverse of `_mix` on Python ints: undo each xor-shift and each odd multiplication mod 2**63."""
    def unshift(y, k):
        x = y
        for _ in range(63 // k + 1):
            x = y ^ (x >> k)
        return x

    z = unshift(z, 31)
    z = unshift((z * pow(_C2, -1, 1 << 63)) & _M63, 27)
    return unshift((z * pow(_C1, -1, 1 << 63)) & _M63, 30)


def test_the_derivation_is_injective_by_construction():
    assert sum(BITS.values()) == 63 and len(PURPOSES) <= 1 << BITS["purpose"]  # disjoint fields of one 63-bit key
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 1 << 63, size=2000, dtype=np.int64).astype(np.uint64)
    mixed = _mix(keys)
    assert (mixed < np.uint64(1 << 63)).all()
    assert [_unmix(int(z)) for z in mixed] == [int(k) for k in keys]  # the mixer is a bijection: it has an inverse
    for name, bits in (("round", BITS["round"]), ("rank", BITS["rank"]), ("row", BITS["row"])):
        with pytest.raises(ValueError, match=name):
            stream_seed(0, "rollout", **{name: 1 << bits})
    with pytest.raises(ValueError, match="purpose"):
        stream_seed(0, "nope")


def test_streams_are_distinct_for_64_ranks_1024_rows_10000_rounds():
    # Every (rank, row) of 8 rounds at each end of the range (1 M seeds), plus 500,000 random coordinates of the
    # whole 64 x 1024 x 10,000 grid over the purposes sharing those rows. (Injectivity itself is by construction.)
    ranks, rows = np.arange(64)[:, None, None], np.arange(1024)[None, None, :]
    for rounds in (np.arange(1, 9), np.arange(9993, 10001)):
        seeds = stream_seeds(3, "rollout", rounds[None, :, None], ranks, rows).ravel()
        assert len(np.unique(seeds)) == seeds.size
    rng = np.random.default_rng(1)
    n = 500_000
    rnd, rank, row, purpose = (rng.integers(1, 10_001, n), rng.integers(0, 64, n), rng.integers(0, 1024, n),
                               rng.integers(0, 3, n))
    distinct = len(np.unique(((purpose * 10_001 + rnd) * 64 + rank) * 1024 + row))
    seeds = np.concatenate([stream_seeds(3, p, rnd[purpose == i], rank[purpose == i], row[purpose == i])
                            for i, p in enumerate(("rollout", "mask", "steps"))])
    assert len(np.unique(seeds)) == distinct


def test_the_old_formula_collided_and_rows_are_batch_invariant():
    old = lambda seed, rnd, rank, i: seed * 1_000_003 + rnd * 10_007 + rank * 1_009 + i  # noqa: E731
    assert old(0, 1, 0, 1009) == old(0, 1, 1, 0)  # rank 0's row 1009 reused rank 1's row 0
    assert stream_seed(0, "rollout", round=1, rank=0, row=1009) != stream_seed(0, "rollout", round=1, rank=1, row=0)
    assert row_seeds(5, "mask", 8, round=2, rank=1)[3] == stream_seed(5, "mask", round=2, rank=1, row=3)
    assert stream_seed(5, "mask", round=2, row=3) != stream_seed(5, "rollout", round=2, row=3)
    assert 0 <= stream_seed(2**70, "eval", row=7) < 2**63
