"""The command line on the shipped model: `aicrl caption` works with no flags after install."""
import json
import shutil

import pytest

from aicrl.cli import main
from aicrl.model.captioner import Captioner, default_model_dir

from .conftest import SAMPLES

PERSON_WORDS = {"man", "woman", "person", "girl", "boy", "lady", "guy", "people", "men", "women"}


@pytest.fixture(scope="module")
def shipped():
    return Captioner.from_pretrained()


def test_shipped_model_is_a_complete_model_folder():
    for name in ("config.json", "model.safetensors", "vocab.json", "metrics.json", "COMMAND.txt"):
        assert (default_model_dir() / name).is_file(), name
    assert (default_model_dir() / "model.safetensors").stat().st_size < 60 * 2**20


def test_shipped_model_sees_a_person_in_the_astronaut_portrait(shipped):
    result = shipped.caption([SAMPLES / "astronaut.jpg"], beam_size=3, n_best=3)[0]
    assert set(result.captions[0].text.split()) & PERSON_WORDS, result.captions[0].text
    assert len(result.captions) == 3


def test_shipped_model_writes_every_style(shipped):
    assert shipped.styles[0] == "factual" and {"humorous", "romantic"} <= set(shipped.styles)
    texts = {s: shipped.caption([SAMPLES / "astronaut.jpg"], style=s)[0].captions[0].text for s in shipped.styles}
    assert len(set(texts.values())) == len(texts), texts  # three different captions


def test_caption_json_lines(capsys):
    assert main(["caption", str(SAMPLES / "astronaut.jpg"), str(SAMPLES / "chelsea.jpg"), "--json",
                 "--n-best", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [str(SAMPLES / "astronaut.jpg"), str(SAMPLES / "chelsea.jpg")]
    for line in lines:
        scores = [c["score"] for c in line["captions"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(c["text"] for c in line["captions"]) and line["timing_ms"]["encode"] > 0


def test_caption_folder_skips_bad_files_and_saves_attention(tmp_path, capsys):
    shutil.copy(SAMPLES / "coffee.jpg", tmp_path / "coffee.jpg")
    (tmp_path / "broken.jpg").write_text("not a photo")
    attention = tmp_path / "attention.png"
    code = main(["caption", str(tmp_path), "--attention", str(attention), "--beam-size", "1"])
    out = capsys.readouterr()
    assert code == 1 and "broken.jpg" in out.err
    assert "coffee.jpg:" in out.out
    pictures = list(tmp_path.glob("attention-*.png"))
    assert [p.name for p in pictures] == ["attention-coffee.png"] and pictures[0].stat().st_size > 10_000


def test_unknown_style_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown style"):
        main(["caption", str(SAMPLES / "coffee.jpg"), "--style", "sarcastic"])


@pytest.mark.parametrize("command", ["caption", "serve", "index", "evaluate", "train", "search", "extract-features"])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and len(capsys.readouterr().out) > 300
