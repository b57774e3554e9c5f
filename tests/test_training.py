import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from aicrl.data.features import FeatureCache
from aicrl.data.images import preprocess
from aicrl.decoding import GenerationOptions, NoRepeats, StyleGuidance, beam_search, greedy
from aicrl.model.torch_steps import TorchSteps
from aicrl.model.captioner import Captioner
from aicrl.training import TrainConfig, train

SMALL = dict(embed_dim=32, hidden_dim=48, attention_dim=32, style_dim=8, dropout=0.1, min_freq=1,
             batch_size=4, lr=5e-3, eval_beam=1, precision="fp32", show_progress=False, attention_penalty=0.0, lr_patience=99)


@pytest.fixture(scope="module")
def trained(tiny_flickr, tiny_cache, tmp_path_factory):
    """A tiny factual model trained for a few epochs on the shape photos."""
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), epochs=12, early_stop=99,
                      out=str(tmp_path_factory.mktemp("run")), **SMALL)
    summary = train(cfg)
    return cfg, summary


def _history(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_loss_falls_and_files_are_written(trained):
    cfg, summary = trained
    losses = [h["train_loss"] for h in _history(cfg.out)]
    assert losses[-1] < losses[0] * 0.6, losses
    for name in ("checkpoint.pt", "log.jsonl", "curves.png", "best/config.json", "best/model.safetensors",
                 "best/vocab.json", "best/metrics.json", "best/COMMAND.txt"):
        assert os.path.exists(os.path.join(cfg.out, name)), name
    assert summary["epochs_run"] == 12


def _load(folder, **options) -> Captioner:
    """A trained tiny model that decodes in fp32: bf16 rounding (which differs between AVX512 and AMX
    CPUs) must not decide what it says."""
    model = Captioner.from_pretrained(folder, **options)
    model.config.precision = "fp32"
    return model


def _last_epoch(out) -> Captioner:
    model = _load(os.path.join(out, "best"))
    model.decoder.load_state_dict(torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"])
    return model


def test_trained_model_names_the_colour(trained, tiny_cache):
    cfg, _ = trained
    model = _last_epoch(cfg.out)
    cache = FeatureCache(tiny_cache)
    names = [n for n in cache.names if "red" in n or "blue" in n]
    hyps = model.decode(cache.get(names).float(), beam_size=3)
    right = sum(("red" if "red" in n else "blue") in model.vocab.decode(h[0].tokens) for n, h in zip(names, hyps))
    assert right >= len(names) - 1


def test_save_load_round_trip_gives_identical_outputs(trained, tiny_cache, tmp_path):
    cfg, _ = trained
    model = _load(os.path.join(cfg.out, "best"))
    model.save_pretrained(tmp_path / "copy")
    again = _load(tmp_path / "copy")
    features = FeatureCache(tiny_cache).get(FeatureCache(tiny_cache).names[:4]).float()
    a = model.decode(features, beam_size=3, n_best=3)
    b = again.decode(features, beam_size=3, n_best=3)
    assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b]
    assert all(abs(h.logprob - g.logprob) < 1e-5 for x, y in zip(a, b) for h, g in zip(x, y))


def test_beam_of_one_equals_greedy_and_batching_changes_nothing(trained, tiny_cache):
    cfg, _ = trained
    model = _load(os.path.join(cfg.out, "best"))
    cache = FeatureCache(tiny_cache)
    features = cache.get(cache.names).float()
    v, dec = model.vocab, TorchSteps(model.decoder)
    options = GenerationOptions(v.start, v.end, max_length=20)
    greedy_out = greedy(dec, features, options)
    beam_one = beam_search(dec, features, options.replace(beam_size=1))
    assert [g.tokens for g in greedy_out] == [b[0].tokens for b in beam_one]
    assert all(abs(g.logprob - b[0].logprob) < 1e-4 for g, b in zip(greedy_out, beam_one))
    no_loops = options.replace(processors=[NoRepeats(model.content_words)])
    no_repeats = [greedy(dec, features, no_loops), [b[0] for b in beam_search(dec, features, no_loops.replace(beam_size=1))]]
    assert [g.tokens for g in no_repeats[0]] == [b.tokens for b in no_repeats[1]]
    three = options.replace(beam_size=3, n_best=3)
    batched = beam_search(dec, features, three)
    for i in range(len(features)):
        single = beam_search(dec, features[i:i + 1], three)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(single, batched[i]))
        assert [h.score for h in batched[i]] == sorted((h.score for h in batched[i]), reverse=True)
        best = batched[i][0]
        assert best.attention.shape == (len(best.tokens), 49)
        assert np.allclose(best.attention.sum(1), np.ones(len(best.tokens)), atol=1e-4)


