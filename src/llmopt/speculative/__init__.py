"""Speculative decoding: drafters (draft model, self-drafts, n-gram lookup) and a batch-1 driver."""

from llmopt.speculative.build import DRAFT_HELP, build_drafter, parse_draft_spec
from llmopt.speculative.decode import SpeculativeConfig, SpeculativeGenerator, SpeculativeStats
from llmopt.speculative.drafters import (
    AlwaysWrongDrafter,
    Drafter,
    ModelDrafter,
    NgramDrafter,
    Proposal,
    ReplayDrafter,
    SelfDrafter,
)

__all__ = [
    "DRAFT_HELP",
    "AlwaysWrongDrafter",
    "Drafter",
    "ModelDrafter",
    "NgramDrafter",
    "Proposal",
    "ReplayDrafter",
    "SelfDrafter",
    "SpeculativeConfig",
    "SpeculativeGenerator",
    "SpeculativeStats",
    "build_drafter",
    "parse_draft_spec",
]
