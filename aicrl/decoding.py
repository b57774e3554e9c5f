"""Greedy decoding and beam search, batched over images and beams (no Python loop over images).

Both return, for every image, a list of `Hypothesis` (best first): the word ids, the total
log-probability, the length-normalised score used for ranking, and the attention of every word.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data.vocab import SPECIALS, UNK
from .model.decoder import AttentionLSTMDecoder

UNK_ID = SPECIALS.index(UNK)


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    logprob: float  # sum of the words' log-probabilities (including <end> when emitted)
    score: float  # logprob / length**length_penalty: the ranking key
    attention: torch.Tensor  # (len(tokens), regions): where the model looked for each word


def repetition_bans(history: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """(N, V) mask of the words that would make a row of `history` (N, t) loop: the second word of
    a pair of content words said before (after "a blue shirt and blue", "shirt"), and a content
    word said twice already ("blue shirt and blue shorts and blue ..."). `content` (V,) marks the
    content words; function words ("in a", "a red") may repeat freely."""
    ban = torch.zeros(history.size(0), content.numel(), dtype=torch.bool, device=history.device)
    if history.size(1) >= 2:
        before, after = history[:, :-1], history[:, 1:]
        hit = (before == history[:, -1:]) & content[before] & content[after]
        ban.scatter_(1, torch.where(hit, after, 0), True)  # id 0 (<pad>) is banned anyway
        counts = torch.zeros(ban.shape, device=history.device).scatter_add_(
            1, history, torch.ones(history.shape, device=history.device))
        ban |= (counts >= 2) & content
        ban[:, 0] = False
    return ban


def _word_logprobs(logits: torch.Tensor, start: int, end: int, allow_end: bool,
                   base_logits: torch.Tensor | None = None, guidance: float = 0.0,
                   keep: float = 0.1, banned_words: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities of the next word. <pad>, <start> and <unk> (ids 0, 1, 3 in every
    vocabulary) are never generated, and <end> not before the first word (an empty caption
    helps nobody).

    With `base_logits` (the same step decoded in the base style, i.e. factual) and `guidance` w > 0,
    the styled distribution is pushed away from the base one: log p + w (log p - log p_base), the
    words a style prefers over plain description. Only words the style itself finds plausible
    (p >= keep * max p, the constraint of contrastive decoding) can win, so content stays sane.
    `banned_words` (N, V) removes more words per row (see `repetition_bans`)."""
    banned = [0, start, UNK_ID] if allow_end else [0, start, UNK_ID, end]

    def logprobs(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x[:, banned] = float("-inf")
        return x.log_softmax(-1)

    if banned_words is not None:
        logits = logits.float().masked_fill(banned_words, float("-inf"))
    lp = logprobs(logits)
    if base_logits is None or guidance == 0:
        return lp
    plausible = lp >= lp.max(-1, keepdim=True).values + math.log(keep)
    guided = torch.where(plausible, lp + guidance * (lp - logprobs(base_logits)), float("-inf"))
    return guided.log_softmax(-1)


def _length_normalise(logprob: torch.Tensor, length: torch.Tensor, penalty: float) -> torch.Tensor:
    return logprob if penalty == 0 else logprob / length.clamp(min=1).float() ** penalty


@torch.inference_mode()
def beam_search(decoder: AttentionLSTMDecoder, features: torch.Tensor, start: int, end: int,
                beam_size: int = 3, n_best: int = 1, max_length: int = 30,
                styles: torch.Tensor | None = None, length_penalty: float = 0.0,
                base_styles: torch.Tensor | None = None, guidance: float = 0.0,
                content: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Beam search over a batch of image grids `features` (B, R, F).

    All B*k beams advance together as one batch. A finished beam keeps its score and only extends
    with <end> at no cost, so it competes with the open ones until the end. Decoding stops when
    every beam has finished or after `max_length` words; beams that never emitted <end> are
    returned as they are. With `base_styles` and `guidance`, see `_word_logprobs`: every beam is
    also decoded in the base style, in step, to contrast the two. With `content` (V,) a beam does not
    loop (`repetition_bans`).
    """
    decoder.eval()
    B, R, _ = features.shape
    k = beam_size
    n_best = min(n_best, k)
    expand = lambda x: None if x is None else x.repeat_interleave(k, 0)  # noqa: E731  (B*k, ...)
    feats, projected, style, (h, c) = decoder.start(features, styles)
    feats, projected, style, h, c = map(expand, (feats, projected, style, h, c))
    guided = base_styles is not None and guidance > 0
    if guided:  # the same beams, decoded in the base style too
        _, _, base_style, (hb, cb) = decoder.start(features, base_styles)
        base_style, hb, cb = map(expand, (base_style, hb, cb))

    logprob = torch.full((B, k), float("-inf"), device=features.device)
    logprob[:, 0] = 0.0  # at the start all k beams are the same: keep one
    words = torch.full((B * k,), start, dtype=torch.long, device=features.device)
    finished = torch.zeros(B, k, dtype=torch.bool, device=features.device)
    lengths = torch.zeros(B, k, dtype=torch.long, device=features.device)
    tokens = torch.zeros(B, k, 0, dtype=torch.long, device=features.device)
    alphas = torch.zeros(B, k, 0, R, device=features.device)
    batch_index = torch.arange(B, device=features.device).unsqueeze(1)
    # A finished beam may only continue with <end>, at log-probability 0.
    done_row = torch.full((decoder.config.vocab_size,), float("-inf"), device=features.device)
    done_row[end] = 0.0

    for t in range(max_length):
        logits, (h, c), alpha = decoder.step(words, (h, c), feats, projected, style)
        base_logits = None
        if guided:
            base_logits, (hb, cb), _ = decoder.step(words, (hb, cb), feats, projected, base_style)
        bans = None if content is None else repetition_bans(tokens.view(B * k, tokens.size(2)), content)
        step_lp = _word_logprobs(logits, start, end, t > 0, base_logits, guidance, banned_words=bans).view(B, k, -1)
        vocab = step_lp.size(-1)
        step_lp = torch.where(finished.unsqueeze(2), done_row, step_lp)
        total = (logprob.unsqueeze(2) + step_lp)  # (B, k, V)
        new_len = lengths.unsqueeze(2) + (~finished).long().unsqueeze(2)
        rank = _length_normalise(total, new_len.expand_as(total), length_penalty)
        # Candidates are ranked by the normalised score; keep the best k per image.
        top_rank, top = rank.view(B, -1).topk(k, dim=1)
        beam, word = top // vocab, top % vocab
        logprob = total.view(B, -1).gather(1, top)
        lengths = new_len.squeeze(2).gather(1, beam)
        was_finished = finished.gather(1, beam)
        finished = was_finished | (word == end)
        tokens = torch.cat([tokens[batch_index, beam], word.unsqueeze(2)], 2)
        alphas = torch.cat([alphas[batch_index, beam], alpha.view(B, k, R)[batch_index, beam].unsqueeze(2)], 2)
        flat = (batch_index * k + beam).view(-1)
        h, c = h[flat], c[flat]
        if guided:
            hb, cb = hb[flat], cb[flat]
        words = word.view(-1)
        if bool(finished.all()):
            break

    score = _length_normalise(logprob, lengths, length_penalty)
    order = score.argsort(dim=1, descending=True)
    # one copy to the CPU, not one tiny transfer per hypothesis (no-op on the CPU)
    tokens, alphas, logprob, score, lengths, order = (x.cpu() for x in (tokens, alphas, logprob, score, lengths, order))
    results = []
    for b in range(B):
        hyps = []
        for j in order[b, :n_best].tolist():
            n = int(lengths[b, j])  # words emitted, counting <end>
            if n and int(tokens[b, j, n - 1]) == end:
                n -= 1
            hyps.append(Hypothesis(tokens[b, j, :n].tolist(), float(logprob[b, j]), float(score[b, j]),
                                   alphas[b, j, :n].clone()))
        results.append(hyps)
    return results


@torch.inference_mode()
def greedy(decoder: AttentionLSTMDecoder, features: torch.Tensor, start: int, end: int,
           max_length: int = 30, styles: torch.Tensor | None = None,
           base_styles: torch.Tensor | None = None, guidance: float = 0.0,
           content: torch.Tensor | None = None) -> list[Hypothesis]:
    """The most likely word at every step, for a batch of image grids (B, R, F)."""
    decoder.eval()
    feats, projected, style, state = decoder.start(features, styles)
    guided = base_styles is not None and guidance > 0
    _, _, base_style, base_state = decoder.start(features, base_styles) if guided else (None, None, None, None)
    B = features.size(0)
    words = torch.full((B,), start, dtype=torch.long, device=features.device)
    steps, logprobs, alphas = [], [], []
    for t in range(max_length):
        logits, state, alpha = decoder.step(words, state, feats, projected, style)
        base_logits = None
        if guided:
            base_logits, base_state, _ = decoder.step(words, base_state, feats, projected, base_style)
        bans = None
        if content is not None:
            history = torch.stack(steps, 1) if steps else words.new_zeros(B, 0)
            bans = repetition_bans(history, content)
        lp, words = _word_logprobs(logits, start, end, t > 0, base_logits, guidance, banned_words=bans).max(-1)
        steps.append(words)
        logprobs.append(lp)
        alphas.append(alpha)
        if bool(torch.stack(steps, 1).eq(end).any(1).all()):
            break
    steps, logprobs, alphas = torch.stack(steps, 1).cpu(), torch.stack(logprobs, 1).cpu(), torch.stack(alphas, 1).cpu()
    results = []
    for b in range(B):
        seq = steps[b].tolist()
        n = seq.index(end) if end in seq else len(seq)
        total = float(logprobs[b, : min(n + 1, len(seq))].sum())
        results.append(Hypothesis(seq[:n], total, total, alphas[b, :n].clone()))
    return results