def test_beam_search_stops_at_max_length_when_no_beam_ends(trained, tiny_cache):
    cfg, _ = trained
    model = _load(os.path.join(cfg.out, "best"))
    with torch.no_grad():
        model.decoder.out_words.bias[model.vocab.end] = -1e9  # <end> can never win
    features = FeatureCache(tiny_cache).get(FeatureCache(tiny_cache).names[:3]).float()
    for hyps in model.decode(features, beam_size=3, n_best=3, max_length=7):
        assert len(hyps) == 3 and all(len(h.tokens) == 7 for h in hyps)


def test_resume_after_interruption_continues_exactly(tiny_flickr, tiny_cache, tmp_path):
    base = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), early_stop=99, **SMALL)
    straight = train(replace(base, epochs=3, out=str(tmp_path / "straight")))
    train(replace(base, epochs=1, out=str(tmp_path / "killed")))  # "killed" after epoch 1
    resumed = train(replace(base, epochs=3, out=str(tmp_path / "killed")), resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert b["step"] == a["step"] and [h["epoch"] for h in b["history"]] == [1, 2, 3]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert straight["final_train_loss"] == resumed["final_train_loss"]


def test_style_labels_come_from_the_data(tiny_flickr, tiny_cache, tmp_path):
    """Any set of styles in the jsonl format trains one model that writes in each of them."""
    words = {"pirate": "arr", "poet": "verse", "robot": "beep"}
    from aicrl.data.datasets import read_flickr8k

    data = read_flickr8k(tiny_flickr)
    with open(tmp_path / "traits.jsonl", "w") as f:
        for split in ("train", "dev"):
            for image in data.images(split):
                kind = image.split("_")[1].split(".")[0].rstrip("0123456789")  # 1000_redsquare0.jpg -> redsquare
                colour = kind.replace("square", "").replace("circle", "")
                for style, word in words.items():
                    f.write(json.dumps({"image": image, "split": split, "style": style,
                                        "caption": f"{word} a {colour} thing {word}"}) + "\n")
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), style_file=str(tmp_path / "traits.jsonl"),
                      style_repeat=3, epochs=12, early_stop=99, out=str(tmp_path / "styled"),
                      **(SMALL | {"batch_size": 8, "lr": 1e-2}))
    train(cfg)
    model = _last_epoch(tmp_path / "styled")
    assert model.styles == ["factual", "pirate", "poet", "robot"]
    features = FeatureCache(tiny_cache).get(data.images("dev")).float()
    for style, word in words.items():
        texts = [model.vocab.decode(h[0].tokens) for h in model.decode(features, beam_size=3, style=style)]
        assert all(word in t.split() for t in texts), (style, texts)
    factual = [model.vocab.decode(h[0].tokens) for h in model.decode(features, beam_size=3)]
    assert not any(w in t.split() for t in factual for w in words.values()), factual
    # Style guidance keeps the style words, and its two decoders (styled, factual) stay in step.
    v, dec = model.vocab, TorchSteps(model.decoder)
    guided = GenerationOptions(v.start, v.end, 20, 1, styles=model.style_ids("poet", len(features)),
                               base_styles=model.style_ids("factual", len(features)), processors=[StyleGuidance(2.0)])
    guided_greedy = greedy(dec, features, guided)
    guided_beam = beam_search(dec, features, guided)
    assert [g.tokens for g in guided_greedy] == [b[0].tokens for b in guided_beam]
    assert [g.tokens for g in guided_greedy] == [_guided_by_hand(dec, f, guided) for f in features.numpy()]
    assert all("verse" in model.vocab.decode(h[0].tokens).split()
               for h in model.decode(features, beam_size=3, style="poet", guidance=2.0))
    # The gentler beams of the styled path, searched with the full ones (images repeated, a weight
    # per image), are the beams each weight gives alone.
    options = model.generation_options(len(features), 3, 3, "poet", guidance=2.0)
    full, half = model._guided_beams(dec, features.numpy(), options, None, "poet", 2.0, [0.5])
    for weight, together in ((2.0, full), (1.0, half)):
        alone = beam_search(dec, features.numpy(), model.generation_options(len(features), 3, 3, "poet", guidance=weight))
        assert [[h.tokens for h in b] for b in together] == [[h.tokens for h in b] for b in alone]
    with pytest.raises(ValueError, match="unknown style"):
        model.decode(features, style="sarcastic")


