"""The command line on the shipped model: `aicrl caption` works with no flags after install."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    for line in lines:  # best first: claiming less that the encoder rules out, missing less, then by score
        keys = [(len(c["unsupported"]), len(c["missed"]), -c["score"]) for c in line["captions"]]
        assert len(keys) == 3 and keys == sorted(keys) and all(0 <= c["confidence"] <= 1 for c in line["captions"])
        assert all(c["text"] for c in line["captions"]) and line["timing_ms"]["encode"] > 0
        assert line["timing_ms"]["batch_images"] == 2  # the batch's time, divided by its images
    assert lines[1]["tags"][0]["label"] in {"Egyptian cat", "tabby", "tiger cat"}
    assert all(0.05 <= t["probability"] <= 1 for line in lines for t in line["tags"])


def test_caption_sees_each_photo_whole_as_the_web_app_does(shipped, monkeypatch, capsys):
    """The people detectors letterbox the photo itself: the CLI must not hand them a squeezed 224x224 copy,
    or `aicrl caption` and the API would caption the same photo differently."""
    from aicrl.model.people import PeopleDetector

    sizes = []
    real = PeopleDetector.__call__
    monkeypatch.setattr(PeopleDetector, "__call__", lambda self, images: sizes.extend(i.size for i in images)
                        or real(self, images))
    assert main(["caption", str(SAMPLES / "coffee.jpg"), "--json"]) == 0
    assert sizes == [(600, 400)]
    api = shipped.caption([(SAMPLES / "coffee.jpg").read_bytes()])[0].captions[0].text
    assert json.loads(capsys.readouterr().out)["captions"][0]["text"] == api


def test_n_best_wider_than_the_beam_widens_it(capsys):
    assert main(["caption", str(SAMPLES / "coffee.jpg"), "--json", "--n-best", "4", "--beam-size", "2"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)["captions"]) == 4 and "using --beam-size 4" in out.err


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


@pytest.mark.parametrize("command", ["caption", "serve", "index", "evaluate", "train", "search", "extract-features",
                                     "fit-people"])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and len(capsys.readouterr().out) > 300


ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "aicrl.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_bad_arguments_are_clear_errors_not_tracebacks(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photo here")
    coffee = str(SAMPLES / "coffee.jpg")
    cases = {  # run side by side: each one starts Python and torch
        "beam 0": (["caption", coffee, "--beam-size", "0"], "--beam-size: must be from 1 to 10"),
        "beam 11": (["index", str(SAMPLES), "--beam-size", "11"], "must be from 1 to 10"),
        "attention folder": (["caption", coffee, "--attention", "/no/such/dir/a.png"],
                             "the folder /no/such/dir does not exist"),
        "empty folder": (["caption", str(tmp_path / "empty")], "no images found in"),
    }
    running = {name: run_cli(*args) for name, (args, _) in cases.items()}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, (name, err)
        assert cases[name][1] in err and "Traceback" not in err, (name, err)
        assert out == ""


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {o}", h) for o, h in _options(sub))
        elif action.help != argparse.SUPPRESS:
            yield "/".join(action.option_strings) or action.dest, action.help


def test_every_option_has_real_help():
    from aicrl.cli import build_parser

    options = list(_options(build_parser()))
    assert len(options) > 60
    for option, text in options:
        words = (text or "").replace("%(default)s", "").split()
        flag = option.split()[-1].lstrip("-").replace("-", " ")
        assert len(words) >= 3 and (text or "").lower() != flag, (option, text)  # not a placeholder
        assert "default: None" not in text and text.count("(default") <= 1, (option, text)
