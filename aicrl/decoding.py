"""Greedy decoding and beam search on numpy, batched over images and beams, over any step function.

The search never sees a framework: a `StepDecoder` (the torch decoder for training and evaluation,
`TorchSteps`; ONNX Runtime for inference, `aicrl.runtime.OnnxSteps`) gives it
    start(features, styles, repeat) -> state        state of B images, each row repeated `repeat` times
    step(words, state) -> (logits, state, attention)  one word for every row: (N, V), state, (N, R)
    reorder(state, rows) -> state                   keep/duplicate rows (beams move within an image)
    select(state, rows) -> state                    keep the rows of some images (the others are done)
so there is one beam search to maintain. Both return, for every image, a list of `Hypothesis`
(best first): the word ids, the total log-probability, the length-normalised score used for
ranking, and the attention of every word.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .data.vocab import SPECIALS, UNK

UNK_ID = SPECIALS.index(UNK)
NEG_INF = np.float32(-np.inf)


class StepDecoder(Protocol):
    def start(self, features: np.ndarray, styles: np.ndarray | None, repeat: int = 1) -> Any: ...

    def step(self, words: np.ndarray, state: Any) -> tuple[np.ndarray, Any, np.ndarray]: ...

    def reorder(self, state: Any, rows: np.ndarray) -> Any: ...

    def select(self, state: Any, rows: np.ndarray) -> Any: ...


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    logprob: float  # sum of the words' log-probabilities (including <end> when emitted)
    score: float  # logprob / length**length_penalty: the ranking key
    attention: np.ndarray  # (len(tokens), regions): where the model looked for each word


def as_step_decoder(decoder) -> StepDecoder:
    """A StepDecoder as it is, or a torch decoder wrapped in TorchSteps."""
    if hasattr(decoder, "reorder"):
        return decoder
    from .model.torch_steps import TorchSteps  # torch only where a torch module is given

    return TorchSteps(decoder)


def _array(x, dtype=None) -> np.ndarray | None:
    """numpy view of an array-like (a torch tensor included), None stays None."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x, dtype=dtype)


def repetition_bans(history: np.ndarray, content: np.ndarray) -> np.ndarray:
    """(N, V) mask of the words that would make a row of `history` (N, t) loop: the word just said
    ("a beautiful beautiful sunset"), the second word of a pair of content words said before (after
    "a blue shirt and blue", "shirt"), and a content word said twice already ("blue shirt and blue
    shorts and blue ..."). `content` (V,) marks the content words; function words ("in a", "a red")
    may otherwise repeat freely."""
    history, content = _array(history, np.int64), _array(content, bool)
    n, t = history.shape
    ban = np.zeros((n, content.size), dtype=bool)
    if t >= 1:
        ban[np.arange(n), history[:, -1]] = True
    if t >= 2:
        before, after = history[:, :-1], history[:, 1:]
        hit = (before == history[:, -1:]) & content[before] & content[after]
        rows, cols = np.nonzero(hit)
        ban[rows, after[rows, cols]] = True
        counts = np.zeros(ban.shape, dtype=np.int32)
        index = np.arange(n)
        for j in range(t):
            counts[index, history[:, j]] += 1
        ban |= (counts >= 2) & content
        ban[:, 0] = False
    return ban


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    shifted = x - top
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _word_logprobs(logits: np.ndarray, start: int, end: int, allow_end: bool,
                   base_logits: np.ndarray | None = None, guidance: float = 0.0,
                   keep: float = 0.1, banned_words: np.ndarray | None = None,
                   penalty: np.ndarray | None = None) -> np.ndarray:
    """Log-probabilities of the next word. <pad>, <start> and <unk> (ids 0, 1, 3 in every
    vocabulary) are never generated, and <end> not before the first word (an empty caption
    helps nobody).

    With `base_logits` (the same step decoded in the base style, i.e. factual) and `guidance` w > 0,
    the styled distribution is pushed away from the base one: log p + w (log p - log p_base), the
    words a style prefers over plain description. Only words the style itself finds plausible
    (p >= keep * max p, the constraint of contrastive decoding) can win, so content stays sane.
    `banned_words` (N, V) removes more words per row (see `repetition_bans`); `penalty` (N, V) lowers
    words' logits (see `aicrl.phrases`: the words that would complete a style's stock phrase)."""
    banned = [0, start, UNK_ID] if allow_end else [0, start, UNK_ID, end]

    def logprobs(x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float32)  # a copy: the caller's logits stay as they are
        x[:, banned] = NEG_INF
        return _log_softmax(x)

    logits = _array(logits, np.float32)
    if banned_words is not None:
        logits = np.where(_array(banned_words, bool), NEG_INF, logits)
    if penalty is not None:
        logits = logits - penalty
    lp = logprobs(logits)
    if base_logits is None or guidance == 0:
        return lp
    plausible = lp >= lp.max(-1, keepdims=True) + np.float32(math.log(keep))
    with np.errstate(invalid="ignore"):  # -inf - -inf where a word is banned in both: masked out here
        guided = np.where(plausible, lp + np.float32(guidance) * (lp - logprobs(_array(base_logits))), NEG_INF)
    return _log_softmax(guided.astype(np.float32))