def _guided_by_hand(dec, features, options) -> list[int]:
    """Greedy guided decoding of one image with two separate decoder states (styled and base): what
    the search computes with both styles' rows in one state."""
    from aicrl.decoding import SpecialTokens, StepContext, next_word_logprobs

    specials, styled, base = SpecialTokens(options.start, options.end), options.styles[:1], options.base_styles[:1]
    state, base_state = dec.start(features[None], styled), dec.start(features[None], base)
    words: list[int] = []
    word = options.start
    for t in range(options.max_length):
        logits, state, _ = dec.step(np.array([word]), state)
        base_logits, base_state, _ = dec.step(np.array([word]), base_state)
        ctx = StepContext(t, np.array([words], dtype=np.int64).reshape(1, t), np.zeros(1, np.int64))
        ctx.base_logits = specials(base_logits, ctx)
        word = int(next_word_logprobs(logits, ctx, [specials, *options.processors]).argmax())
        if word == options.end:
            break
        words.append(word)
    return words


def test_repetition_bans_stop_loops_but_not_function_words():
    from aicrl.data.vocab import FUNCTION_WORDS, SPECIALS
    from aicrl.decoding import repetition_bans

    words = list(SPECIALS) + ["a", "blue", "shirt", "and", "red", "in", "bike", "shorts"]
    ids = {w: i for i, w in enumerate(words)}
    content = np.array([w not in FUNCTION_WORDS and w not in SPECIALS for w in words])
    rows = ["a blue shirt and blue", "in a red shirt in", "a blue shirt and blue shorts and"]
    history = np.array([[ids[w] for w in row.split()][:5] for row in rows[:2]])
    bans = repetition_bans(history, content)
    assert np.flatnonzero(bans[0]).tolist() == [ids["blue"], ids["shirt"]]  # "blue shirt" twice: no
    assert np.flatnonzero(bans[1]).tolist() == [ids["in"]]  # "in a" twice is fine, only not "in in"
    third = repetition_bans(np.array([[ids[w] for w in rows[2].split()]]), content)
    assert np.flatnonzero(third[0]).tolist() == [ids["blue"], ids["and"]]  # a third "blue", "and and": no
    assert not repetition_bans(history[:, :0], content).any()
    again = repetition_bans(np.array([[ids[w] for w in "in a red shirt in a".split()]]), content)
    assert np.flatnonzero(again[0]).tolist() == [ids["a"], ids["red"]]  # "in a red" twice: no
    # words said at most once (config.mention_once: the names of things): "a bike ... a bike" is a loop
    once = np.array([w == "bike" for w in words])
    rows = np.array([[ids[w] for w in "a bike and a".split()], [ids[w] for w in "a red shirt and".split()]])
    bans = repetition_bans(rows, content, once)
    assert bans[0, ids["bike"]] and not bans[1, ids["bike"]]
    assert (bans[:, :ids["bike"]] == repetition_bans(rows, content)[:, :ids["bike"]]).all()


def test_style_guidance_prefers_what_the_style_adds_among_plausible_words():
    from aicrl.decoding import SpecialTokens, StepContext, next_word_logprobs

    # ids 0-3 are <pad> <start> <end> <unk>; words 4-7
    styled = np.array([[0.0, 0.0, 0.0, 0.0, 3.0, 2.8, 0.0, -5.0]], dtype=np.float32)
    base = np.array([[0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, -20.0]], dtype=np.float32)
    specials = SpecialTokens(1, 2)
    ctx = StepContext(1, np.zeros((1, 1), np.int64), np.zeros(1, np.int64))
    ctx.base_logits = specials(base, ctx)

    def logprobs(*processors):
        return next_word_logprobs(styled, ctx, [specials, *processors])

    plain = logprobs()
    guided = logprobs(StyleGuidance(1.0))
    assert plain.argmax() == 4 and guided.argmax() == 5  # word 5 is what the style adds
    assert np.isinf(guided[0, 7])  # implausible for the style itself: never boosted into play
    assert np.isinf(guided[0, [0, 1, 3]]).all() and np.isclose(np.exp(guided).sum(), 1.0)
    assert np.array_equal(logprobs(StyleGuidance(0.0)), plain)
    assert styled[0, 0] == 0.0  # the caller's logits are not changed in place
    # one weight per image: the row of image 1 is guided as with 1.0 alone
    ctx.images = np.ones(1, np.int64)
    assert np.array_equal(logprobs(StyleGuidance(np.array([0.0, 1.0]))), guided)


