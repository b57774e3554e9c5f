"""The grounding stage (aicrl/grounding.py) and the concept input of a grounded decoder."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aicrl.data.features import FeatureCache
from aicrl.grounding import Batches, GroundingConfig, ground, person_slot, prepare, widen
from aicrl.model.captioner import Captioner, default_model_dir
from aicrl.model.concepts import ConceptTable, SentenceConcepts, concept_names, top_concepts

from .conftest import make_tiny_model

CONCEPTS = default_model_dir() / "concepts.json"


@pytest.fixture(scope="module")
def table() -> ConceptTable:
    return ConceptTable.read(CONCEPTS)


def test_sentence_concepts_find_what_a_caption_names(table):
    find = SentenceConcepts(table)
    names = concept_names(table)
    found = [names[i - 1] for i in find("two zebras and a man eat a hot dog near the puppy".split())]
    assert found[:1] == ["zebra"] and "dog" in found and "person" == found[-1]
    assert "hot dog" in found  # the two-word name wins over "dog"
    assert find("a red square on a white background".split()) == []
    # words that describe name nothing: no animal in "two young girls", no orange in "an orange shirt"
    described = [names[i - 1] for i in find("two young girls in an orange shirt and a giant hat".split())]
    assert "animal" not in described and "orange" not in described and "hat" in described
    assert [names[i - 1] for i in find("a bowl of oranges and an electric guitar".split())][-2:] == ["orange", "electric guitar"]
    # an activity names its gear: skiing is not "missing" the skis
    assert [names[i - 1] for i in find("a man is skiing down a snowy hill".split())] == ["ski", "person"]


def test_top_concepts_put_the_person_first_and_drop_the_unlikely():
    words = np.array([[0.01, 0.7, 0.2, 0.09], [0.0, 0.0, 0.0, 0.0]])
    ids, probs = top_concepts(words, np.array([0.9, 0.1]), k=3)
    assert ids.tolist() == [[5, 2, 3], [5, 0, 0]]  # 1-based word ids; 5 = person, after the 4 words
    assert np.allclose(probs, [[0.9, 0.7, 0.2], [0.1, 0, 0]])


def test_text_repeats_draw_the_caption_text_more_often_an_epoch():
    def kinds(repeats: int) -> list[str]:
        cfg = GroundingConfig(init_from="m", data_dir="d", features="f", concepts="c", out="o", batch_size=2,
                              grid_dropout=0.0, text_repeats=repeats)
        return [kind for kind, _ in Batches(cfg, photo_rows=list(range(8)), text_rows=list(range(6))).epoch(0)]

    assert (kinds(1).count("photo"), kinds(1).count("text")) == (4, 3)
    assert (kinds(3).count("photo"), kinds(3).count("text")) == (4, 9)


def test_widening_keeps_every_known_word_and_adds_concept_regions(tmp_path, table):
    model = Captioner.from_pretrained(make_tiny_model(tmp_path / "tiny"), backend="torch")
    wide = widen(model, ["zebra", "a", "broccoli"], table, k=4)
    assert wide.vocab.itos[: len(model.vocab)] == model.vocab.itos
    assert wide.vocab.itos[len(model.vocab):] == ["zebra", "broccoli"]
    old, new = model.decoder.state_dict(), wide.decoder.state_dict()
    assert torch.equal(new["embed.weight"][: len(model.vocab)], old["embed.weight"])
    assert torch.allclose(new["embed.weight"][-1], old["embed.weight"].mean(0))
    assert new["concept_embed.weight"].shape == (len(concept_names(table)) + 1, wide.config.feature_dim)
    assert wide.config.concept_tokens == 4


@pytest.fixture(scope="module")
def grounded(tiny_flickr, tiny_cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grounding")
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"caption": c}) + "\n" for c in
                            ["a zebra grazes in a field", "two zebras stand on grass", "a plate of broccoli"] * 4))
    cfg = GroundingConfig(init_from=str(make_tiny_model(root / "init")), data_dir=str(tiny_flickr),
                          features=str(tiny_cache), concepts=str(CONCEPTS), out=str(root / "run"),
                          text_file=str(text), min_freq=2, epochs=1, batch_size=8, lr=1e-2, eval_beam=1)
    ground(cfg)
    ground(GroundingConfig(**{**cfg.__dict__, "epochs": 2}))  # a rerun resumes after the last epoch
    return root / "run"


def test_grounding_trains_resumes_and_saves_a_grounded_folder(grounded):
    history = [json.loads(line) for line in (grounded / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    best = grounded / "best"
    assert {"concepts.json", "person_head.npz", "model.safetensors"} <= {p.name for p in best.iterdir()}
    model = Captioner.from_pretrained(best, backend="torch")
    assert "zebra" in model.vocab.stoi and model.config.concept_tokens == 6


def test_a_grounded_model_trains_on_with_its_concepts_and_a_person_slot_from_the_caption(grounded, tiny_flickr,
                                                                                         tiny_cache, tmp_path):
    start = Captioner.from_pretrained(grounded / "best", backend="torch")
    cfg = GroundingConfig(init_from=str(grounded / "best"), data_dir=str(tiny_flickr), features=str(tiny_cache),
                          concepts=str(CONCEPTS), out=str(tmp_path / "again"), person_from_caption=True, batch_size=8)
    run = prepare(cfg)
    assert torch.equal(run.model.decoder.concept_embed.weight, start.decoder.concept_embed.weight)
    assert np.array_equal(run.model.person_head.weight, start.person_head.weight)
    seen = []
    real = run.model.decoder.forward
    run.model.decoder.forward = lambda *a: seen.append(a[3][1][:, 0].clone()) or real(*a)
    rows = [(image, "factual", caption) for image, caption in
            [(run.batches.photo_rows[0][0], "a man rides a bike"), (run.batches.photo_rows[0][0], "a red bike")]]
    run.loss("photo", rows)
    assert seen[0][0] >= 0.6 and seen[0][1] <= 0.25  # the caption decides, not the photo
    slot = person_slot(np.array([True, False] * 50), np.random.default_rng(0))
    assert (slot[::2] >= 0.6).all() and (slot[1::2] <= 0.25).all()


def test_a_grounded_folder_decodes_the_same_on_onnx_and_torch(grounded, tiny_cache, tmp_path):
    import shutil

    from aicrl.export import export_onnx

    folder = tmp_path / "grounded"
    shutil.copytree(grounded / "best", folder)
    torch_model = Captioner.from_pretrained(folder, backend="torch")
    torch_model.config.precision = "fp32"  # as ONNX Runtime runs it: no bf16 near-ties between the two
    export_onnx(folder)
    onnx_model = Captioner.from_pretrained(folder, backend="onnx")
    cache = FeatureCache(tiny_cache)
    features = cache.get(cache.names[:4]).float().numpy()
    a, b = torch_model.decode(features, beam_size=3), onnx_model.decode(features, beam_size=3)
    assert [h[0].tokens for h in a] == [h[0].tokens for h in b]
    assert a[0][0].attention.shape[1] == 49 + 6  # the grid, then the concept regions
    concepts = onnx_model.concepts(onnx_model.seen(features))
    assert concepts[0].shape == (4, 6) and (concepts[0][:, 0] == len(concept_names(onnx_model.concept_table))).all()
    # the concepts alone (no grid): the graphs take any number of regions
    seen = onnx_model.seen(features)
    a, b = (m.decode(features[:, :0], beam_size=3, seen=seen) for m in (torch_model, onnx_model))
    assert [h[0].tokens for h in a] == [h[0].tokens for h in b] and a[0][0].attention.shape[1] == 6
    # where every caption of the grid's beam is false, the concepts' own captions join the rerank
    bare = onnx_model.decode(features[:, :0], beam_size=3, n_best=3, seen=seen)
    onnx_model.config.rerank_by_agreement = onnx_model.config.concept_pool = True
    grid = onnx_model.decode(features, beam_size=3, n_best=3, seen=seen)
    # the concept captions are true (those the grid did not write too), the grid's false
    clean = {tuple(h.tokens) for c in bare for h in c} - {tuple(h.tokens) for g in grid for h in g}
    assert clean
    onnx_model.agreement = lambda hyps, s: [{"unsupported": [] if tuple(h.tokens) in clean else ["dog"], "missed": [],
                                             "confidence": 0.0} for h in hyps]
    pooled = onnx_model.decode(features, beam_size=3, n_best=6, seen=seen)
    for g, c, p in zip(grid, bare, pooled):
        joined = {tuple(h.tokens) for h in g} | ({tuple(h.tokens) for h in c} & clean)  # a false one never joins
        assert {tuple(h.tokens) for h in p} == joined


def seen_of(table, person, **words):
    from aicrl.model.concepts import Seen

    probs = np.zeros(len(table.vocabulary))
    for word, p in words.items():
        probs[table.vocabulary.index(word)] = p
    return Seen(probs, person)


def test_agreement_names_what_the_encoder_rules_out_and_what_it_is_sure_of(table):
    from aicrl.model.concepts import Agreement

    check = Agreement(table).check
    assert check("a dog is in the air".split(), seen_of(table, 0.1, cat=0.9)) == {
        "confidence": 0.0, "unsupported": ["dog"], "missed": ["cat"]}
    assert check("a cat sleeps on a bed".split(), seen_of(table, 0.1, cat=0.9)) == {
        "confidence": 1.0, "unsupported": [], "missed": []}
    assert check("a man holds a cat".split(), seen_of(table, 0.05, cat=0.9))["unsupported"] == ["person"]
    assert check("a man holds a cat".split(), seen_of(table, None, cat=0.9))["unsupported"] == []  # no probe


def test_reranking_prefers_a_true_caption_to_a_more_likely_false_one(tmp_path, table):
    from aicrl.decoding import Hypothesis

    model = Captioner.from_pretrained(make_tiny_model(tmp_path / "tiny"), backend="torch")
    model.concept_table = table
    ids = lambda text: [model.vocab.stoi[w] for w in text.split()]  # noqa: E731
    hyps = [Hypothesis(ids("a man riding a horse"), -1.0, -0.2, np.zeros((5, 49))),
            Hypothesis(ids("a dog runs on grass"), -2.0, -0.4, np.zeros((5, 49))),
            Hypothesis(ids("a horse runs on grass"), -3.0, -0.6, np.zeros((5, 49)))]
    best = model._rerank(hyps, seen_of(table, 0.01, horse=0.8), n_best=2)
    assert [model.vocab.decode(h.tokens) for h in best] == ["a horse runs on grass", "a man riding a horse"]


def test_self_critical_training_of_a_grounded_model_feeds_it_its_concepts(grounded, tiny_flickr, tiny_cache, tmp_path,
                                                                          monkeypatch):
    from aicrl import training
    from aicrl.training import TrainConfig, train

    from .test_training import SMALL

    seen_concepts = []
    real = training.Prepared.concepts

    def spy(self, grids):
        out = real(self, grids)
        seen_concepts.append(out)
        return out

    monkeypatch.setattr(training.Prepared, "concepts", spy)
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), init_from=str(grounded / "best"),
                      objective="self-critical", scst_samples=2, scst_max_words=6, epochs=1, out=str(tmp_path / "scst"),
                      **(SMALL | {"early_stop": 99}))
    train(cfg)
    assert seen_concepts and all(ids.shape[1] == 6 and probs.shape == ids.shape for ids, probs in seen_concepts)
    model = Captioner.from_pretrained(tmp_path / "scst" / "best", backend="torch")
    assert model.config.concept_tokens == 6 and model.person_head is not None


def test_mention_once_covers_the_names_of_things_but_not_people_dogs_or_adjectives(tmp_path, table):
    model = Captioner.from_pretrained(make_tiny_model(tmp_path / "tiny"), backend="torch")
    assert model._mentioned_once() is None  # off by default
    model.concept_table, model.config.mention_once = table, True
    model.vocab = type(model.vocab)(list(model.vocab.itos) + ["pizza", "cat", "man", "dog", "young", "shirt"])
    once = model._mentioned_once()
    named = {w for w, flag in zip(model.vocab.itos, once) if flag}
    assert {"pizza", "cat", "horse"} <= named and not named & {"man", "dog", "young", "shirt", "a", "riding"}
    # and the words the training captions say at most once (vocab.json said_once), with or without a table
    model.vocab = type(model.vocab)(model.vocab.itos, ["shirt"])
    assert model._mentioned_once()[model.vocab.stoi["shirt"]]
    model.concept_table = None
    model.vocab = type(model.vocab)(model.vocab.itos, ["shirt"])
    assert {w for w, flag in zip(model.vocab.itos, model._mentioned_once()) if flag} == {"shirt"}


def test_fit_people_writes_the_mix_of_probe_and_detectors(grounded, tiny_flickr, tiny_cache, tmp_path, capsys):
    import shutil

    from aicrl.cli import main
    from aicrl.model.concepts import PersonHead

    folder = tmp_path / "model"
    shutil.copytree(grounded / "best", folder)
    shutil.copyfile(default_model_dir() / "people.onnx", folder / "people.onnx")
    data = tmp_path / "flickr8k"
    shutil.copytree(tiny_flickr, data)
    token = data / "Flickr8k.token.txt"  # half the photos get a person in most of their captions
    lines = token.read_text().splitlines()
    token.write_text("\n".join(line.removesuffix(" .") + " with a man ." if i % 10 < 5 else line
                               for i, line in enumerate(lines)) + "\n")
    assert PersonHead.load(folder).mix is None
    assert main(["fit-people", "--model", str(folder), "--data-dir", str(data), "--features", str(tiny_cache),
                 "--images", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["mix"]) == {"probe", "pose", "face", "bias"} and report["images"] == 8
    head = PersonHead.load(folder)
    assert head.mix is not None and np.allclose(head.mix, [report["mix"][k] for k in ("probe", "pose", "face", "bias")])
    assert Captioner.from_pretrained(folder, backend="torch").sees_people
