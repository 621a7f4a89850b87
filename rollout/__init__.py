"""Rollout engine: model adapter, reasoning-as-infilling canvas, unmasking policies, the batched sampler."""

from rollout.adapter import MDLMAdapter
from rollout.policies import POLICIES, PolicyConfig, TokenStats, token_stats
from rollout.sampler import SampleOutput, SamplerConfig, sample
from rollout.template import Canvas, TemplateConfig, build_canvas, decode_block, encode_block, layout_canvas

__all__ = [
    "POLICIES",
    "Canvas",
    "MDLMAdapter",
    "PolicyConfig",
    "SampleOutput",
    "SamplerConfig",
    "TemplateConfig",
    "TokenStats",
    "build_canvas",
    "decode_block",
    "encode_block",
    "layout_canvas",
    "sample",
    "token_stats",
]