def test_two_process_ddp_keeps_replicas_identical(tiny_flickr, tiny_cache, tmp_path):
    args = ["--data-dir", str(tiny_flickr), "--features", str(tiny_cache), "--epochs", "2", "--min-freq", "1",
            "--embed-dim", "16", "--hidden-dim", "16", "--attention-dim", "16", "--batch-size", "4",
            "--eval-beam", "1", "--precision", "fp32", "--device", "cpu", "--out", str(tmp_path / "ddp")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as probe:  # a free port, so a busy CI machine cannot collide with us
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={port}", "-m", "aicrl.cli", "train", *args],
                         capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2
    sums = summaries[0]["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert (tmp_path / "ddp" / "best" / "model.safetensors").exists()


def test_evaluate_command_scores_with_the_coco_toolkit(trained, tiny_flickr, tiny_cache, tmp_path, capsys):
    from aicrl.cli import main

    cfg, _ = trained
    out = tmp_path / "results.json"
    assert main(["evaluate", "--model", os.path.join(cfg.out, "best"), "--data-dir", str(tiny_flickr),
                 "--features", str(tiny_cache), "--split", "dev", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    scores = result["coco_caption"]
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(scores) and 0 <= scores["BLEU-1"] <= 1
    assert set(result["nltk_corpus_bleu"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
    assert result["images"] == 2 and result["backend"] == "torch"  # what ran it: this folder has no ONNX export

    # --save-to-model files each decoding under its own key in the model's metrics.json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(os.path.join(cfg.out, "best"), model)
    for beam in ("3", "1"):
        assert main(["evaluate", "--model", str(model), "--data-dir", str(tiny_flickr), "--features",
                     str(tiny_cache), "--split", "dev", "--beam-size", beam, "--save-to-model"]) == 0
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["dev_factual"]["beam_size"] == 3 and metrics["dev_factual_greedy"]["beam_size"] == 1


def test_metrics_are_right_on_known_cases():
    from aicrl.evaluation import coco_scores, sentence_bleu

    refs = {"a": ["a dog runs on the grass", "a brown dog running"], "b": ["a man rides a red bike"]}
    perfect = coco_scores({"a": "a dog runs on the grass", "b": "a man rides a red bike"}, refs,
                          metrics=("bleu", "cider"))
    assert perfect["BLEU-1"] > 0.99 and perfect["BLEU-4"] > 0.99
    wrong = coco_scores({"a": "blue sky", "b": "cat sleeping"}, refs, metrics=("bleu",))
    assert wrong["BLEU-1"] < 0.1
    bleu = sentence_bleu("a dog runs on the grass", ["a dog runs on the grass"])
    assert bleu["BLEU-4"] > 0.99 and bleu["BLEU"] == bleu["BLEU-4"]
    assert sentence_bleu("a cat", ["a dog runs on the grass"])["BLEU-4"] < 0.2
    with pytest.raises(ValueError):
        sentence_bleu("a cat", ["", "  "])


def test_style_classifier_and_content_overlap():
    from aicrl.evaluation import StyleClassifier, content_overlap

    train = {"factual": ["a dog runs on the grass", "a man rides a bike", "two children play in water",
                         "a woman walks down the street"],
             "humorous": ["a dog runs to escape the bath", "a man rides a bike to flee his wife",
                          "two children play in water like crazy fish", "a woman walks like a zombie"],
             "romantic": ["a dog runs to meet his lover", "a man rides a bike dreaming of his love",
                          "two children play in water enjoying the sweet summer", "a woman walks in love"]}
    captions = [c for s in train for c in train[s] for _ in range(3)]
    styles = [s for s in train for _ in train[s] for _ in range(3)]
    classifier = StyleClassifier().fit(captions, styles)
    assert classifier.predict(["a cat runs to meet his lover"]) == ["romantic"]
    assert classifier.accuracy(captions, styles)["overall"] == 1.0
    refs = {"x": ["a dog runs on the grass"], "y": ["a man rides a bike"]}
    assert content_overlap({"x": "a happy dog in love", "y": "the moon is bright"}, refs) == 0.5


def test_encoder_splits_before_its_last_stage(lite2):
    from aicrl.model.encoders import build_encoder

    images = torch.randn(2, 3, 224, 224)
    for encoder in (lite2, build_encoder("resnet50", pretrained=False)):
        with torch.inference_mode():
            whole, front = encoder(images), encoder.up_to_last_stage(images)
            assert torch.allclose(encoder.last_stage(front), whole)
            assert torch.allclose(encoder.last_stage(front.flatten(2).transpose(1, 2)), whole)  # as cached


@pytest.mark.parametrize("objective", ["cross-entropy", "self-critical"])
def test_finetuning_the_encoder_last_stage(objective, tiny_flickr, tiny_last_stage_cache, tmp_path, lite2):
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_last_stage_cache), finetune_encoder=True,
                      epochs=1, objective=objective, out=str(tmp_path / "ft"), **(SMALL | {"encoder_lr": 1e-2}))
    train(cfg)
    model = Captioner.from_pretrained(tmp_path / "ft" / "best", backend="torch")
    assert model.encoder_finetuned and model.config.feature_dim == 1280
    tuned, original = model.encoder.state_dict(), lite2.state_dict()
    last = f"trunk.net._blocks.{len(lite2.trunk.net._blocks) - 1}._project_conv.weight"
    assert not torch.allclose(tuned[last], original[last])  # the last stage learnt
    assert torch.equal(tuned["trunk.net._conv_stem.weight"], original["trunk.net._conv_stem.weight"])  # frozen
    bn = f"trunk.net._blocks.{len(lite2.trunk.net._blocks) - 1}._bn2.running_mean"
    assert torch.equal(tuned[bn], original[bn].half().float())  # BatchNorm statistics stay ImageNet's
    # evaluation on the same cache runs it through the fine-tuned stage, as the images would
    from aicrl.evaluation import features_source

    names = FeatureCache(tiny_last_stage_cache).names[:2]
    cached = features_source(model, tiny_flickr / "images", tiny_last_stage_cache)(names)
    direct = features_source(model, tiny_flickr / "images")(names)
    gap = (torch.as_tensor(cached).float() - torch.as_tensor(direct).float()).abs()
    assert gap.mean() < 0.05, gap.mean()  # the cache holds fp16, the model may run bf16: close, not equal
    if objective == "cross-entropy":  # the ONNX export carries the fine-tuned stage
        from aicrl.export import export_onnx

        export_onnx(tmp_path / "ft" / "best")
        onnx = Captioner.from_pretrained(tmp_path / "ft" / "best", backend="onnx")
        images = [tiny_flickr / "images" / n for n in names]
        exported = torch.as_tensor(onnx.encode(images)).float()
        with torch.inference_mode():
            untuned = lite2(torch.stack([preprocess(i) for i in images]))
        to_tuned = (exported - torch.as_tensor(direct).float()).abs().mean()  # direct: bf16 where native
        to_untuned = (exported - untuned).abs().mean()
        assert to_tuned < 0.01 and to_untuned > 10 * to_tuned, (to_tuned, to_untuned)


def test_finetuning_needs_a_last_stage_cache(tiny_flickr, tiny_cache, tmp_path):
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), finetune_encoder=True, epochs=1,
                      out=str(tmp_path / "ft"), **SMALL)
    with pytest.raises(ValueError, match="--last-stage-input"):
        train(cfg)


def test_mirrored_cache_holds_the_flipped_photos(tiny_flickr, tiny_cache, tiny_mirrored_cache, lite2):
    mirror, plain = FeatureCache(tiny_mirrored_cache), FeatureCache(tiny_cache)
    assert mirror.mirrored and not plain.mirrored and mirror.names == plain.names
    images = torch.stack([preprocess(tiny_flickr / "images" / n) for n in mirror.names[:3]])
    with torch.inference_mode():
        flipped = lite2(images.flip(-1))
    gap = lambda cache: (cache.get(cache.names[:3]).float() - flipped).abs().mean()  # noqa: E731
    assert gap(mirror) < 0.02 < gap(plain), (gap(mirror), gap(plain))  # (the caches hold fp16)


def test_training_sees_half_the_images_mirrored_with_left_and_right_swapped(tiny_flickr, tiny_cache,
                                                                             tiny_mirrored_cache, tmp_path):
    from aicrl.training import MIRRORED, CrossEntropy, SelfCritical, prepare

    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache),
                      mirrored_features=str(tiny_mirrored_cache), out=str(tmp_path / "m"), **SMALL)
    run = prepare(cfg, torch.device("cpu"))
    mirrored = run.mirrored(cfg.seed, 1)
    assert 0 < mirrored.sum() < len(mirrored)
    assert not np.array_equal(mirrored, run.mirrored(cfg.seed, 2))  # a new half each epoch
    rows = list(range(len(run.train_images)))
    feats = run.train_batch(rows, mirrored)
    names = np.array(run.train_images)
    assert torch.equal(feats[torch.from_numpy(mirrored)], FeatureCache(tiny_mirrored_cache).get(names[mirrored]))
    assert torch.equal(feats[torch.from_numpy(~mirrored)], FeatureCache(tiny_cache).get(names[~mirrored]))
    # the captions of a mirrored photo say right for left, in training targets and in rewards
    v = run.vocab
    swapped = v.mirror_ids()
    for a, b in (("left", "right"), ("right", "left")):
        assert swapped[v.stoi[a]] == v.stoi[b]
    assert swapped[v.stoi["red"]] == v.stoi["red"]
    objective = CrossEntropy(cfg, run, None)
    objective.batches(1)
    assert np.array_equal(objective.mirrored, mirrored)
    scst = SelfCritical(cfg, run, None)
    name = run.train_images[0]
    assert [["right" if w == "left" else w for w in r] for r in scst.refs[name]] == scst.refs[name + MIRRORED]


