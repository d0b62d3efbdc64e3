"""Probing (maescale.probe, tools/probe.py): kNN and linear probe on features with known answers,
MAE's eval transform against torchvision's, labelled-shard splits shared over processes, the
encoder features, the in-loop evaluator's hygiene (RNG, modes, history, TensorBoard), the eval
config section, and clear errors for bad input. Multi-process and in-loop runs are in
tests/e2e/test_probe.py."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import torch.nn.functional as F
from PIL import Image

from maescale.config import Config, ConfigError, config_from_dict, load_config
from maescale.data import DataError
from maescale.data.demo import make_demo_data
from maescale.metrics import TensorBoardLogger
from maescale.models import create_model
from maescale.probe import (LARS, CenterCropTransform, LinearProbeConfig, encoder_features, extract_features,
                            knn_accuracy, knn_rank_classes, make_splits, train_linear_probe)
from maescale.probe.data import Split, in_holdout, iter_share, resize_size
from maescale.probe.evaluator import Evaluator, comparison_line, read_history
from maescale.probe.knn import accuracy
from maescale.probe.linear import lr_at, make_classifier
from tests.helpers import tb_scalars

REPO = Path(__file__).resolve().parents[1]
TINY = "mae_vit_tiny_patch4"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe_cli = _load_tool("probe").main


def clusters(n: int, classes: int, dim: int, spread: float, seed: int, offset: float = 0.0):
    """Gaussian clusters around random unit-norm means (scaled by 3), plus a constant offset."""
    g = torch.Generator().manual_seed(1234)  # the same means for every call
    means = torch.randn(classes, dim, generator=g)
    means = 3 * means / means.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = means[y] + spread * torch.randn(n, dim, generator=g) + offset
    return x, y


# --------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------


def test_knn_separable_clusters_are_classified_perfectly():
    tx, ty = clusters(1000, 10, 32, spread=0.3, seed=0)
    vx, vy = clusters(400, 10, 32, spread=0.3, seed=1)
    acc = knn_accuracy(tx, ty, vx, vy)
    assert acc.top1 == 1.0 and acc.top5 == 1.0 and acc.n == 400
    assert set(acc.per_class) == set(range(10)) and all(v == 1.0 for v in acc.per_class.values())


def test_knn_random_labels_score_chance():
    tx, _ = clusters(4000, 10, 32, spread=0.3, seed=0)
    vx, _ = clusters(4000, 10, 32, spread=0.3, seed=1)
    g = torch.Generator().manual_seed(5)
    ty, vy = torch.randint(0, 10, (4000,), generator=g), torch.randint(0, 10, (4000,), generator=g)
    acc = knn_accuracy(tx, ty, vx, vy, num_classes=10)
    # 4000 Bernoulli(0.1) draws: standard deviation 0.005; 0.1 +- 0.025 is 5 sigma
    assert abs(acc.top1 - 0.1) < 0.025, acc.top1
    assert abs(acc.top5 - 0.5) < 0.04, acc.top5


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    # Query along x. One class-1 neighbour at cosine 1.0, two class-0 neighbours at cosine 0.8:
    # a plain majority says 0; DINO's weights exp(s / 0.07) say 1 (e^14.3 > 2 e^11.4).
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([1, 0, 0])
    q = torch.tensor([[2.0, 0.0]])  # not unit-norm: features are L2-normalised first
    assert knn_rank_classes(bank, labels, q, 2, k=3, temperature=0.07)[0, 0] == 1
    # with a high temperature the weights flatten and the majority wins
    assert knn_rank_classes(bank, labels, q, 2, k=3, temperature=100.0)[0, 0] == 0
    # k caps at the bank size; k=1 takes the nearest
    assert knn_rank_classes(bank, labels, q, 2, k=1)[0, 0] == 1
    assert knn_rank_classes(bank, labels, q, 2, k=50).shape == (1, 2)


def test_accuracy_top5_and_per_class():
    ranked = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 0, 5], [5, 4, 3, 2, 1, 0], [2, 0, 1, 3, 4, 5]])
    labels = torch.tensor([0, 0, 0, 2])
    acc = accuracy(ranked, labels)
    assert acc.top1 == 0.5  # rows 0 and 3
    assert acc.top5 == 0.75  # and row 1 (fifth place); row 2 has the label sixth
    assert acc.per_class == {0: pytest.approx(1 / 3), 2: 1.0}
    few = accuracy(torch.tensor([[1, 0], [0, 1]]), torch.tensor([0, 0]))
    assert few.top5_k == 2 and few.top5 == 1.0 and "top5_is_top" in few.to_json()


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------


# LARS moves each weight matrix by about lr x 0.001 x |w| per step (x10 with momentum): the
# paper's 7000 steps at lr 6.4 are plenty, 990 steps at lr 0.1 are not (measured: 67% here), so
# the LARS case runs with base lr 1.0. SGD: the Table 10 note's alternative.
@pytest.mark.parametrize("optimizer,batch,epochs,blr", [("lars", 256, 90, 1.0), ("sgd", 256, 30, 0.1)])
def test_linear_probe_separates_synthetic_features(optimizer, batch, epochs, blr):
    # Clusters far from the origin and badly scaled: the BatchNorm without affine must take care
    # of the offset and the scale (without it, this lr diverges).
    tx, ty = clusters(3000, 10, 64, spread=0.6, seed=0, offset=5.0)
    vx, vy = clusters(1000, 10, 64, spread=0.6, seed=1, offset=5.0)
    tx, vx = 40 * tx, 40 * vx
    cfg = LinearProbeConfig(optimizer=optimizer, batch_size=batch, epochs=epochs, blr=blr,
                            warmup_epochs=min(10, epochs / 3))
    result = train_linear_probe(tx, ty, vx, vy, 10, cfg)
    assert result.val.top1 > 0.95, result.val.top1
    assert result.steps == epochs * (3000 // batch) and result.lr == pytest.approx(blr * batch / 256)
    again = train_linear_probe(tx, ty, vx, vy, 10, cfg)
    assert again.val.top1 == result.val.top1 and again.final_loss == result.final_loss  # seeded


def test_linear_probe_random_labels_stay_near_chance():
    tx, _ = clusters(2000, 10, 16, spread=0.5, seed=0)
    vx, _ = clusters(2000, 10, 16, spread=0.5, seed=1)
    g = torch.Generator().manual_seed(3)
    ty, vy = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    result = train_linear_probe(tx, ty, vx, vy, 10, LinearProbeConfig(optimizer="sgd", batch_size=256, epochs=20,
                                                                      warmup_epochs=2))
    assert abs(result.val.top1 - 0.1) < 0.04, result.val.top1


def test_classifier_is_batchnorm_without_affine_then_linear():
    head = make_classifier(48, 7, torch.Generator().manual_seed(0))
    bn, fc = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert isinstance(fc, torch.nn.Linear) and fc.weight.shape == (7, 48)
    assert fc.weight.abs().max() <= 0.02 and 0.005 < fc.weight.std() < 0.012 and fc.bias.abs().max() == 0


def test_lars_step_matches_the_formula():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([0.5, -0.5])
    opt.step()
    update = torch.tensor([[0.0, 1.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])  # g + wd w = [0.3, 1.4]
    trust = 0.001 * 5.0 / math.sqrt(0.3**2 + 1.4**2)
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * trust * update)
    assert torch.allclose(b.detach(), torch.tensor([1.0, 2.0]) - 0.5 * torch.tensor([0.5, -0.5]))  # 1-D: plain
    w.grad, b.grad = torch.zeros(1, 2), torch.zeros(2)
    before = b.detach().clone()
    opt.step()  # momentum carries the last update on
    assert torch.allclose(b.detach(), before - 0.5 * 0.9 * torch.tensor([0.5, -0.5]))


def test_lr_schedule_warmup_then_cosine():
    cfg = LinearProbeConfig(epochs=90, warmup_epochs=10, min_lr=0.0)
    assert lr_at(0, 1.0, cfg) == 0 and lr_at(5, 1.0, cfg) == pytest.approx(0.5)
    assert lr_at(10, 1.0, cfg) == pytest.approx(1.0) and lr_at(50, 1.0, cfg) == pytest.approx(0.5)
    assert lr_at(90, 1.0, cfg) == pytest.approx(0.0, abs=1e-12)


def test_linear_probe_rejects_bad_settings():
    x, y = clusters(20, 2, 4, 0.1, 0)
    with pytest.raises(ValueError, match="optimizer must be"):
        train_linear_probe(x, y, x, y, 2, LinearProbeConfig(optimizer="adam"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup epochs"):
        train_linear_probe(x, y, x, y, 2, LinearProbeConfig(epochs=5, warmup_epochs=10))


# --------------------------------------------------------------------------------------------
# Eval transform and labelled shards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,img_size", [((500, 375), 224), ((375, 500), 224), ((96, 96), 64), ((40, 61), 32)])
def test_center_crop_transform_equals_torchvision(size, img_size):
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    ours = CenterCropTransform(img_size)(buf.getvalue())
    ref = T.Compose([T.Resize(resize_size(img_size), interpolation=T.InterpolationMode.BICUBIC),
                     T.CenterCrop(img_size), T.PILToTensor()])(Image.fromarray(arr))
    assert ours.dtype == torch.uint8 and ours.shape == (3, img_size, img_size)
    assert torch.equal(ours, ref)
    assert resize_size(224) == 256  # the MAE/DeiT 224/256 eval


def write_labelled(path: Path, n: int, *, start: int = 0, label=lambda i: i % 3, size: int = 40,
                   with_label: bool = True, bad: set[int] = frozenset()) -> Path:
    """A tar shard of PNGs (key ``img{i}``) with ``.cls`` labels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            rng = np.random.default_rng(i)
            members = {}
            if i in bad:
                members["png"] = b"not an image"
            else:
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
                members["png"] = buf.getvalue()
            if with_label:
                members["cls"] = str(label(i)).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"img{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_seeded_holdout_split_is_disjoint_deterministic_and_near_its_fraction():
    keys = [f"img{i:05d}" for i in range(5000)]
    held = {k for k in keys if in_holdout(7, k, 0.2)}
    assert abs(len(held) / 5000 - 0.2) < 0.03
    assert held == {k for k in keys if in_holdout(7, k, 0.2)}
    assert held != {k for k in keys if in_holdout(8, k, 0.2)}
    train = Split("train", ("a.tar",), "t", holdout_seed=7, holdout_fraction=0.2, holdout_side="out")
    val = Split("val", ("a.tar",), "t", holdout_seed=7, holdout_fraction=0.2, holdout_side="in")
    assert all(train.selects(k) != val.selects(k) for k in keys)