def _length_normalise(logprob: np.ndarray, length: np.ndarray, penalty: float) -> np.ndarray:
    if penalty == 0:
        return logprob
    return logprob / np.maximum(length, 1).astype(np.float32) ** np.float32(penalty)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of every row, largest first (ties: lower index first)."""
    part = np.argpartition(-x, k - 1, axis=1)[:, :k] if k < x.shape[1] else np.tile(np.arange(x.shape[1]), (len(x), 1))
    values = np.take_along_axis(x, part, 1)
    order = np.lexsort((part, -values), axis=1)
    return np.take_along_axis(part, order, 1)


def beam_search(decoder, features, start: int, end: int, beam_size: int = 3, n_best: int = 1,
                max_length: int = 30, styles=None, length_penalty: float = 0.0, base_styles=None,
                guidance: float = 0.0, content=None, phrases=None) -> list[list[Hypothesis]]:
    """Beam search over a batch of image grids `features` (B, R, F).

    All B*k beams advance together as one batch. A finished beam keeps its score and only extends
    with <end> at no cost, so it competes with the open ones until the end. Decoding stops when
    every beam has finished or after `max_length` words; beams that never emitted <end> are
    returned as they are. With `base_styles` and `guidance`, see `_word_logprobs`: every beam is
    also decoded in the base style, in step, to contrast the two. With `content` (V,) a beam does not
    loop (`repetition_bans`). With `phrases` (`aicrl.phrases.PhrasePenalty`), the words that would
    complete an over-used phrase cost more.
    """
    steps = as_step_decoder(decoder)
    features, styles, base_styles = _array(features, np.float32), _array(styles, np.int64), _array(base_styles, np.int64)
    content = _array(content, bool)
    B, R = features.shape[:2]
    k = beam_size
    n_best = min(n_best, k)
    state = steps.start(features, styles, k)
    guided = base_styles is not None and guidance > 0
    if guided:  # the same beams, decoded in the base style too
        base_state = steps.start(features, base_styles, k)

    logprob = np.full((B, k), NEG_INF, dtype=np.float32)
    logprob[:, 0] = 0.0  # at the start all k beams are the same: keep one
    words = np.full(B * k, start, dtype=np.int64)
    finished = np.zeros((B, k), dtype=bool)
    lengths = np.zeros((B, k), dtype=np.int64)
    tokens = np.zeros((B, k, 0), dtype=np.int64)
    alphas = np.zeros((B, k, 0, R), dtype=np.float32)
    done_row = None  # a finished beam may only continue with <end>, at log-probability 0
    # The images still decoding; the state holds only their rows. An image whose k beams have all
    # finished can no longer change, so it leaves the batch (about 40% of the step rows of a batch
    # of 32 photos) and its columns are padded with <end>.
    active = np.arange(B)

    for t in range(max_length):
        logits, state, alpha = steps.step(words, state)
        base_logits = None
        if guided:
            base_logits, base_state, _ = steps.step(words, base_state)
        A = len(active)
        history = tokens[active].reshape(A * k, t)
        bans = None if content is None else repetition_bans(history, content)
        penalty = None if phrases is None else phrases.penalty(history)
        step_lp = _word_logprobs(logits, start, end, t > 0, base_logits, guidance, banned_words=bans,
                                 penalty=penalty).reshape(A, k, -1)
        vocab = step_lp.shape[-1]
        if done_row is None:
            done_row = np.full(vocab, NEG_INF, dtype=np.float32)
            done_row[end] = 0.0
        was_finished = finished[active]
        step_lp = np.where(was_finished[:, :, None], done_row, step_lp)
        total = logprob[active][:, :, None] + step_lp  # (A, k, V)
        new_len = lengths[active][:, :, None] + (~was_finished)[:, :, None]
        rank = _length_normalise(total, new_len, length_penalty)
        # Candidates are ranked by the normalised score; keep the best k per image.
        top = _top_k(rank.reshape(A, -1), k)
        beam, word = top // vocab, top % vocab
        logprob[active] = np.take_along_axis(total.reshape(A, -1), top, 1)
        lengths[active] = np.take_along_axis(new_len[:, :, 0], beam, 1)
        finished[active] = np.take_along_axis(was_finished, beam, 1) | (word == end)
        image = np.arange(A)[:, None]
        tokens = np.concatenate([tokens, np.full((B, k, 1), end, dtype=np.int64)], 2)
        tokens[active] = np.concatenate([tokens[active, :, :t][image, beam], word[:, :, None]], 2)
        alpha = np.asarray(alpha, dtype=np.float32).reshape(A, k, R)
        alphas = np.concatenate([alphas, np.zeros((B, k, 1, R), dtype=np.float32)], 2)
        alphas[active] = np.concatenate([alphas[active, :, :t][image, beam], alpha[image, beam][:, :, None]], 2)
        rows = (image * k + beam).reshape(-1)
        state = steps.reorder(state, rows)
        if guided:
            base_state = steps.reorder(base_state, rows)
        words = word.reshape(-1).astype(np.int64)
        going = ~finished[active].all(1)
        if not going.any():
            break
        if not going.all():
            keep = (np.nonzero(going)[0][:, None] * k + np.arange(k)).reshape(-1)
            state = steps.select(state, keep)
            if guided:
                base_state = steps.select(base_state, keep)
            words, active = words[keep], active[going]

    score = _length_normalise(logprob, lengths, length_penalty)
    order = np.argsort(-score, axis=1, kind="stable")
    results = []
    for b in range(B):
        hyps = []
        for j in order[b, :n_best].tolist():
            n = int(lengths[b, j])  # words emitted, counting <end>
            if n and int(tokens[b, j, n - 1]) == end:
                n -= 1
            hyps.append(Hypothesis(tokens[b, j, :n].tolist(), float(logprob[b, j]), float(score[b, j]),
                                   alphas[b, j, :n].copy()))
        results.append(hyps)
    return results


def greedy(decoder, features, start: int, end: int, max_length: int = 30, styles=None,
           base_styles=None, guidance: float = 0.0, content=None, phrases=None) -> list[Hypothesis]:
    """The most likely word at every step, for a batch of image grids (B, R, F)."""
    return [h[0] for h in sample(decoder, features, start, end, 1, max_length, styles, base_styles, guidance,
                                 content, phrases, temperature=0.0)]


def sample(decoder, features, start: int, end: int, n: int = 1, max_length: int = 30, styles=None,
           base_styles=None, guidance: float = 0.0, content=None, phrases=None, temperature: float = 1.0,
           top_p: float = 0.9, rng: np.random.Generator | None = None,
           length_penalty: float = 0.0) -> list[list[Hypothesis]]:
    """`n` captions for every image of a batch of grids (B, R, F), drawn word by word: nucleus
    sampling (from the smallest set of likely words that holds `top_p` of the probability, sharpened
    by `temperature`); temperature 0 takes the most likely word (greedy). Each image's captions come
    back best first by score; `logprob` is the model's own (untempered) log-probability. `phrases`:
    see `aicrl.phrases.PhrasePenalty`; the other options as in `beam_search`."""
    steps = as_step_decoder(decoder)
    features, styles, base_styles = _array(features, np.float32), _array(styles, np.int64), _array(base_styles, np.int64)
    content = _array(content, bool)
    rng = rng if rng is not None else np.random.default_rng(0)
    B = features.shape[0]
    N = B * n
    state = steps.start(features, styles, n)
    guided = base_styles is not None and guidance > 0
    base_state = steps.start(features, base_styles, n) if guided else None
    words = np.full(N, start, dtype=np.int64)
    tokens = np.zeros((N, 0), dtype=np.int64)
    logprob = np.zeros(N, dtype=np.float32)
    lengths = np.zeros(N, dtype=np.int64)  # words emitted, counting <end>
    finished = np.zeros(N, dtype=bool)
    alphas = []
    live = np.arange(N)  # the rows still decoding (the state holds only these), as in beam_search
    for t in range(max_length):
        logits, state, alpha = steps.step(words, state)
        base_logits = None
        if guided:
            base_logits, base_state, _ = steps.step(words, base_state)
        history = tokens[live]
        bans = None if content is None else repetition_bans(history, content)
        penalty = None if phrases is None else phrases.penalty(history)
        lp = _word_logprobs(logits, start, end, t > 0, base_logits, guidance, banned_words=bans, penalty=penalty)
        words = lp.argmax(-1) if temperature == 0 else _nucleus(lp, temperature, top_p, rng)
        logprob[live] += lp[np.arange(len(live)), words]
        lengths[live] += 1
        finished[live] = words == end
        column = np.full(N, end, dtype=np.int64)
        column[live] = words
        tokens = np.concatenate([tokens, column[:, None]], 1)
        step_alpha = np.zeros((N, alpha.shape[-1]), dtype=np.float32)
        step_alpha[live] = np.asarray(alpha, dtype=np.float32)
        alphas.append(step_alpha)
        going = words != end
        if not going.any():
            break
        if not going.all():
            keep = np.nonzero(going)[0]
            state = steps.select(state, keep)
            if guided:
                base_state = steps.select(base_state, keep)
            words, live = words[keep], live[keep]
        words = words.astype(np.int64)
    att = np.stack(alphas, 1)
    score = _length_normalise(logprob, lengths, length_penalty)
    results = []
    for b in range(B):
        hyps = []
        for r in range(b * n, (b + 1) * n):
            m = int(lengths[r]) - bool(finished[r])  # words, without <end>
            hyps.append(Hypothesis(tokens[r, :m].tolist(), float(logprob[r]), float(score[r]), att[r, :m].copy()))
        results.append(sorted(hyps, key=lambda h: -h.score))
    return results


def _nucleus(lp: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
             top_k: int = 64) -> np.ndarray:
    """One word per row, drawn from the rows' nucleus (among the `top_k` most likely words)."""
    top = _top_k(lp, min(top_k, lp.shape[1]))
    x = np.take_along_axis(lp, top, 1) / np.float32(temperature)
    p = np.exp(x - x[:, :1])  # sorted: the first is the largest
    p /= p.sum(1, keepdims=True)
    before = np.cumsum(p, 1) - p
    p = np.where(before < top_p, p, 0)  # the words needed to reach top_p (always the first)
    cum = np.cumsum(p, 1)
    pick = (cum < rng.random((len(p), 1)) * cum[:, -1:]).sum(1)
    return top[np.arange(len(top)), np.minimum(pick, top.shape[1] - 1)]