def test_mirrored_caches_are_for_training_only(tiny_flickr, tiny_cache, tiny_mirrored_cache, tmp_path):
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), mirrored_features=str(tiny_cache),
                      epochs=1, out=str(tmp_path / "x"), **SMALL)
    with pytest.raises(ValueError, match="--mirror"):
        train(cfg)
    from aicrl.evaluation import features_source

    model = Captioner.from_pretrained(train(replace(cfg, mirrored_features=""))["out"] + "/best", backend="torch")
    with pytest.raises(ValueError, match="mirrored"):
        features_source(model, tiny_flickr / "images", tiny_mirrored_cache)


def test_up_down_decoder_trains_saves_loads_and_exports(tiny_flickr, tiny_cache, tmp_path):
    """The second decoder type plugs into training (both objectives), the model folder, decoding and ONNX."""
    from aicrl.export import export_onnx
    from aicrl.model.decoder import UpDownDecoder

    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), decoder="up-down", epochs=8,
                      style_file=str(tiny_flickr / "styles.jsonl"), out=str(tmp_path / "xe"), **SMALL)
    train(cfg)
    first, last = _history(cfg.out)[0], _history(cfg.out)[-1]
    assert last["train_loss"] < first["train_loss"] - 0.3
    scst = replace(cfg, objective="self-critical", init_from=cfg.out + "/best", epochs=1, scst_samples=3,
                   out=str(tmp_path / "scst"))
    train(scst)
    model = _load(tmp_path / "scst" / "best", backend="torch")
    assert isinstance(model.decoder, UpDownDecoder) and model.config.decoder == "up-down"
    features = FeatureCache(tiny_cache).get(FeatureCache(tiny_cache).names[:4]).float()
    export_onnx(tmp_path / "scst" / "best")
    onnx = Captioner.from_pretrained(tmp_path / "scst" / "best", backend="onnx")
    for style in ("factual", "romantic"):
        a = model.decode(features, beam_size=3, n_best=2, style=style)
        b = onnx.decode(features.numpy(), beam_size=3, n_best=2, style=style)
        assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b]
        assert all(abs(h.logprob - g.logprob) < 1e-3 for x, y in zip(a, b) for h, g in zip(x, y))


def test_unknown_decoder_is_refused(tiny_flickr, tiny_cache, tmp_path):
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), decoder="transformer", epochs=1,
                      out=str(tmp_path / "x"), **SMALL)
    with pytest.raises(ValueError, match="up-down"):
        train(cfg)
