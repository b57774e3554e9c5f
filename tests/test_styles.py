"""Styled captions worth reading: stock phrases cost more (aicrl/phrases.py), sampling for variants
(decoding.sample), different captions of one photo, many traits, and the grammar checker."""
import json

import numpy as np
import pytest
import torch

from aicrl.config import CaptionerConfig
from aicrl.data.vocab import Vocabulary, ngram_shares, trigram_shares
from aicrl.decoding import GenerationOptions, beam_search, greedy, sample
from aicrl.evaluation import grammar_error_rate, grammar_errors
from aicrl.model.captioner import Captioner
from aicrl.model.decoder import AttentionLSTMDecoder
from aicrl.model.folder import ModelFolder
from aicrl.phrases import OverusedPhrases, PhrasePenalty, fit_phrases

from .conftest import SAMPLES


class ScriptedSteps:
    """A StepDecoder whose next-word logits depend only on the previous word (a bigram table)."""

    def __init__(self, table: np.ndarray):
        self.table = table.astype(np.float32)

    def start(self, features, styles, repeat=1, concepts=None):
        return np.zeros(len(features) * repeat)

    def step(self, words, state):
        return self.table[words], state, np.full((len(words), 1), 1.0, np.float32)

    def reorder(self, state, rows):
        return state[rows]

    select = reorder


# vocabulary: 0 <pad>, 1 <start>, 2 <end>, 3 <unk>, 4 "to", 5 "impress", 6 "his", 7 "lover", 8 "friends"
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "to", "impress", "his", "lover", "friends"]


def stock_phrase_model() -> ScriptedSteps:
    """Always says "to impress his lover", and "to impress his friends" only a little less gladly."""
    t = np.full((len(WORDS), len(WORDS)), -10.0)
    t[1, 4] = t[4, 5] = t[5, 6] = 0.0
    t[6, 7], t[6, 8] = 0.0, -1.0
    t[7, 2] = t[8, 2] = 0.0
    return ScriptedSteps(t)


def test_an_overused_phrase_costs_more_and_the_next_best_wins():
    steps, features = stock_phrase_model(), np.zeros((2, 1, 4), np.float32)
    plain = beam_search(steps, features, GenerationOptions(1, 2, beam_size=3))
    assert [WORDS[i] for i in plain[0][0].tokens] == ["to", "impress", "his", "lover"]
    phrases = OverusedPhrases({"romantic": {"impress his lover": [0.4, 0.0]}}, target=0.04, strength=1.0)
    penalty = phrases.for_style("romantic", {w: i for i, w in enumerate(WORDS)}, len(WORDS))
    assert penalty.table[(5, 6)][0].tolist() == [7]
    assert penalty.table[(5, 6)][1][0] == pytest.approx(np.log(10))  # strength * log(share / target)
    for hyps in (beam_search(steps, features, GenerationOptions(1, 2, beam_size=3, processors=[penalty])),
                 [[h] for h in greedy(steps, features, GenerationOptions(1, 2, processors=[penalty]))]):
        assert [WORDS[i] for i in hyps[0][0].tokens] == ["to", "impress", "his", "friends"]
    assert phrases.for_style("humorous", {w: i for i, w in enumerate(WORDS)}, len(WORDS)) is None


def test_penalty_rows_follow_each_history():
    penalty = PhrasePenalty({(5, 6): (np.array([7]), np.array([2.0], np.float32)),  # "impress his" -> "lover"
                             (4,): (np.array([5]), np.array([1.0], np.float32))}, vocab_size=9)  # "to" -> "impress"
    assert penalty.penalty(np.zeros((3, 0), np.int64)) is None
    assert penalty.penalty(np.array([[6], [8]])) is None  # neither context
    out = penalty.penalty(np.array([[4, 5, 6], [5, 6, 4], [1, 5, 6]]))
    assert out[0, 7] == 2.0 and out[2, 7] == 2.0 and out[1, 5] == 1.0 and out.sum() == 5.0


