"""The fluency judge: its corruptions, its training and export, and the rerank that uses it."""
from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from aicrl.data.vocab import Vocabulary

torch = pytest.importorskip("torch")

from aicrl.fluency import FluencyJudge  # noqa: E402
from aicrl.fluency_training import (FluencyLM, _cut, _glue, _local, corrupt, examples, export_fluency,  # noqa: E402
                                    fit_fluency)

GOOD = ["a dog runs on the grass", "a man rides a horse on the beach", "two children play in the water",
        "a girl in a red dress jumps over a puddle", "a black dog swims to get a stick",
        "a woman sits on a bench in the park"] * 20


def test_glue_joins_two_captions_at_a_word_both_have():
    rng = random.Random(0)
    a, b = "a bird is flying over the water".split(), "a man jumps to become the best friend".split()
    glued = _glue(a, b, rng)
    assert glued is not None and glued != a and glued != b
    assert any(glued[:i] == a[:i] and glued[i:] == b[j:] and a[i] == b[j] and a[i] in {"a", "the"}
               for i in range(1, len(a)) for j in range(1, len(b)))


def test_local_and_cut_corruptions_change_the_caption():
    rng = random.Random(1)
    words = "a girl in a red dress jumps over a puddle".split()
    for _ in range(20):
        bad = _local(words, rng)
        assert bad is None or bad != words
    cut = _cut(words, rng)
    assert cut is not None and len(cut) < len(words) and cut[-1] in {"a", "in"}
    assert all(corrupt(words, words[::-1], rng) != words for _ in range(20))


def test_examples_pair_each_caption_with_a_corruption():
    texts, labels = examples(GOOD[:6], seed=0)
    assert labels.count(1) == 6 and 0 < labels.count(0) <= 6
    assert all(t not in [g.split() for g in GOOD[:6]] for t, y in zip(texts, labels) if y == 0)
    assert all(t in [g.split() for g in GOOD[:6]] for t, y in zip(texts, labels) if y == 1)


def test_the_judge_learns_and_its_onnx_export_agrees(tmp_path):
    vocab = Vocabulary.build(GOOD, min_freq=1)
    fit = fit_fluency(vocab, GOOD, GOOD[:6] * 3, epochs=4, batch_size=16, lr=5e-3, log=lambda _: None)
    assert fit.dev_perplexity < 4 and fit.dev_accuracy > 0.6  # chance is 0.5
    export_fluency(fit.net, tmp_path / "fluency.onnx")
    judge = FluencyJudge(tmp_path / "fluency.onnx")
    captions = ["a dog runs on the grass", "a dog runs on the the the grass", "a man rides a"]
    p = judge.score(captions, vocab.stoi, vocab.unk)
    ids = torch.tensor([[vocab.stoi[w] for w in c.split()] + [0] * (8 - len(c.split())) for c in captions])
    with torch.no_grad():
        # each caption alone: padding changes nothing
        expected = torch.sigmoid(torch.cat([fit.net(ids[i: i + 1, : len(c.split())])
                                            for i, c in enumerate(captions)])).numpy()
    assert np.allclose(p, expected, atol=1e-4)
    assert p[0] > p[1] and p[0] > p[2]
    assert judge.score_ids([]).shape == (0,)


class WordJudge:
    """A judge that finds every caption with `word` broken (the rerank sees only score_ids)."""

    def __init__(self, word: int):
        self.word = word

    def score_ids(self, rows):
        return np.array([0.01 if self.word in r else 0.99 for r in rows], dtype=np.float32)


def test_a_styled_caption_is_reranked_by_the_judge(web_model_dir, tmp_path):
    from aicrl.model.captioner import Captioner
    from aicrl.model.folder import ModelFolder

    folder = tmp_path / "model"
    shutil.copytree(web_model_dir, folder)
    vocab = Vocabulary.load(ModelFolder(folder).vocab)
    export_fluency(FluencyLM(vocab, embed_dim=8, hidden_dim=8), ModelFolder(folder).fluency)
    captioner = Captioner.from_pretrained(folder, backend="torch")
    assert isinstance(captioner.fluency, FluencyJudge)
    features = np.random.default_rng(0).standard_normal((4, 49, captioner.config.feature_dim)).astype(np.float32)
    plain = captioner.decode(features, beam_size=3, n_best=3, style="humorous")
    # a word of some best caption that another caption of its beam lacks
    word = next(w for b in plain for w in b[0].tokens if any(w not in h.tokens for h in b[1:]))
    captioner.fluency = WordJudge(word)
    captioner.config.fluency_weight = 2.0
    judged = captioner.decode(features, beam_size=3, n_best=3, style="humorous")
    moved = 0
    for before, after in zip(plain, judged):
        assert sorted(h.tokens for h in before) == sorted(h.tokens for h in after)  # the same beam, reordered
        flags = [captioner.fluency.word in h.tokens for h in after]
        assert flags == sorted(flags)  # the judged-broken ones last
        moved += before[0].tokens != after[0].tokens
    assert moved  # the rerank changed a first caption
    # the pool: the beam pushed more gently joins the candidates, without duplicates
    captioner.config.style_guidance, captioner.config.fluency_pool = 3.0, [0.0]
    pooled = captioner.decode(features, beam_size=3, n_best=6, style="humorous")
    gentle = captioner.decode(features, beam_size=3, n_best=3, style="humorous", guidance=0.0)
    captioner.config.fluency_pool = []
    strong = captioner.decode(features, beam_size=3, n_best=3, style="humorous")
    for p, g, s in zip(pooled, gentle, strong):
        tokens = [tuple(h.tokens) for h in p]
        assert len(tokens) == len(set(tokens)) and {tuple(h.tokens) for h in g + s} == set(tokens)
    factual = captioner.decode(features, beam_size=3, n_best=3)  # plain captions are not reranked
    captioner.config.fluency_weight = 0.0
    assert [[h.tokens for h in b] for b in factual] == [[h.tokens for h in b] for b in captioner.decode(
        features, beam_size=3, n_best=3)]
    captioner.fluency = FluencyJudge.load(folder)
    captioner.save_pretrained(tmp_path / "copy")
    assert ModelFolder(tmp_path / "copy").fluency.is_file()
