"""Devices and precision (aicrl/devices.py), and the tiny pipeline on every device this machine has:
CUDA and MPS cases skip cleanly where there is no such device."""
import json
import math
import os

import numpy as np
import pytest
import torch

from aicrl.cli import main
from aicrl.data.features import FeatureCache, FeatureRows, extract_features
from aicrl.devices import (autocast, autocast_dtype, distributed_backend, grad_scaler, mps_available,
                           resolve_device)
from aicrl.model.captioner import Captioner
from aicrl.training import TrainConfig, train

from .conftest import SAMPLES
from .test_training import SMALL

HAS_CUDA = torch.cuda.is_available()
EVERY_DEVICE = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")),
    pytest.param("mps", marks=pytest.mark.skipif(not mps_available(), reason="no Apple MPS device here")),
]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if HAS_CUDA else "mps" if mps_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
    if not mps_available():
        with pytest.raises(RuntimeError, match="MPS"):
            resolve_device("mps")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_torchrun_process_gets_its_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    device = resolve_device("cuda")
    assert device == torch.device("cuda", torch.cuda.device_count() - 1)
    assert torch.cuda.current_device() == device.index and distributed_backend(device) == "nccl"


def test_precision_per_device_type():
    assert autocast_dtype("fp32", "cpu") is None and autocast_dtype("bf16", "cuda") is torch.bfloat16
    assert autocast_dtype("fp16", "cpu") is torch.float16
    native = any(k in torch.backends.cpu.get_cpu_capability().lower() for k in ("avx512", "amx"))
    assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if native else None)
    assert autocast_dtype("auto", "mps") is None  # fp32 where bf16 is not native
    if HAS_CUDA:
        major = torch.cuda.get_device_capability()[0]
        assert autocast_dtype("auto", "cuda") is (torch.bfloat16 if major >= 8 else torch.float16)
        assert grad_scaler("cuda", torch.float16).is_enabled()
    with pytest.raises(ValueError):
        autocast_dtype("int8", "cpu")
    # loss scaling only where fp16 gradients would underflow; bf16/fp32 need none
    assert not grad_scaler("cpu", torch.bfloat16).is_enabled() and not grad_scaler("cpu", None).is_enabled()
    assert distributed_backend(torch.device("cpu")) == "gloo"
    x = torch.randn(4, 8)
    with autocast("cpu", torch.bfloat16):
        assert (x @ x.T).dtype is torch.bfloat16
    with autocast("cpu", None):
        assert (x @ x.T).dtype is torch.float32


def test_feature_rows_read_per_batch_match_the_cache(tiny_cache):
    cache = FeatureCache(tiny_cache)
    names = cache.names[::-1]  # another order than the file's
    rows = [3, 0, 3, len(names) - 1]  # repeats and out of order, as a shuffled batch is
    expected = cache.get([names[r] for r in rows])
    per_batch = FeatureRows(cache, names)
    assert per_batch.resident is None  # nothing copied up front
    assert torch.equal(per_batch.batch(rows), expected)
    assert torch.equal(FeatureRows(cache, names, in_memory=True).batch(rows), expected)
    per_batch._fd = None  # the memory-map fallback (systems without preadv)
    assert torch.equal(per_batch.batch(rows), expected)


def test_reading_per_batch_trains_exactly_like_in_memory(tiny_flickr, tiny_cache, tmp_path):
    base = dict(data_dir=str(tiny_flickr), features=str(tiny_cache), epochs=1, early_stop=99, device="cpu", **SMALL)
    train(TrainConfig(out=str(tmp_path / "file"), **base))
    train(TrainConfig(out=str(tmp_path / "ram"), features_in_memory=True, **base))
    a = torch.load(tmp_path / "file" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ram" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_steps_stops_training(tiny_flickr, tiny_cache, tmp_path):
    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), epochs=5, max_steps=3,
                      out=str(tmp_path / "steps"), device="cpu", **SMALL)
    summary = train(cfg)
    log = [json.loads(line) for line in open(tmp_path / "steps" / "log.jsonl")]
    assert summary["epochs_run"] == 1 and log[-1]["step"] == 3 and log[-1]["train_cpu_seconds"] > 0


