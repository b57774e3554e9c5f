"""The person and face detectors (aicrl/model/people.py) and how P(person) mixes them with the probe."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aicrl.grounding import fit_person_mix
from aicrl.model.captioner import Captioner, default_model_dir
from aicrl.model.concepts import PersonHead
from aicrl.model.people import DETECTORS, PeopleDetector, letterbox

SAMPLES = Path(__file__).parent / "samples"


@pytest.fixture(scope="module")
def shipped() -> Captioner:
    return Captioner.from_pretrained(backend="onnx")


def test_letterbox_keeps_the_whole_photo_centred_in_the_square():
    wide = Image.new("RGB", (400, 100), (255, 255, 255))
    square = letterbox(wide, 224)
    assert square.shape == (1, 224, 224, 3) and square.dtype == np.float32
    assert square[0, 112, :, 0].min() == 1.0  # the photo's white spans the width
    assert square[0, 0, 112, 0] == -1.0 and square[0, 223, 112, 0] == -1.0  # black bands above and below


def test_the_shipped_detectors_see_the_astronaut_and_no_one_in_the_cat_or_the_coffee(shipped):
    assert shipped.sees_people
    scores = shipped.detect_people([SAMPLES / n for n in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")])
    assert scores.shape == (3, len(DETECTORS))
    assert scores[0].max() > 0.7  # her face and body
    assert scores[1:].max() < 0.3


def test_the_mix_moves_p_person_where_the_probe_alone_is_unsure(shipped):
    photos = [SAMPLES / n for n in ("astronaut.jpg", "coffee.jpg")]
    features = shipped.encode(photos)
    alone, seen = shipped.seen(features), shipped.seen(features, shipped.detect_people(photos))
    probe, mixed = [s.person for s in alone], [s.person for s in seen]
    assert mixed[0] > max(probe[0], 0.8)  # the detectors confirm the person
    assert mixed[1] < min(probe[1], 0.1)  # and find none in a cup of coffee
    # each P(person) comes with the threshold of its own calibration
    assert {s.person_absent for s in alone} == {PersonHead.PROBE_ABSENT}
    assert {s.person_absent for s in seen} == {PersonHead.MIX_ABSENT}


def test_caption_reads_the_detectors(shipped, monkeypatch):
    calls = []
    real = PeopleDetector.__call__
    monkeypatch.setattr(PeopleDetector, "__call__", lambda self, images: calls.append(len(images)) or real(self, images))
    shipped.caption([SAMPLES / "astronaut.jpg", SAMPLES / "coffee.jpg"])
    assert calls == [2]


def test_person_head_without_a_mix_or_detections_is_the_probe(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(1000), size=4).astype(np.float32)
    weight = rng.normal(0, 5, 1000).astype(np.float32)
    probe = PersonHead(weight, -2.0)
    expected = 1 / (1 + np.exp(-(probs @ weight - 2.0)))
    assert np.allclose(probe(probs), expected, atol=1e-6)
    mixed = PersonHead(weight, -2.0, np.array([1.0, 2.0, 0.5, -0.3]))
    assert np.allclose(mixed(probs), expected, atol=1e-6)  # no detections: the probe alone
    detections = np.array([[0.9, 0.9], [0.01, 0.01], [0.5, 0.5], [0.99, 0.01]], dtype=np.float32)
    odds = np.log(detections / (1 - detections))
    logits = np.log(expected / (1 - expected)) + 2.0 * odds[:, 0] + 0.5 * odds[:, 1] - 0.3
    assert np.allclose(mixed(probs, detections), 1 / (1 + np.exp(-logits)), atol=1e-4)
    mixed.save(tmp_path)
    loaded = PersonHead.load(tmp_path)
    assert np.allclose(loaded.mix, mixed.mix) and np.allclose(loaded(probs, detections), mixed(probs, detections))
    probe.save(tmp_path)
    assert PersonHead.load(tmp_path).mix is None


def test_fit_person_mix_trusts_the_detector_that_agrees_with_the_captions():
    rng = np.random.default_rng(1)
    present = rng.random(400) < 0.75  # Flickr8k-like: most photos have someone in them
    captions = [["a man runs"] * 5 if p else ["a dog runs"] * 5 for p in present]
    face = np.where(present, rng.uniform(0.6, 1.0, 400), rng.uniform(0.0, 0.4, 400))  # right
    pose = rng.uniform(0, 1, 400)  # noise
    probe = np.clip(np.where(present, 0.6, 0.4) + rng.normal(0, 0.3, 400), 0.01, 0.99)  # weak
    mix, accuracy = fit_person_mix(probe, np.stack([pose, face], 1), captions)
    assert mix.shape == (4,) and accuracy > 0.95
    assert mix[2] > 2 * abs(mix[1]) and mix[2] > mix[0] > 0


def test_a_folder_without_people_onnx_has_no_detector(tmp_path):
    assert PeopleDetector.load(tmp_path) is None
    assert (default_model_dir() / "people.onnx").is_file()


def test_a_broken_people_onnx_is_said_and_the_probe_decides(tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(default_model_dir(), folder)
    (folder / "people.onnx").write_bytes(b"not an onnx graph")
    model = Captioner.from_pretrained(folder, backend="onnx")
    [result] = model.caption([SAMPLES / "coffee.jpg"])
    assert result.captions[0].text
    assert "people.onnx" in capsys.readouterr().err and model.people is None
    assert model.detect_people([SAMPLES / "coffee.jpg"]) is None  # said once, then the probe alone