def test_shares_of_a_split_partition_it_for_any_number_of_processes(tmp_path):
    for s in range(3):
        write_labelled(tmp_path / f"s{s}.tar", 7, start=7 * s)
    pattern = str(tmp_path / "s*.tar")
    firsts = {}
    for max_samples in (None, 5):
        train, val = make_splits(pattern, None, train_key="--train-shards", val_key="--val-shards",
                                 val_fraction=0.3, split_seed=1, max_train_samples=max_samples)
        one = [pos for pos, _, _ in iter_share(train, 0, 1)]
        for world in (2, 3, 4):
            parts = [[pos for pos, _, _ in iter_share(train, r, world)] for r in range(world)]
            assert sorted(sum(parts, [])) == one  # every sample once, whatever the process count
        held = [pos for pos, _, _ in iter_share(val, 0, 1)]
        assert not set(held) & set(one) and len(held) + len(one) == (21 if max_samples is None else len(held) + 5)
        firsts[max_samples] = one
    assert firsts[5] == firsts[None][:5]  # the limit takes the first samples in shard order
    assert firsts[None][-1] >> 32 == 2  # positions: shard index in the high bits


def test_extract_features_real_shards_order_labels_and_bad_images(tmp_path):
    write_labelled(tmp_path / "a.tar", 9, bad={4})
    write_labelled(tmp_path / "b.tar", 6, start=9)
    split = make_splits(str(tmp_path / "*.tar"), str(tmp_path / "b.tar"), train_key="t", val_key="v")[0]
    torch.manual_seed(0)
    model = create_model(TINY, img_size=32).eval()
    feats = extract_features(model, split, CenterCropTransform(32), device=torch.device("cpu"),
                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=4, workers=2)
    assert len(feats) == 14 and feats.bad == 1
    assert feats.labels.tolist() == [i % 3 for i in range(15) if i != 4]
    assert feats.positions.tolist() == sorted(feats.positions.tolist())
    assert feats.feats["cls"].shape == (14, 64) and feats.feats["avgpool"].dtype == torch.float32
    # one image by itself gives the same features as in a batch of four
    alone = extract_features(model, split, CenterCropTransform(32), device=torch.device("cpu"),
                             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size=1)
    assert torch.allclose(alone.feats["cls"], feats.feats["cls"], atol=1e-5)