def test_people_s_own_use_of_a_phrase_is_allowed():
    phrases = OverusedPhrases(target=0.03)
    shares = ngram_shares(["a dog in a park to impress his lover"] * 9 + ["a cat"])
    assert shares["in a"] == shares["to impress his"] == pytest.approx(0.9)
    phrases.update("romantic", shares, human={"in a": 0.95, "a dog": 0.5, "to impress his": 0.01})
    kept = phrases.styles["romantic"]
    assert "in a" not in kept and kept["a dog"] == [0.9, 0.5] and kept["to impress his"] == [0.9, 0.01]
    table = phrases.for_style("romantic", {w: i for i, w in enumerate(["<pad>", "a", "dog", "to", "impress", "his"])},
                              6).table
    assert table[(1,)][1][0] == pytest.approx(np.log(0.9 / 0.5))  # "a" -> "dog": over-used 1.8x
    assert table[(3, 4)][1][0] == pytest.approx(np.log(0.9 / 0.03))  # below the target, the target counts


def test_sampling_draws_from_the_nucleus_and_temperature_zero_is_greedy():
    t = np.full((len(WORDS), len(WORDS)), -20.0)
    t[1, 4], t[1, 5], t[1, 6] = 0.0, -0.1, -8.0  # after <start>: "to" or "impress"; "his" is outside top_p
    t[4:, 2] = 0.0
    steps, features = ScriptedSteps(t), np.zeros((3, 1, 4), np.float32)
    drawn = sample(steps, features, GenerationOptions(1, 2, temperature=1.0, top_p=0.9, rng=np.random.default_rng(0)), n=40)
    firsts = {h.tokens[0] for image in drawn for h in image}
    assert firsts == {4, 5}
    assert all(len(h.tokens) == 1 and h.logprob < 0 for image in drawn for h in image)
    assert all(image[0].score >= image[-1].score for image in drawn)  # best first
    again = sample(steps, features, GenerationOptions(1, 2, temperature=1.0, top_p=0.9, rng=np.random.default_rng(0)), n=40)
    assert [[h.tokens for h in i] for i in again] == [[h.tokens for h in i] for i in drawn]  # seeded
    cold = sample(steps, features, GenerationOptions(1, 2, temperature=0.0), n=1)
    assert [i[0].tokens for i in cold] == [h.tokens for h in greedy(steps, features, GenerationOptions(1, 2))] == [[4]] * 3


def test_ngram_shares_count_each_caption_once():
    shares = trigram_shares(["a dog to impress his lover", "a cat to impress his lover to impress his",
                             "a bird flies"])
    assert shares["to impress his"] == pytest.approx(2 / 3) and shares["a bird flies"] == pytest.approx(1 / 3)


def test_phrases_round_trip_and_a_retrained_model_drops_them(web_model_dir, tmp_path):
    phrases = OverusedPhrases(target=0.05)
    assert phrases.update("romantic", {"to impress his": 0.4, "a dog runs": 0.01}) == 1
    assert phrases.update("romantic", {"to impress his": 0.1, "his lover and": 0.2}) == 1
    assert phrases.styles["romantic"] == {"to impress his": [0.4, 0.0], "his lover and": [0.2, 0.0]}  # largest kept
    model = Captioner.from_pretrained(web_model_dir, backend="torch")
    assert model.phrases is None
    model.save_pretrained(tmp_path)
    phrases.save(tmp_path)
    loaded = Captioner.from_pretrained(tmp_path, backend="torch")
    assert loaded.phrases == phrases
    loaded.save_pretrained(tmp_path)  # new weights: their stock phrases are not known yet
    assert not ModelFolder(tmp_path).phrases.exists()


def test_fit_phrases_learns_a_styles_stock_phrases(web_captioner, tmp_path):
    features = {f"im{i}": np.random.default_rng(i).standard_normal((49, 1280)).astype(np.float32) for i in range(6)}
    lines = []
    phrases = fit_phrases(web_captioner, list(features), lambda names: np.stack([features[n] for n in names]),
                          ["romantic"], rounds=2, target=0.2, log=lines.append)
    assert web_captioner.phrases is None  # fitting leaves the model as it was
    assert len(lines) == 2 and "round 2, romantic" in lines[1]
    assert phrases.styles["romantic"] and all(v[0] > 0.2 for v in phrases.styles["romantic"].values())
    phrases.save(tmp_path)
    data = json.loads(ModelFolder(tmp_path).phrases.read_text())
    assert data["target"] == 0.2 and "romantic" in data["styles"]


