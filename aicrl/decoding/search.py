"""Greedy decoding, beam search and sampling on numpy, batched over images and beams, over any step function.

The search never sees a framework: a `StepDecoder` (the torch decoder for training and evaluation,
`aicrl.model.torch_steps.TorchSteps`; ONNX Runtime for inference, `aicrl.runtime.OnnxSteps`) gives it
    start(features, styles, repeat, concepts) -> state  B images, each row repeated `repeat` times
    step(words, state) -> (logits, state, attention)  one word for every row: (N, V), state, (N, R)
    reorder(state, rows) -> state                   keep/duplicate rows (beams move within an image)
    select(state, rows) -> state                    keep the rows of some images (the others are done)
so there is one beam search to maintain. What a word may be is decided by the options' logit
processors (aicrl/decoding/processors.py). Every search returns, for every image, a list of
`Hypothesis` (best first): the word ids, the total log-probability, the length-normalised score used
for ranking, and the attention of every word.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Sequence

import numpy as np

from .processors import NEG_INF, LogitsProcessor, SpecialTokens, StepContext, next_word_logprobs


class StepDecoder(Protocol):
    def start(self, features: np.ndarray, styles: np.ndarray | None, repeat: int = 1,
              concepts: tuple[np.ndarray, np.ndarray] | None = None) -> Any: ...

    def step(self, words: np.ndarray, state: Any) -> tuple[np.ndarray, Any, np.ndarray]: ...

    def reorder(self, state: Any, rows: np.ndarray) -> Any: ...

    def select(self, state: Any, rows: np.ndarray) -> Any: ...


@dataclass
class GenerationOptions:
    """How to decode, apart from the model (a generation config, as Hugging Face keeps it)."""
    start: int  # <start> and <end> ids of the vocabulary
    end: int
    max_length: int = 30  # most words per caption
    beam_size: int = 3
    n_best: int = 1  # hypotheses returned per image (at most beam_size)
    length_penalty: float = 0.0  # rank by logprob / length**length_penalty
    styles: np.ndarray | None = None  # (B,) style ids, None for a model without styles
    base_styles: np.ndarray | None = None  # (B,) decode these alongside, for StyleGuidance
    concepts: tuple[np.ndarray, np.ndarray] | None = None  # (B, K) concept ids and probabilities
    processors: Sequence[LogitsProcessor] = ()  # applied in order after SpecialTokens
    temperature: float = 1.0  # sampling: sharpen (< 1) or flatten; 0 takes the most likely word
    top_p: float = 0.9  # sampling: draw from the smallest set of words holding this probability
    rng: np.random.Generator | None = None  # sampling: None = a fresh generator seeded 0

    def replace(self, **changes) -> "GenerationOptions":
        return replace(self, **changes)


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    logprob: float  # sum of the words' log-probabilities (including <end> when emitted)
    score: float  # logprob / length**length_penalty: the ranking key
    attention: np.ndarray  # (len(tokens), regions): where the model looked for each word


@dataclass
class _Stepper:
    """The decoder state of the rows still decoding. With `options.base_styles` the base style's rows
    run in the same decoder calls, after the styled ones (the images twice: one call per word
    instead of two, which for one photo is most of a step's time)."""
    steps: StepDecoder
    options: GenerationOptions
    state: Any = None
    rows: int = 0  # live rows of the styled half (the base half has as many)
    specials: SpecialTokens = field(init=False)

    def __post_init__(self):
        self.specials = SpecialTokens(self.options.start, self.options.end)

    @property
    def paired(self) -> bool:
        return self.options.base_styles is not None

    def begin(self, features: np.ndarray, repeat: int) -> None:
        concepts, styles = self.options.concepts, _ints(self.options.styles)
        self.rows = len(features) * repeat
        if self.paired:
            features = np.concatenate([features, features])
            styles = np.concatenate([styles, _ints(self.options.base_styles)])
            concepts = None if concepts is None else tuple(np.concatenate([c, c]) for c in concepts)
        self.state = self.steps.start(features, styles, repeat, concepts)

    def logprobs(self, words: np.ndarray, history: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(log-probabilities of the next word (N, V), attention (N, R)) of every live row."""
        ctx = StepContext(history.shape[1], history, images)
        if self.paired:
            logits, self.state, alpha = self.steps.step(np.concatenate([words, words]), self.state)
            logits, base_logits, alpha = logits[:self.rows], logits[self.rows:], alpha[:self.rows]
            ctx.base_logits = self.specials(base_logits, ctx)
        else:
            logits, self.state, alpha = self.steps.step(words, self.state)
        processors = [self.specials, *self.options.processors]
        return next_word_logprobs(logits, ctx, processors), np.asarray(alpha, dtype=np.float32)

    def keep(self, rows: np.ndarray, method: str) -> None:
        """Reorder (beams move) or select (rows leave) the state's rows."""
        both = np.concatenate([rows, rows + self.rows]) if self.paired else rows
        self.state = getattr(self.steps, method)(self.state, both)
        self.rows = len(rows)


def _ints(x) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.int64)


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


@dataclass
class _Beams:
    """Every image's k beams: log-probability, length, finished flag, words and attention so far."""
    logprob: np.ndarray  # (B, k)
    lengths: np.ndarray  # (B, k) words emitted, counting <end>
    finished: np.ndarray  # (B, k)
    tokens: np.ndarray  # (B, k, t)
    alphas: np.ndarray  # (B, k, t, R)

    @classmethod
    def empty(cls, B: int, k: int, R: int) -> "_Beams":
        logprob = np.full((B, k), NEG_INF, dtype=np.float32)
        logprob[:, 0] = 0.0  # at the start all k beams are the same: keep one
        return cls(logprob, np.zeros((B, k), np.int64), np.zeros((B, k), bool), np.zeros((B, k, 0), np.int64),
                   np.zeros((B, k, 0, R), np.float32))

    def extend(self, active: np.ndarray, step_lp: np.ndarray, alpha: np.ndarray, options: GenerationOptions) -> tuple[np.ndarray, np.ndarray]:
        """Advance the `active` images by one word (step_lp (A, k, V), alpha (A, k, R)); returns the
        (A, k) beams continued and their new words. A finished beam only extends with <end> at no cost, so it keeps its score
        and competes with the open ones until the end."""
        A, k, vocab = step_lp.shape
        t, end = self.tokens.shape[2], options.end
        done_row = np.full(vocab, NEG_INF, dtype=np.float32)
        done_row[end] = 0.0
        was_finished = self.finished[active]
        step_lp = np.where(was_finished[:, :, None], done_row, step_lp)
        total = self.logprob[active][:, :, None] + step_lp  # (A, k, V)
        new_len = self.lengths[active][:, :, None] + (~was_finished)[:, :, None]
        rank = _length_normalise(total, new_len, options.length_penalty)
        top = _top_k(rank.reshape(A, -1), k)  # the best k candidates per image, by normalised score
        beam, word = top // vocab, top % vocab
        self.logprob[active] = np.take_along_axis(total.reshape(A, -1), top, 1)
        self.lengths[active] = np.take_along_axis(new_len[:, :, 0], beam, 1)
        self.finished[active] = np.take_along_axis(was_finished, beam, 1) | (word == end)
        image = np.arange(A)[:, None]
        B, R = self.tokens.shape[0], self.alphas.shape[-1]
        self.tokens = np.concatenate([self.tokens, np.full((B, k, 1), end, dtype=np.int64)], 2)
        self.tokens[active] = np.concatenate([self.tokens[active, :, :t][image, beam], word[:, :, None]], 2)
        self.alphas = np.concatenate([self.alphas, np.zeros((B, k, 1, R), dtype=np.float32)], 2)
        self.alphas[active] = np.concatenate([self.alphas[active, :, :t][image, beam], alpha[image, beam][:, :, None]], 2)
        return beam, word

    def best(self, options: GenerationOptions) -> list[list[Hypothesis]]:
        score = _length_normalise(self.logprob, self.lengths, options.length_penalty)
        order = np.argsort(-score, axis=1, kind="stable")
        results = []
        for b in range(len(score)):
            hyps = []
            for j in order[b, :min(options.n_best, score.shape[1])].tolist():
                n = int(self.lengths[b, j])  # words emitted, counting <end>
                if n and int(self.tokens[b, j, n - 1]) == options.end:
                    n -= 1
                hyps.append(Hypothesis(self.tokens[b, j, :n].tolist(), float(self.logprob[b, j]), float(score[b, j]),
                                       self.alphas[b, j, :n].copy()))
            results.append(hyps)
        return results


def beam_search(steps: StepDecoder, features, options: GenerationOptions) -> list[list[Hypothesis]]:
    """Beam search over a batch of image grids `features` (B, R, F): all B*k beams advance together
    as one batch. Decoding stops when every beam has finished or after `max_length` words; beams that
    never emitted <end> are returned as they are."""
    features = np.asarray(features, dtype=np.float32)
    B, k = len(features), options.beam_size
    stepper = _Stepper(steps, options)
    stepper.begin(features, k)
    beams = None  # made at the first step, which tells how many regions the attention covers
    words = np.full(B * k, options.start, dtype=np.int64)
    # The images still decoding; the state holds only their rows. An image whose k beams have all
    # finished can no longer change, so it leaves the batch (about 40% of the step rows of a batch
    # of 32 photos) and its columns are padded with <end>.
    active = np.arange(B)
    for _ in range(options.max_length):
        A = len(active)
        history = beams.tokens[active].reshape(A * k, -1) if beams else np.zeros((A * k, 0), np.int64)
        lp, alpha = stepper.logprobs(words, history, np.repeat(active, k))
        R = alpha.shape[-1]  # the grid's regions, and a grounded decoder's concept regions after them
        beams = beams or _Beams.empty(B, k, R)
        beam, word = beams.extend(active, lp.reshape(A, k, -1), alpha.reshape(A, k, R), options)
        stepper.keep((np.arange(A)[:, None] * k + beam).reshape(-1), "reorder")
        words = word.reshape(-1).astype(np.int64)
        going = ~beams.finished[active].all(1)
        if not going.any():
            break
        if not going.all():
            keep = (np.nonzero(going)[0][:, None] * k + np.arange(k)).reshape(-1)
            stepper.keep(keep, "select")
            words, active = words[keep], active[going]
    return beams.best(options)


def greedy(steps: StepDecoder, features, options: GenerationOptions) -> list[Hypothesis]:
    """The most likely word at every step, for a batch of image grids (B, R, F)."""
    return [h[0] for h in sample(steps, features, options.replace(temperature=0.0), n=1)]


def sample(steps: StepDecoder, features, options: GenerationOptions, n: int = 1) -> list[list[Hypothesis]]:
    """`n` captions for every image of a batch of grids (B, R, F), drawn word by word: nucleus
    sampling (from the smallest set of likely words that holds `top_p` of the probability, sharpened
    by `temperature`); temperature 0 takes the most likely word (greedy). Each image's captions come
    back best first by score; `logprob` is the model's own (untempered) log-probability."""
    features = np.asarray(features, dtype=np.float32)
    rng = options.rng if options.rng is not None else np.random.default_rng(0)
    B = features.shape[0]
    N = B * n
    stepper = _Stepper(steps, options)
    stepper.begin(features, n)
    words = np.full(N, options.start, dtype=np.int64)
    tokens = np.zeros((N, 0), dtype=np.int64)
    logprob = np.zeros(N, dtype=np.float32)
    lengths = np.zeros(N, dtype=np.int64)  # words emitted, counting <end>
    finished = np.zeros(N, dtype=bool)
    alphas = []
    live = np.arange(N)  # the rows still decoding (the state holds only these), as in beam_search
    for _ in range(options.max_length):
        lp, alpha = stepper.logprobs(words, tokens[live], live // n)
        words = lp.argmax(-1) if options.temperature == 0 else _nucleus(lp, options.temperature, options.top_p, rng)
        logprob[live] += lp[np.arange(len(live)), words]
        lengths[live] += 1
        finished[live] = words == options.end
        column = np.full(N, options.end, dtype=np.int64)
        column[live] = words
        tokens = np.concatenate([tokens, column[:, None]], 1)
        step_alpha = np.zeros((N, alpha.shape[-1]), dtype=np.float32)
        step_alpha[live] = alpha
        alphas.append(step_alpha)
        going = words != options.end
        if not going.any():
            break
        if not going.all():
            keep = np.nonzero(going)[0]
            stepper.keep(keep, "select")
            words, live = words[keep], live[keep]
        words = words.astype(np.int64)
    att = np.stack(alphas, 1)
    score = _length_normalise(logprob, lengths, options.length_penalty)
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