@pytest.mark.parametrize("device", EVERY_DEVICE)
def test_extract_train_evaluate_caption_on(device, tiny_flickr, tiny_cache, lite2, tmp_path, capsys):
    """The same commands on every device; the model folder it writes loads and agrees on the CPU."""
    cache = FeatureCache(tiny_cache)
    names = cache.names[:4]
    extract_features(lite2, tiny_flickr / "images", names, tmp_path / "cache", batch_size=2, num_workers=0,
                     device=device)
    got, want = FeatureCache(tmp_path / "cache").get(names).float(), cache.get(names).float()
    assert torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min() > 0.98
    lite2.to("cpu")  # the session's shared encoder goes back where the other tests expect it

    out = tmp_path / "run"
    summary = train(TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), epochs=1, early_stop=99,
                                out=str(out), **(SMALL | {"precision": "auto", "device": device})))
    assert math.isfinite(summary["final_train_loss"])
    best = out / "best"
    assert main(["evaluate", "--model", str(best), "--data-dir", str(tiny_flickr), "--features", str(tiny_cache),
                 "--split", "dev", "--beam-size", "2", "--device", device, "--out", str(tmp_path / "dev.json")]) == 0
    assert json.loads((tmp_path / "dev.json").read_text())["images"] == 2
    capsys.readouterr()
    assert main(["caption", str(SAMPLES / "coffee.jpg"), "--model", str(best), "--device", device, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["captions"][0]["text"]

    on_device = Captioner.from_pretrained(best).to(device)
    on_cpu = Captioner.from_pretrained(best)  # device-independent folder
    for model in (on_device, on_cpu):
        model.config.precision = "fp32"
    assert next(on_device.decoder.parameters()).device.type == device
    features = cache.get(names).float()
    a = on_device.decode(features, beam_size=3)
    b = on_cpu.decode(features, beam_size=3)
    assert all(abs(x[0].logprob - y[0].logprob) < 1e-2 for x, y in zip(a, b))
    assert isinstance(a[0][0].attention, np.ndarray)  # results come back to the CPU, as numpy
    result = on_device.caption([SAMPLES / "coffee.jpg"], beam_size=2)[0]
    assert len(result.captions[0].attention[0]) == 49


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_fp16_training_with_a_grad_scaler(tiny_flickr, tiny_cache, tmp_path):
    summary = train(TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), epochs=2, early_stop=99,
                                out=str(tmp_path / "fp16"), **(SMALL | {"precision": "fp16", "device": "cuda"})))
    assert math.isfinite(summary["final_train_loss"])
    assert torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)["scaler"]["scale"] > 0


def test_cache_read_per_batch_does_not_grow_with_the_cache(tmp_path):
    """A 4,000-image cache (500 MB) read batch by batch: the process holds one batch, not the file."""
    import resource

    n, names = 4000, [f"{i}.jpg" for i in range(4000)]
    feats = np.lib.format.open_memmap(tmp_path / "features.npy", "w+", np.float16, (n, 49, 1280))
    feats[:] = 1.0
    feats.flush()
    del feats
    np.save(tmp_path / "done.npy", np.ones(n, np.uint8))
    (tmp_path / "index.json").write_text(json.dumps({"encoder": "efficientnet-lite2", "regions": 49, "dim": 1280,
                                                     "images": names}))
    rows = FeatureRows(FeatureCache(tmp_path), names)
    before = int(open("/proc/self/statm").read().split()[1]) if os.path.exists("/proc/self/statm") else None
    total = sum(float(rows.batch(list(range(i, min(i + 64, n))))[:, 0, 0].sum()) for i in range(0, n, 64))
    assert total == n
    if before is not None:  # resident pages now vs before: one batch (8 MB), not 500 MB
        grown = (int(open("/proc/self/statm").read().split()[1]) - before) * resource.getpagesize()
        assert grown < 100 * 2**20, grown
