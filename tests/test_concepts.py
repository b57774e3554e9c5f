"""The concept table: ImageNet classes -> caption words (aicrl/model/concepts.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

from aicrl.model.concepts import FILE, ConceptTable, imagenet_probabilities, plural, singular
from aicrl.model.tags import imagenet_classes, tags_from_features

PRETRAINED = Path(__file__).parents[1] / "aicrl" / "pretrained"


def test_shipped_table_covers_every_class_in_order():
    table = ConceptTable.load(PRETRAINED)
    assert table is not None and table.labels == list(imagenet_classes())
    word = dict(zip(table.labels, table.words))
    assert word["dalmatian"] == word["golden retriever"] == "dog"
    assert (word["tabby"], word["zebra"], word["espresso"], word["ox"]) == ("cat", "zebra", "coffee", "cow")
    coco = dict(zip(table.labels, table.coco))
    assert (coco["toilet seat"], coco["laptop"], coco["espresso"]) == ("toilet", "laptop", None)


def test_load_without_a_table_is_none(tmp_path):
    assert ConceptTable.load(tmp_path) is None


@pytest.fixture
def tiny_table(tmp_path) -> ConceptTable:
    classes = [{"label": "dalmatian", "word": "dog", "coco": "dog"},
               {"label": "golden retriever", "word": "dog", "coco": "dog"},
               {"label": "tabby", "word": "cat", "coco": "cat"}]
    (tmp_path / FILE).write_text(json.dumps({"classes": classes, "forms": {"dog": ["dog", "puppy"]}}))
    return ConceptTable.load(tmp_path)


def test_breeds_add_up_to_their_word(tiny_table):
    (row,) = tiny_table.concept_probabilities(np.array([[0.3, 0.5, 0.2]]))
    assert list(row) == ["dog", "cat"] and row["dog"] == pytest.approx(0.8)
    assert tiny_table.concept_probabilities(np.array([[0.3, 0.5, 0.2]]), min_probability=0.5) == [{"dog": pytest.approx(0.8)}]
    with pytest.raises(ValueError):
        tiny_table.word_probabilities(np.ones((1, 4)))


def test_words_of_has_plurals_and_kinds(tiny_table):
    assert {"dog", "dogs", "puppy"} <= tiny_table.words_of("dog")
    assert "cats" in tiny_table.words_of("cat") and "dogs" not in tiny_table.words_of("cat")
    assert tiny_table.coco_of("cat") == "cat" and tiny_table.coco_of("zebra") is None


@pytest.mark.parametrize("one,many", [("dog", "dogs"), ("bus", "buses"), ("puppy", "puppies"), ("man", "men"),
                                      ("hot dog", "hot dogs"), ("sheep", "sheep"), ("glass", "glasses")])
def test_plural_and_singular_by_rule(one, many):
    assert plural(one) == many and singular(many) == one


def test_tags_use_the_same_probabilities():
    rng = np.random.default_rng(0)
    head = (rng.normal(size=(1000, 8)).astype(np.float32), np.zeros(1000, np.float32))
    features = rng.normal(size=(2, 4, 8)).astype(np.float32)
    probs = imagenet_probabilities(head, features)
    assert probs.shape == (2, 1000) and np.allclose(probs.sum(1), 1)
    tags = tags_from_features(head, features, top_k=1, min_probability=0)
    assert tags[0][0]["label"] == imagenet_classes()[int(probs[0].argmax())]


def test_a_words_forms_take_its_coco_class_synonyms_but_not_peoples():
    from aicrl.model.build_concepts import coco_names

    synonyms = {"airplane": "airplane", "jet": "airplane", "plane": "airplane", "man": "person", "pitcher": "person"}
    classes = [{"word": "airliner", "coco": "airplane"}, {"word": "warplane", "coco": "airplane"},
               {"word": "baseball player", "coco": "person"}, {"word": "espresso", "coco": None}]
    names = coco_names(classes, synonyms)
    assert sorted(names["airliner"]) == ["airplane", "jet", "plane"] == sorted(names["warplane"])
    assert "baseball player" not in names and "espresso" not in names


def test_the_shipped_table_lets_coco_captions_teach_imagenets_words():
    from aicrl.model.concepts import SentenceConcepts, concept_names

    table = ConceptTable.load(Path(__file__).resolve().parents[1] / "aicrl" / "pretrained")
    names, find = concept_names(table), SentenceConcepts(table)
    named = lambda caption: [names[i - 1] for i in find(caption.split())]  # noqa: E731
    assert named("a large jet on the runway") == ["airliner"]  # ImageNet's class; COCO says jet or plane
    assert named("a white sink in a bathroom") == ["sink"]  # the washbasin class
