"""Self-critical training: the CIDEr-D reward, the loss, learning from it, resuming it exactly."""
import json
import random
from dataclasses import replace

import pytest
import torch

from aicrl.rewards import CiderD
from aicrl.self_critical import Samples, self_critical_loss
from aicrl.training import TrainConfig, train

from .test_training import SMALL as TRAINING_SMALL

SMALL = TRAINING_SMALL | {"early_stop": 99}


def test_cider_d_agrees_with_the_coco_caption_toolkit():
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    words = "a dog man woman runs in the grass red shirt ball park street water jumps over boy".split()
    refs = {str(i): [[rng.choice(words) for _ in range(rng.randint(2, 12))] for _ in range(5)] for i in range(60)}
    caps = {i: [rng.choice(words) for _ in range(rng.randint(1, 12))] for i in refs}
    caps["0"] = refs["0"][0]  # a caption equal to a reference
    _, theirs = Cider().compute_score({i: [" ".join(r) for r in v] for i, v in refs.items()},
                                      {i: [" ".join(c)] for i, c in caps.items()})
    ours = CiderD(refs).scores([caps[i] for i in refs], list(refs), refs)
    assert max(abs(a - b) for a, b in zip(theirs, ours)) < 1e-6
    assert ours[0] == max(ours)


def test_the_loss_pushes_up_the_captions_that_beat_their_siblings():
    logprobs = torch.full((4, 3), -1.0, requires_grad=True)
    samples = Samples(torch.ones(4, 3, dtype=torch.long), logprobs, torch.ones(4, 3, dtype=torch.bool))
    self_critical_loss(samples, torch.tensor([1.0, 0.0, 0.5, 0.5]), n=2).backward()
    # image 0: sample 0 beat sample 1 -> its log-probability goes up (negative gradient), 1's down;
    # image 1: a tie -> no push either way
    assert (logprobs.grad[0] < 0).all() and (logprobs.grad[1] > 0).all()
    assert torch.all(logprobs.grad[2:] == 0)


@pytest.fixture(scope="module")
def warm_start(tiny_flickr, tiny_cache, tmp_path_factory):
    """A briefly trained cross-entropy model: good enough to sample sense, with room to improve."""
    out = tmp_path_factory.mktemp("xe")
    train(TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), epochs=1, out=str(out), **SMALL))
    return out / "best"


def _rewards(out):
    return [json.loads(line)["train_reward"] for line in open(out / "log.jsonl")]


def test_self_critical_training_raises_the_reward(tiny_flickr, tiny_cache, warm_start, tmp_path):
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), init_from=str(warm_start),
                      objective="self-critical", scst_samples=5, scst_max_words=8, epochs=10,
                      out=str(tmp_path / "scst"), **SMALL)
    summary = train(cfg)
    rewards = _rewards(tmp_path / "scst")
    assert summary["epochs_run"] == 10
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.2, rewards


def test_resume_in_the_middle_of_self_critical_training_is_exact(tiny_flickr, tiny_cache, tiny_mirrored_cache,
                                                                warm_start, tmp_path):
    base = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), init_from=str(warm_start),
                       mirrored_features=str(tiny_mirrored_cache),  # which images are mirrored is resumed too
                       objective="self-critical", scst_samples=3, scst_max_words=6, **SMALL)
    train(replace(base, epochs=3, out=str(tmp_path / "straight")))
    train(replace(base, epochs=1, out=str(tmp_path / "killed")))  # "killed" after epoch 1
    train(replace(base, epochs=3, out=str(tmp_path / "killed")), resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3]
    assert [h["train_reward"] for h in a["history"]] == [h["train_reward"] for h in b["history"]]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_lr_decays_and_training_stops_when_dev_stops_improving(tiny_flickr, tiny_cache, warm_start, tmp_path):
    """A learning rate too small to change a caption: dev never improves after epoch 1, so the LR
    halves after every epoch (patience 0) and training stops after 2 epochs without improvement."""
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), init_from=str(warm_start),
                      out=str(tmp_path / "flat"), **(SMALL | {"lr": 1e-12, "lr_patience": 0, "early_stop": 2,
                                                              "epochs": 10}))
    summary = train(cfg)
    history = [json.loads(line) for line in open(tmp_path / "flat" / "log.jsonl")]
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 1
    assert [h["lr"] for h in history] == pytest.approx([1e-12, 5e-13, 2.5e-13])
    saved = json.loads((tmp_path / "flat" / "train_config.json").read_text())
    assert saved["lr"] == 1e-12 and saved["init_from"] == str(warm_start)


def test_self_critical_refuses_what_it_cannot_do(tiny_flickr, tiny_cache, tmp_path):
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), objective="self-critical",
                      scst_samples=1, out=str(tmp_path / "x"), **SMALL)
    with pytest.raises(ValueError, match="scst-samples"):
        train(cfg)
    with pytest.raises(ValueError, match="unknown objective"):
        train(replace(cfg, objective="reinforce"))
