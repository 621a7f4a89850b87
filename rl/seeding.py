"""One seeding function for every random stream: sampler rows, estimator masks, drawn steps, evaluation, SFT.

`stream_seed(seed, purpose, round=, rank=, row=)` names a stream by its coordinates. Distinct coordinates give
distinct seeds by construction, for one base `seed`:

1. the coordinates are packed into disjoint bit fields of a 63-bit key (purpose 3 bits, rank 12, round 24, row 24;
   each range-checked), so distinct coordinates give distinct keys;
2. the key is XOR-ed with a mix of the base seed and mixed again by a SplitMix64-style finaliser computed modulo
   2**63 (xor-shifts and multiplications by odd constants: a bijection of [0, 2**63)), so distinct keys give
   distinct seeds.

Seeds fit in a signed 64-bit tensor (they travel with TRL's batch) and in `torch.Generator.manual_seed`. Different
base seeds give unrelated (hashed) streams; they are not guaranteed disjoint, only unlikely to meet.
"""

from __future__ import annotations

import numpy as np
import torch

PURPOSES = ("rollout", "mask", "steps", "eval", "sft_data", "sft_noise", "sft_eval")
"""rollout: the sampler's row stream in RL; mask: the mean_field/coupled estimators' masks; steps: the trajectory
estimator's drawn steps; eval: evaluation, held-out and posterior rows (`rl.evaluate.row_seed`); sft_data: the SFT
collator's row choices; sft_noise / sft_eval: the SFT masking noise in training / evaluation (one stream per
process: rank)."""
BITS = {"purpose": 3, "rank": 12, "round": 24, "row": 24}  # 63 bits in all
_M63 = (1 << 63) - 1
_C1, _C2, _GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def _mix(z: np.ndarray) -> np.ndarray:
    """A bijection of [0, 2**63) on uint64 arrays (odd multipliers mod 2**63, xor-shifts)."""
    m = np.uint64(_M63)
    with np.errstate(over="ignore"):
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(_C1)) & m
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(_C2)) & m
    return z ^ (z >> np.uint64(31))


def _check(name: str, value: np.ndarray) -> None:
    if value.size and (value.min() < 0 or value.max() >= 1 << BITS[name]):
        raise ValueError(f"Seed coordinate {name} must lie in [0, {1 << BITS[name]}), got {int(value.max())} "
                         f"(or a negative value).")


def stream_seeds(seed: int, purpose: str, round=0, rank=0, row=0) -> np.ndarray:
    """Vectorised `stream_seed`: `round`, `rank` and `row` broadcast (ints or integer arrays); int64 array."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r}; use one of {', '.join(PURPOSES)}.")
    coords = {"round": np.asarray(round, dtype=np.int64), "rank": np.asarray(rank, dtype=np.int64),
              "row": np.asarray(row, dtype=np.int64)}
    for name, value in coords.items():
        _check(name, value)
    key = (np.uint64(PURPOSES.index(purpose)) << np.uint64(60)) \
        | (coords["rank"].astype(np.uint64) << np.uint64(48)) \
        | (coords["round"].astype(np.uint64) << np.uint64(24)) \
        | coords["row"].astype(np.uint64)
    with np.errstate(over="ignore"):
        salt = _mix(np.asarray([(int(seed) * _GOLDEN + _GOLDEN) & _M63], dtype=np.uint64))[0]
    return _mix(key ^ salt).astype(np.int64)


def stream_seed(seed: int, purpose: str, *, round: int = 0, rank: int = 0, row: int = 0) -> int:
    """Seed of the random stream (seed, purpose, round, rank, row); an int in [0, 2**63)."""
    return int(stream_seeds(seed, purpose, round, rank, row))


def row_seeds(seed: int, purpose: str, rows: int, *, round: int = 0, rank: int = 0) -> torch.Tensor:
    """[rows] long: the seeds of rows 0..rows-1 of one (purpose, round, rank)."""
    return torch.from_numpy(stream_seeds(seed, purpose, round, rank, np.arange(rows)))
