import json
import logging

import numpy as np
import pytest

from aicrl.data.datasets import read_coco_dir, read_flickr8k, read_style_jsonl
from aicrl.data.features import FeatureCache, extract_features
from aicrl.data.vocab import Vocabulary, said_once, tokenize

from .tiny_data import shape_image


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A dog's ball, in the PARK!") == ["a", "dog's", "ball", "in", "the", "park"]
    assert tokenize("  ...  ") == []


def test_vocabulary_min_freq_round_trip(tmp_path):
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_freq=2)
    assert vocab.itos[:6] == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    ids = vocab.encode("A dog flies.")
    assert ids == [vocab.start, vocab.stoi["a"], vocab.stoi["dog"], vocab.unk, vocab.end]
    assert vocab.decode(ids) == "a dog <unk>"
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").itos == vocab.itos
    assert vocab.decode(vocab.encode("a dog")) == "a dog"


def test_said_once_is_what_people_almost_never_say_twice_in_a_caption(tmp_path):
    captions = (["a kitchen with a stove", "a dog in a kitchen"] * 20 + ["a black dog and a brown dog"] * 3
                + ["a dog on grass"] * 10 + ["a zebra and a zebra"] + ["a zebra in a field"] * 59)
    once = said_once(captions)
    assert "kitchen" in once and "field" in once  # 40 and 59 captions, never twice
    assert "zebra" in once  # twice in 1 of its 60 captions: under 2%
    assert "dog" not in once  # twice in 3 of its 33
    assert "stove" not in once and "a" not in once and "and" not in once  # 20 captions are too few; function words
    assert "zebra" not in said_once(captions, max_share=0.01)
    vocab = Vocabulary.build(captions, min_freq=1)
    assert vocab.once == set(once)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").once == vocab.once
    (tmp_path / "old.json").write_text(json.dumps({"itos": vocab.itos}))  # a folder from before said_once
    assert Vocabulary.load(tmp_path / "old.json").once == frozenset()
    assert Vocabulary(vocab.itos, ["kitchen", "not-a-word"]).once == {"kitchen"}

def test_fit_once_records_the_words_said_once_in_a_model_folder(web_model_dir, tiny_flickr, tmp_path, capsys):
    import shutil

    from aicrl.cli import main

    model = shutil.copytree(web_model_dir, tmp_path / "model")
    text = tmp_path / "text.jsonl"  # horses come one to a caption, grass twice in many
    text.write_text("".join(json.dumps({"caption": c}) + "\n"
                            for c in ["a man riding a horse"] * 40 + ["a dog runs on grass by grass"] * 20
                            + ["a dog on grass"] * 20))
    assert main(["fit-once", "--model", str(model), "--data-dir", str(tiny_flickr), "--text-file", str(text)]) == 0
    report = json.loads(capsys.readouterr().out)
    once = Vocabulary.load(model / "vocab.json").once
    assert report["said_once"] == len(once) and report["captions"] > 80
    assert "horse" in once and "grass" not in once and "a" not in once
    assert Vocabulary.load(model / "vocab.json").itos == Vocabulary.load(web_model_dir / "vocab.json").itos

def test_flickr8k_reader_splits_and_skips_the_bogus_key(tiny_flickr, caplog):
    with caplog.at_level(logging.WARNING):
        data = read_flickr8k(tiny_flickr)
    assert "2258277193_586949ec62.jpg.1" in caplog.text
    assert len(data.images("train")) == 8 and len(data.images("dev")) == 2 and len(data.images("test")) == 2
    assert all(len(refs) == 5 for refs in data.references("test").values())
    assert not any(r.image.endswith(".jpg.1") for r in data.records)


def test_vocabulary_is_built_from_training_captions_only(tiny_flickr):
    data = read_flickr8k(tiny_flickr)
    test_only = {w for r in data.select("test") for w in tokenize(r.caption)} - \
                {w for r in data.select("train") for w in tokenize(r.caption)}
    vocab = Vocabulary.build((r.caption for r in data.select("train")), min_freq=1)
    assert not test_only & set(vocab.itos)


def test_style_jsonl_and_coco_readers(tiny_flickr, tmp_path):
    styled = read_style_jsonl(tiny_flickr / "styles.jsonl", tiny_flickr / "images")
    assert styled.styles() == ["factual", "humorous", "romantic"]
    assert {r.split for r in styled.records} == {"train", "dev"}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    shape_image("red", "square", 0).save(tmp_path / "train2017" / "000000000009.jpg")
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps({
        "images": [{"id": 9, "file_name": "000000000009.jpg"}],
        "annotations": [{"image_id": 9, "id": 1, "caption": "A red square. "}]}))
    coco = read_coco_dir(tmp_path)
    assert coco.images("train") == ["train2017/000000000009.jpg"]
    assert coco.records[0].caption == "A red square."
    assert (coco.image_dir / coco.images("train")[0]).exists()


def _coco_annotations(path, ids):
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids],
                                "annotations": [{"image_id": i, "id": 10 * i + k, "caption": f"photo {i} take {k}"}
                                                for i in ids for k in range(2)]}))


def test_coco_split_policy(tmp_path):
    """Dev and test are fixed halves of val2017; with no val2017, the last 10% + 10% of train2017."""
    (tmp_path / "annotations").mkdir()
    _coco_annotations(tmp_path / "annotations" / "captions_train2017.json", range(50, 10, -1))  # 40, unsorted
    carved = read_coco_dir(tmp_path)
    assert carved.images("dev") == [f"train2017/{i:012d}.jpg" for i in (46, 45, 44, 43)]
    assert carved.images("test") == [f"train2017/{i:012d}.jpg" for i in (50, 49, 48, 47)]
    assert len(carved.images("train")) == 32 and all(len(v) == 2 for v in carved.references("test").values())
    _coco_annotations(tmp_path / "annotations" / "captions_val2017.json", range(100, 106))
    full = read_coco_dir(tmp_path)
    assert len(full.images("train")) == 40
    assert sorted(full.images("dev")) == [f"val2017/{i:012d}.jpg" for i in (100, 101, 102)]
    assert sorted(full.images("test")) == [f"val2017/{i:012d}.jpg" for i in (103, 104, 105)]


def test_feature_cache_is_resumable_and_reports_bad_images(tiny_flickr, lite2, tmp_path):
    data = read_flickr8k(tiny_flickr)
    names = data.images()[:4]
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for n in names:
        (image_dir / n).write_bytes((data.image_dir / n).read_bytes())
    (image_dir / "broken.jpg").write_text("not an image")
    out = tmp_path / "cache"
    first = extract_features(lite2, image_dir, names + ["broken.jpg"], out, batch_size=2, num_workers=0)
    assert first["done"] == 4 and first["failed"] == 1
    assert "broken.jpg" in json.loads((out / "failed.json").read_text())
    reference = np.load(out / "features.npy")[:4].astype(np.float32)
    # simulate a run killed after the first two images: their rows stay, the rest is redone
    done = np.load(out / "done.npy", mmap_mode="r+")
    done[2:] = 0
    done.flush()
    second = extract_features(lite2, image_dir, names + ["broken.jpg"], out, batch_size=2, num_workers=0)
    assert second["processed_now"] == 2 and second["done"] == 4
    cache = FeatureCache(out)
    assert cache.available == set(names)
    got = cache.get(names).float().numpy()
    assert got.shape == (4, 49, 1280)
    np.testing.assert_allclose(got, reference, atol=1e-3)
    with pytest.raises(ValueError, match="different cache"):
        extract_features(lite2, image_dir, names[:2], out, num_workers=0)