def test_encoder_features_are_the_mae_linprobe_features():
    torch.manual_seed(0)
    model = create_model(TINY, img_size=32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x = torch.randn(3, 3, 32, 32)
        got = encoder_features(model, x)
        tokens = model.patch_embed(x) + model.pos_embed[:, 1:]
        cls = model.cls_token + model.pos_embed[:, :1]
        h = torch.cat([cls.expand(3, -1, -1), tokens], dim=1)
        for blk in model.blocks:
            h = blk(h)
    assert torch.allclose(got["cls"], model.norm(h)[:, 0], atol=1e-6)
    assert torch.allclose(got["cls"], model.forward_features(x)[:, 0], atol=1e-6)
    expected = F.layer_norm(h[:, 1:].mean(dim=1), (64,), eps=1e-6)  # pooled before the norm, no affine
    assert torch.allclose(got["avgpool"], expected, atol=1e-5)
    assert not torch.allclose(got["avgpool"], model.norm(h)[:, 1:].mean(dim=1), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_shards_without_labels_name_the_shard_and_the_flag(tmp_path):
    shard = write_labelled(tmp_path / "nolabel.tar", 4, with_label=False)
    split = make_splits(str(shard), str(shard), train_key="--train-shards", val_key="--val-shards")[0]
    model = create_model(TINY, img_size=32).eval()
    with pytest.raises(DataError) as err:
        extract_features(model, split, CenterCropTransform(32), device=torch.device("cpu"), mean=(0.5,) * 3,
                         std=(0.25,) * 3, batch_size=2)
    msg = str(err.value)
    assert "--train-shards" in msg and str(shard) in msg and "img00000" in msg and ".cls" in msg


def test_empty_split_names_the_flag(tmp_path):
    good = write_labelled(tmp_path / "good.tar", 4)
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    broken = write_labelled(tmp_path / "broken.tar", 3, bad={0, 1, 2})
    model = create_model(TINY, img_size=32).eval()
    kw = dict(device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=2)
    for shards, hint in ((empty, "gave no labelled image"), (broken, "could not be decoded")):
        val = make_splits(str(good), str(shards), train_key="--train-shards", val_key="--val-shards")[1]
        with pytest.raises(DataError) as err:
            extract_features(model, val, CenterCropTransform(32), **kw)
        assert "--val-shards" in str(err.value) and "val split is empty" in str(err.value) and hint in str(err.value)
    with pytest.raises(DataError, match="eval.val_shards: the pattern .* matches no files"):
        make_splits(str(good), str(tmp_path / "nothing-*.tar"), train_key="eval.train_shards",
                    val_key="eval.val_shards")


def test_bad_label_text_is_reported(tmp_path):
    shard = write_labelled(tmp_path / "s.tar", 2, label=lambda i: "cat")
    split = make_splits(str(shard), str(shard), train_key="t", val_key="v")[0]
    with pytest.raises(DataError, match="'cat' is not an integer class index"):
        extract_features(create_model(TINY, img_size=32).eval(), split, CenterCropTransform(32),
                         device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=2)


# --------------------------------------------------------------------------------------------
# tools/probe.py on files (real run directories and torchrun: tests/e2e/test_probe.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, num_images=60, size=40, seed=0, maxcount=30, heldout=30)
    return root


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mae") / "mae_tiny.pth"
    torch.save({"model": create_model(TINY, img_size=32).state_dict()}, path)
    return path


def test_probe_cli_writes_table_and_json(demo_shards, mae_file, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = probe_cli([str(mae_file), "--train-shards", str(demo_shards / "shards" / "*.tar"), "--val-shards",
                    str(demo_shards / "heldout" / "*.tar"), "--optimizer", "sgd", "--batch-size", "32",
                    "--epochs", "20", "--warmup-epochs", "2", "--per-class", "--workers", "0", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["format"] == "maescale-probe/1" and report["processes"] == 1 and report["precision"] == "float32"
    assert report["data"]["train"]["samples"] == 60 and report["data"]["val"]["samples"] == 30
    assert report["data"]["classes"] == 6 and report["data"]["class_names"][0] == "field"
    for method in ("knn", "linear"):
        for kind in ("cls", "avgpool"):
            r = report[method][kind]
            assert 0 <= r["top1"] <= r["top5"] <= 1 and set(r["per_class_top1"]) == {
                "field", "gradient", "stripes", "blobs", "shapes", "rings"}
            assert f"{100 * r['top1']:.2f}" in printed
    assert report["knn"]["k"] == 20 and report["knn"]["temperature"] == 0.07
    assert report["linear"]["config"]["optimizer"] == "sgd"
    assert "resize shorter side to 36" in report["data"]["transform"]
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left


def test_probe_cli_seed_split_and_knn_only(demo_shards, mae_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = probe_cli([str(mae_file), "--train-shards", str(demo_shards / "shards" / "*.tar"), "--val-fraction", "0.25",
                    "--split-seed", "3", "--methods", "knn", "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert "linear" not in report
    n_train, n_val = report["data"]["train"]["samples"], report["data"]["val"]["samples"]
    assert n_train + n_val == 60 and 5 <= n_val <= 25


def test_probe_cli_checkpoint_of_another_preset_names_the_file(demo_shards, mae_file, capsys):
    rc = probe_cli([str(mae_file), "--model", "mae_vit_mini_patch8", "--train-shards",
                    str(demo_shards / "shards" / "*.tar"), "--methods", "knn"])
    err = capsys.readouterr().err
    assert rc == 2 and str(mae_file) in err and "mae_vit_mini_patch8" in err and "do not match" in err


def test_probe_cli_bad_inputs(demo_shards, mae_file, tmp_path, capsys):
    nolabel = write_labelled(tmp_path / "nolabel" / "s.tar", 4, with_label=False)
    rc = probe_cli([str(mae_file), "--train-shards", str(nolabel), "--methods", "knn"])
    err = capsys.readouterr().err
    assert rc == 2 and "--train-shards" in err and str(nolabel) in err and "without a .cls label" in err
    rc = probe_cli([str(mae_file), "--train-shards", str(tmp_path / "missing-*.tar")])
    err = capsys.readouterr().err
    assert rc == 2 and "--train-shards" in err and "matches no files" in err
    rc = probe_cli([str(tmp_path / "nope.pth"), "--train-shards", str(nolabel)])
    assert rc == 2 and "nope.pth: no such file" in capsys.readouterr().err
    rc = probe_cli(["--history", str(tmp_path)])
    assert rc == 2 and "no in-loop kNN history" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The in-loop evaluator and its config section
# --------------------------------------------------------------------------------------------


def eval_config(demo_shards: Path, out: Path, **eval_keys) -> Config:
    overrides = {"output_dir": str(out), "eval.every_steps": 5,
                 "eval.train_shards": str(demo_shards / "shards" / "*.tar"),
                 "eval.val_shards": str(demo_shards / "heldout" / "*.tar"), **eval_keys}
    return load_config(REPO / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])


def test_evaluator_restores_rng_and_modes_and_logs(demo_shards, tmp_path):
    cfg = eval_config(demo_shards, tmp_path / "run", **{"eval.batch_size": 16})
    tb = TensorBoardLogger(tmp_path / "run", enabled=True)
    ev = Evaluator(cfg, rank=0, world=1, device=torch.device("cpu"), group=None, tb=tb, run_dir=tmp_path / "run",
                   total_steps=12)
    assert [s for s in range(13) if ev.due(s)] == [0, 5, 10, 12]
    torch.manual_seed(0)
    model = create_model(TINY, img_size=32).train()
    model.blocks[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    m0 = ev.maybe_run(0, model)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert [m.training for m in model.modules()] == modes
    assert ev.maybe_run(3, model) is None
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    m12 = ev.maybe_run(12, model)
    tb.close()
    for m in (m0, m12):
        assert 0 <= m["eval/knn_top1"] <= m["eval/knn_top5"] <= 1 and m["eval/knn_top1"] == m["eval/knn_cls_top1"]
    scalars = tb_scalars(tmp_path / "run")
    assert [s for s, _ in scalars["eval/knn_top1"]] == [0, 12] and "eval/knn_avgpool_top5" in scalars
    history = read_history(tmp_path / "run")
    assert [h["step"] for h in history["history"]] == [0, 12] and history["history"][0]["val_samples"] == 30
    line = comparison_line(history)
    assert line.startswith(f"kNN top-1 on 30 held-out images: trained {m12['eval/knn_top1']:.2f}, "
                           f"at init {m0['eval/knn_top1']:.2f}")
    # a resumed run that re-evaluates an earlier step replaces the entries from there on
    ev2 = Evaluator(cfg, rank=0, world=1, device=torch.device("cpu"), group=None, tb=TensorBoardLogger(tmp_path, False),
                    run_dir=tmp_path / "run", total_steps=12)
    ev2.maybe_run(10, model)
    assert [h["step"] for h in read_history(tmp_path / "run")["history"]] == [0, 10]


def test_evaluator_off_by_default_and_in_shipped_model_configs():
    for name in ("base", "vit_base", "vit_large", "vit_huge", "tiny"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.eval.every_steps == 0, name
        assert not Evaluator(cfg, rank=0, world=1, device=torch.device("cpu"), group=None, tb=None, run_dir="x",
                             total_steps=10).due(0)
    for name in ("vit_base", "vit_large", "vit_huge"):  # the commented example is a valid section
        text = (REPO / "configs" / f"{name}.yaml").read_text()
        example = text[text.index("# eval:"):].splitlines()
        section = yaml.safe_load("\n".join(line[2:] for line in example))
        raw = {k: v for k, v in yaml.safe_load(text).items() if k != "base"}
        cfg = config_from_dict({**raw, **section, "train": {"max_steps": 1}})
        assert cfg.eval.every_steps == 5000 and "val" in cfg.eval.val_shards, name
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.eval.every_steps > 0 and "heldout" in demo.eval.val_shards


@pytest.mark.parametrize("override,key", [
    ("eval.every_steps=10", "eval.train_shards"),
    ("eval.every_steps=-1", "eval.every_steps"),
    ("eval.k=0", "eval.k"),
    ("eval.temperature=0", "eval.temperature"),
    ("eval.features=mean", "eval.features"),
    ("eval.val_fraction=1.5", "eval.val_fraction"),
    ("eval.max_train_samples=0", "eval.max_train_samples"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.bogus=1", "eval.bogus"),
])
def test_eval_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert err.value.key == key and f"'{key}'" in str(err.value)


def test_eval_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["eval.val_shards=[a.tar, b.tar]", "eval.max_val_samples=null"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
