"""Self-critical sequence training: sample captions with gradients, reward them, weight their
log-probabilities by how much better they did than the image's other samples.

    loss = -(r_i - mean_{j != i} r_j) * log p(caption_i)      (Rennie et al. 2017; Luo 2020's baseline)

The rewards (CIDEr-D) live in rewards.py; decoding for inference (greedy, beam) in decoding.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.vocab import SPECIALS, UNK
from .model.decoder import CaptionDecoder

UNK_ID = SPECIALS.index(UNK)


@dataclass
class Samples:
    tokens: torch.Tensor  # (B*n, T) word ids; <end> included, <pad> (0) after it
    logprobs: torch.Tensor  # (B*n, T) log-probability of each sampled word (0 after <end>), with gradients
    mask: torch.Tensor  # (B*n, T) True for the words that count (up to and including <end>)

    def word_lists(self, itos: list[str], end: int) -> list[list[str]]:
        out = []
        for row in self.tokens.tolist():
            words = []
            for t in row:
                if t == end or t == 0:
                    break
                words.append(itos[t])
            out.append(words)
        return out


def sample(decoder: CaptionDecoder, features: torch.Tensor, start: int, end: int, n: int,
           max_length: int = 20, styles: torch.Tensor | None = None, temperature: float = 1.0,
           concepts=None) -> Samples:
    """`n` captions per image, drawn word by word from the decoder's distribution, with gradients.
    Rows come image by image: image 0's n samples, then image 1's, ... `concepts`: a grounded
    decoder's concept input (decoder.Concepts)."""
    feats, projected, style, state = decoder.start(features, styles, concepts)
    feats, projected = feats.repeat_interleave(n, 0), projected.repeat_interleave(n, 0)
    state = tuple(x.repeat_interleave(n, 0) for x in state)
    style = None if style is None else style.repeat_interleave(n, 0)
    rows = feats.size(0)
    words = torch.full((rows,), start, dtype=torch.long, device=features.device)
    alive = torch.ones(rows, dtype=torch.bool, device=features.device)
    tokens, logprobs, masks = [], [], []
    for t in range(max_length):
        logits, state, _ = decoder.step(words, state, feats, projected, style)
        logits = logits.float() / temperature
        never = [0, start, UNK_ID] if t > 0 else [0, start, UNK_ID, end]  # no empty caption
        logits[:, never] = float("-inf")
        lp = logits.log_softmax(-1)
        drawn = torch.multinomial(lp.detach().exp(), 1).squeeze(1)
        drawn = torch.where(alive, drawn, torch.zeros_like(drawn))
        tokens.append(drawn)
        # where, not a product: a finished row's <pad> has log-probability -inf, and -inf * 0 is nan
        logprobs.append(torch.where(alive, lp.gather(1, drawn.unsqueeze(1)).squeeze(1), 0.0))
        masks.append(alive)
        alive = alive & (drawn != end)
        if not bool(alive.any()):
            break
        words = drawn
    return Samples(torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(masks, 1))


def self_critical_loss(samples: Samples, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """REINFORCE with each sample's baseline = the mean reward of the same image's other n-1 samples.
    `rewards` (B*n,) in the row order of `sample`. Averaged over the sampled words."""
    grouped = rewards.view(-1, n)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (n - 1)
    advantage = (grouped - baseline).view(-1, 1)
    mask = samples.mask.float()
    return -(advantage * samples.logprobs * mask).sum() / mask.sum()