def test_variants_are_different_captions_best_first(web_captioner):
    image = SAMPLES / "chelsea.jpg"
    best = web_captioner.caption([image], style="romantic")[0].captions[0]
    variants = web_captioner.caption([image], style="romantic", variants=4)[0].captions
    assert variants[0].text == best.text
    assert len({frozenset(c.words) for c in variants}) == len(variants) >= 2
    with pytest.raises(ValueError, match="variants"):
        web_captioner.caption([image], variants=11)


def test_a_model_with_twenty_traits_decodes_and_reranks():
    traits = ["factual"] + [f"trait{i}" for i in range(19)]
    vocab = Vocabulary.build(["a man riding a horse", "a dog runs on grass", "a happy cheerful dog"] * 5, 1)
    cfg = CaptionerConfig(vocab_size=len(vocab), styles=traits, embed_dim=32, hidden_dim=32, attention_dim=32,
                          style_dim=8, max_length=12, style_guidance=1.0)
    torch.manual_seed(0)
    model = Captioner(cfg, vocab, AttentionLSTMDecoder(cfg))
    model.phrases = OverusedPhrases({t: {"a happy cheerful": [0.5, 0.0], "a man": [0.3, 0.1]} for t in traits[1:]})
    features = np.random.default_rng(0).standard_normal((2, 49, 1280)).astype(np.float32)
    for trait in traits[1:]:  # each trait's own penalty table, beams and samples
        out = model.decode(features, beam_size=3, style=trait, variants=3)
        assert len(out) == 2 and all(1 <= len(v) <= 3 for v in out)
        assert all([h.score for h in v[1:]] == sorted((h.score for h in v[1:]), reverse=True) for v in out)


@pytest.mark.parametrize("caption, errors", [
    ("an ugly a yellow building", ["broken join: an ugly a"]),
    ("a dog to impress his the lover", ["two determiners: his the"]),
    ("a dog runs on the the grass", ["doubled word: the the"]),
    ("a man throws a ball to a dog with a stick", []),
    ("two children are playing in a fountain like a king", []),
])
def test_grammar_checker(caption, errors):
    assert grammar_errors(caption) == errors


def test_grammar_error_rate():
    assert grammar_error_rate({"1": "a dog a cat", "2": "a dog with a cat", "3": "a a", "4": "dogs"}) == 0.5


def test_fit_phrases_and_variants_from_the_command_line(web_model_dir, tiny_flickr, tiny_cache, tmp_path, capsys):
    import shutil

    from aicrl.cli import main

    model = shutil.copytree(web_model_dir, tmp_path / "model")
    assert main(["fit-phrases", "--model", str(model), "--data-dir", str(tiny_flickr), "--features",
                 str(tiny_cache), "--style-file", str(tiny_flickr / "styles.jsonl"), "--images", "6",
                 "--rounds", "2", "--target", "0.3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["phrases"]["romantic"] >= 1 and ModelFolder(model).phrases.is_file()
    assert main(["caption", str(SAMPLES / "chelsea.jpg"), "--model", str(model), "--style", "romantic",
                 "--variants", "3", "--json"]) == 0
    captions = json.loads(capsys.readouterr().out)["captions"]
    assert 2 <= len(captions) <= 3 and len({c["text"] for c in captions}) == len(captions)
    with pytest.raises(SystemExit):
        main(["caption", str(SAMPLES / "chelsea.jpg"), "--variants", "11"])


def test_style_guidance_can_differ_per_style(tmp_path):
    cfg = CaptionerConfig(styles=["factual", "humorous", "romantic"], style_guidance={"humorous": 2.0, "romantic": 1.5})
    assert (cfg.guidance_for("humorous"), cfg.guidance_for("romantic"), cfg.guidance_for("factual")) == (2.0, 1.5, 0.0)
    cfg.to_json(tmp_path / "config.json")
    assert CaptionerConfig.from_json(tmp_path / "config.json").guidance_for("humorous") == 2.0
    assert CaptionerConfig(style_guidance=1.0).guidance_for("romantic") == 1.0
