"""Grounding measures on hand-made captions with known answers (aicrl/hallucination.py)."""
import json

import numpy as np
import pytest

from aicrl.hallucination import (chair, grounding, mentions, objects, person_dog_hallucination,
                                 read_synonyms, synonyms_path, tag_agreement)
from aicrl.model.concepts import FILE, ConceptTable

SYNONYMS = """person, man, woman, boy, girl, people, child
dog, puppy, pup
hot dog
teddy bear, teddybear
cat, kitten
bus, minibus
"""


@pytest.fixture
def synonyms(tmp_path):
    (tmp_path / "synonyms.txt").write_text(SYNONYMS)
    return read_synonyms(tmp_path / "synonyms.txt")


def test_objects_handle_plurals_and_two_word_names(synonyms):
    assert objects("Two men eating hot dogs near buses", synonyms) == {"person", "hot dog", "bus"}
    assert objects("a child hugs teddy bears and puppies", synonyms) == {"person", "teddy bear", "dog"}
    assert objects("a zebra on the grass", synonyms) == set()


def test_chair_counts_objects_no_reference_names(synonyms):
    refs = {"a": ["a cat on a sofa", "a kitten sleeping"], "b": ["a man with his dog", "a puppy and a boy"]}
    preds = {"a": "a dog and a cat on a sofa",  # dog invented
             "b": "a man walking his dogs"}  # both true
    assert chair(preds, refs, synonyms) == {"chair_s": 0.5, "chair_i": round(1 / 4, 4), "objects_named": 4}


def test_person_and_dog_hallucination():
    refs = {"a": ["a cat drinks from a toilet"], "b": ["a woman and her dog"], "c": ["a bowl of broccoli"]}
    preds = {"a": "a white dog is jumping", "b": "a girl and a puppy", "c": "a group of people eat"}
    assert person_dog_hallucination(preds, refs) == {"person_or_dog": round(2 / 3, 4), "person": round(1 / 3, 4),
                                                     "dog": round(1 / 3, 4)}
    # the words of a person's role or doing count as people, in captions and references alike
    refs = {"a": ["a parking meter on a street"], "b": ["a cyclist rides past a bus"]}
    preds = {"a": "a kayaker in a white shirt", "b": "a man on a bike next to a bus"}
    assert person_dog_hallucination(preds, refs)["person"] == 0.5


def test_tag_agreement_uses_words_and_coco_synonyms(tmp_path, synonyms):
    classes = [{"label": "dalmatian", "word": "dog", "coco": "dog"}, {"label": "tabby", "word": "cat", "coco": "cat"},
               {"label": "zebra", "word": "zebra", "coco": None}]
    (tmp_path / FILE).write_text(json.dumps({"classes": classes, "forms": {}}))
    table = ConceptTable.load(tmp_path)
    probs = {"a": np.array([0.7, 0.2, 0.1]), "b": np.array([0.1, 0.1, 0.8]), "c": np.array([0.4, 0.3, 0.3]),
             "d": np.array([0.0, 0.9, 0.1])}
    preds = {"a": "two puppies play", "b": "a group of people", "c": "anything", "d": "a kitten on a bed"}
    result = tag_agreement(preds, probs, table, synonyms)
    assert result["tagged_images"] == 3 and result["tag_agreement"] == round(2 / 3, 4)  # "c" has no tag >= 0.5
    assert tag_agreement(preds, probs, table)["tag_agreement"] == round(1 / 3, 4)  # "kitten" needs the synonyms


def test_mentions_prefers_the_two_word_phrase():
    assert mentions("a hot dog stand", {"hot dog", "dog"}) == ["hot dog"]


def test_measures_skip_without_their_inputs(tmp_path):
    out = grounding({"a": "a dog"}, {"a": ["a cat"]}, None)
    assert out["chair"].startswith("skipped") and out["tags"].startswith("skipped")
    assert out["person_dog_hallucination"]["dog"] == 1.0
    assert synonyms_path(None, tmp_path / "data") is None
    with pytest.raises(FileNotFoundError):
        synonyms_path(str(tmp_path / "missing.txt"), None)
