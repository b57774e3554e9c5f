"""Decoding: one beam search, greedy decoding and sampling over any step function (search.py), with
the per-word rules as logit processors (processors.py). numpy only: no torch, nothing from model/."""
from .processors import (LogitsProcessor, NoRepeats, SpecialTokens, StepContext, StyleGuidance, WordBonus,
                         next_word_logprobs, repetition_bans)
from .search import GenerationOptions, Hypothesis, StepDecoder, beam_search, greedy, sample

__all__ = ["GenerationOptions", "Hypothesis", "LogitsProcessor", "NoRepeats", "SpecialTokens", "StepContext",
           "StepDecoder", "StyleGuidance", "WordBonus", "beam_search", "greedy", "next_word_logprobs",
           "repetition_bans", "sample"]
