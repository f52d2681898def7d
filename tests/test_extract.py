"""Stage 1: encoders, pooling, data sources, resumable extraction and its errors."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stages.datasets import digits_split, load_source
from stages.encoders import load_encoder, masked_mean
from stages.extract import ExtractOptions, extract
from store import FeatureStore, UserError, pair_rows
from tests.helpers import files, one_line_error, run_cli, save_tiny_resnet

ROOT = Path(__file__).resolve().parents[1]
FAST = ExtractOptions(batch_size=24, block_rows=64, num_workers=0, progress=False)


def test_tiny_encoders_layers_and_widths():
    vit = load_encoder("tiny-random-vit")
    assert vit.modality == "image" and vit.dim == 64
    assert vit.layer_names == ["block.0", "block.1", "block.2", "block.3", "final_norm"]
    text = load_encoder("tiny-random-text")
    assert text.modality == "text" and text.dim == 64
    assert text.layer_names == ["embeddings", "layer.0", "layer.1", "layer.2", "layer.3"]
    assert "random" in vit.revision and "random" in text.revision


def test_text_pooling_is_masked_mean():
    encoder = load_encoder("tiny-random-text")
    texts = ["a", "a much longer caption than the first"]
    batch = encoder.collate(texts)
    with torch.no_grad():
        got = torch.stack(encoder.embed(batch), 1).double().numpy()
        hidden = encoder.model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].numpy()
    assert mask[0].sum() < mask[1].sum()  # the short text is padded
    for layer, h in enumerate(hidden):
        for row in range(2):
            real = h[row].double().numpy()[mask[row] == 1]
            np.testing.assert_allclose(got[row, layer], real.mean(0), rtol=1e-5, atol=1e-6)
        # padding never leaks in: the short text alone gives the same embedding
        alone = masked_mean(
            encoder.model(**encoder.collate(texts[:1]), output_hidden_states=True).hidden_states[
                layer
            ],
            encoder.collate(texts[:1])["attention_mask"],
        )
        np.testing.assert_allclose(
            got[0, layer], alone[0].detach().double().numpy(), rtol=1e-4, atol=1e-5
        )


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> tuple[Path, Path]:
    """A DINOv2-small and a BERT-style configuration with random weights, saved with
    save_pretrained (model, image processor, tokenizer) as a user's local models would be."""
    from transformers import (
        BertConfig,
        BertModel,
        BitImageProcessor,
        ByT5Tokenizer,
        Dinov2Config,
        Dinov2Model,
    )

    root = tmp_path_factory.mktemp("models")
    vit_dir, text_dir = root / "dinov2-small-random", root / "bert-random"
    config = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14
    )
    Dinov2Model(config).save_pretrained(vit_dir)
    crop = {"height": 56, "width": 56}
    BitImageProcessor(size={"shortest_edge": 64}, crop_size=crop).save_pretrained(vit_dir)
    tokenizer = ByT5Tokenizer()
    text_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=256,
    )
    BertModel(text_config).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    return vit_dir, text_dir


def test_real_size_architectures_load_from_a_local_directory(saved_models):
    vit_dir, text_dir = saved_models
    vit = load_encoder(str(vit_dir))
    assert vit.modality == "image" and len(vit.layer_names) == 13 and vit.dim == 384
    assert vit.layer_names[-1] == "final_norm"
    pixels = vit.collate([vit.prepare(Image.new("RGB", (20, 30)))])
    assert pixels["pixel_values"].shape == (1, 3, 56, 56)  # the saved processor's crop
    assert [tuple(t.shape) for t in vit.embed(pixels)] == [(1, 384)] * 13
    text = load_encoder(str(text_dir))
    assert text.modality == "text" and len(text.layer_names) == 7 and text.dim == 128
    assert [tuple(t.shape) for t in text.embed(text.collate(["hello"]))] == [(1, 128)] * 7


def test_image_pooling_matches_hand_computation(saved_models):
    """CLS of every block, then the final layernorm's CLS, from pixels made by the model's own
    Hugging Face processor (the fast uint8 path must give the same pixels)."""
    from transformers import AutoImageProcessor

    vit_dir, _ = saved_models
    encoder = load_encoder(str(vit_dir))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(np.uint8(rng.integers(0, 255, (70, 90, 3)))) for _ in range(3)]
    pixels = AutoImageProcessor.from_pretrained(vit_dir)(images=images, return_tensors="pt")
    with torch.no_grad():
        got = torch.stack(encoder.embed(encoder.collate([encoder.prepare(im) for im in images])), 1)
        out = encoder.model(pixel_values=pixels["pixel_values"], output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == 13 and got.shape == (3, 13, 384)
    for i in range(12):
        torch.testing.assert_close(got[:, i], hidden[i + 1][:, 0], rtol=1e-4, atol=1e-4)
    final = encoder.model.layernorm(hidden[-1])[:, 0]
    torch.testing.assert_close(got[:, 12], final, rtol=1e-4, atol=1e-4)


def test_digits_source_is_fixed_and_captions_name_the_digit():
    index_a, _, labels = digits_split("train")
    index_b, _, _ = digits_split("train")
    test_index, _, _ = digits_split("test")
    np.testing.assert_array_equal(index_a, index_b)
    assert len(index_a) + len(test_index) == 1797 and not set(index_a) & set(test_index)
    source = load_source("digits", "test")
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for caption, label in zip(source.manifest["caption"], source.manifest["label"]):
        assert words[label] in caption or str(label) in caption
    assert len(set(source.manifest["caption"].str.split().str[0])) > 1  # several templates
    prompts = load_source("digits", "prompts").manifest
    assert (prompts["image_row"] == -1).all() and sorted(set(prompts["label"])) == list(range(10))


def test_extract_digits_end_to_end(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    args = [
        "extract",
        "--store",
        store,
        "--num-workers",
        "0",
        "--block-rows",
        "64",
        "--limit",
        "100",
    ]
    assert run_cli([*args, "--model", "tiny-random-vit"], capsys)[0] == 0
    assert run_cli([*args, "--model", "tiny-random-text"], capsys)[0] == 0
    code, out, _ = run_cli([*args, "--model", "tiny-random-text"], capsys)
    assert code == 0 and "already complete" in out
    fs = FeatureStore(store)
    image = fs.open("digits", "train", "image", "tiny-random-vit")
    text = fs.open("digits", "train", "text", "tiny-random-text")
    assert image.shape == (100, 5) and text.shape == (100, 5)
    assert image.layer_dims == [64] * 5 and text.layer_dims == [64] * 5
    assert image.attrs["pooling"] == "cls" and text.attrs["pooling"] == "masked_mean"
    assert image.attrs["model_fingerprint"] and image.attrs["source_fingerprint"]
    # stored rows equal a direct forward of the same images
    source = load_source("digits", "train")
    encoder = load_encoder("tiny-random-vit")
    with torch.no_grad():
        batch = encoder.collate([encoder.prepare(source.load_image(r)) for r in (0, 77)])
        direct = torch.stack(encoder.embed(batch), 1).numpy()
    np.testing.assert_allclose(
        image.read_layer("final_norm")[[0, 77]], direct[:, -1], rtol=2e-3, atol=2e-3
    )  # float16 storage
    # changed source (another --limit) or model: refused, nothing lost
    code, _, err = run_cli([*args[:-1], "50", "--model", "tiny-random-vit"], capsys)
    assert code == 2 and "--overwrite" in err
    assert fs.open("digits", "train", "image", "tiny-random-vit").complete


KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from store.features import FeatureArray
    calls = 0
    real_write = FeatureArray.write_block
    def write_block(self, block, values):
        global calls
        calls += 1
        if calls == 3:  # die half-way: a layer's data (wrong) written, never marked complete
            self.layers[1][self.block_slice(block)] = np.zeros_like(values[1]).astype(self.dtype)
            (self.root / self.path / "layers" / "1" / "leftover.partial").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, block, values)
    FeatureArray.write_block = write_block
    from pipeline.app import main
    sys.argv = ["pipeline"] + sys.argv[1:]
    main()
""")


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory) -> Path:
    return save_tiny_resnet(tmp_path_factory.mktemp("models") / "tiny-resnet")


def test_resume_after_kill_is_byte_identical(tmp_path, tiny_resnet):
    """A CNN (layers 8 to 32 wide) killed with SIGKILL after its third block wrote one layer:
    resumed, every file of its features equals those of an uninterrupted run."""
    args = [
        "extract",
        "--model",
        str(tiny_resnet),
        "--limit",
        "200",
        "--block-rows",
        "64",
        "--batch-size",
        "24",
        "--num-workers",
        "0",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *args, "--store", tmp_path / "k.zarr"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9
    partial = FeatureStore(tmp_path / "k.zarr").open("digits", "train", "image", str(tiny_resnet))
    assert partial.completed_blocks().tolist() == [True, True, False, False]
    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--store", tmp_path / "k.zarr"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming, 2 of 4 blocks already done, removed 1 partial files" in resumed.stdout
    extract(
        str(tmp_path / "u.zarr"),
        "digits",
        "train",
        "digits",
        str(tiny_resnet),
        ExtractOptions(limit=200, block_rows=64, batch_size=24, num_workers=0, progress=False),
    )
    a = FeatureStore(tmp_path / "k.zarr").open("digits", "train", "image", str(tiny_resnet))
    b = FeatureStore(tmp_path / "u.zarr").open("digits", "train", "image", str(tiny_resnet))
    assert a.complete and b.complete
    assert len(set(a.layer_dims)) > 1  # layers of different widths
    mine, theirs = files(tmp_path / "k.zarr" / a.path), files(tmp_path / "u.zarr" / b.path)
    assert sorted(mine) == sorted(theirs) and all(mine[f] == theirs[f] for f in theirs)
    assert not list((tmp_path / "k.zarr").rglob("*.partial"))


@pytest.fixture
def pairs_csv(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(np.uint8(rng.integers(0, 255, (16, 16, 3)))).save(tmp_path / f"img/{i}.png")
        rows += [(f"img/{i}.png", f"picture {i}"), (f"img/{i}.png", f"another view of {i}")]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(tmp_path / "pairs.csv", index=False)
    return tmp_path / "pairs.csv"


def test_pairs_file_with_several_captions_per_image(tmp_path, pairs_csv):
    for model in ("tiny-random-vit", "tiny-random-text"):
        extract(str(tmp_path / "s.zarr"), "mine", "train", f"pairs:{pairs_csv}", model, FAST)
    fs = FeatureStore(tmp_path / "s.zarr")
    assert fs.open("mine", "train", "image", "tiny-random-vit").shape[0] == 6
    assert fs.open("mine", "train", "text", "tiny-random-text").shape[0] == 12
    images, texts = pair_rows(fs.manifest("mine", "train"))
    assert images.tolist() == [i // 2 for i in range(12)] and texts.tolist() == list(range(12))


def test_corrupt_image_is_named_or_skipped(tmp_path, pairs_csv, capsys):
    # image 1 sits in the first batch of block 0 (rows 0-3), image 4 in block 1
    for bad in (1, 4):
        (pairs_csv.parent / f"img/{bad}.png").write_bytes(b"not a png")
    store = tmp_path / "s.zarr"
    args = [
        "extract",
        "--model",
        "tiny-random-vit",
        "--dataset",
        "mine",
        "--source",
        f"pairs:{pairs_csv}",
        "--store",
        store,
        "--num-workers",
        "0",
        "--block-rows",
        "4",
        "--batch-size",
        "2",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "1.png" in one_line_error(err) and "--skip-bad" in err
    array = FeatureStore(store).open("mine", "train", "image", "tiny-random-vit")
    assert array.completed_blocks().tolist() == [False, False]  # the bad block is not complete
    assert run_cli([*args, "--skip-bad"], capsys)[0] == 0
    fs = FeatureStore(store)
    manifest = fs.manifest("mine", "train")
    assert manifest.loc[manifest["skipped"], "image_row"].unique().tolist() == [1, 4]
    features = fs.open("mine", "train", "image", "tiny-random-vit").read_layer(-1)
    assert np.isnan(features[[1, 4]]).all() and np.isfinite(np.delete(features, [1, 4], 0)).all()
    assert not {1, 4} & set(pair_rows(manifest)[0])


def test_bad_inputs_give_one_line_errors(tmp_path, pairs_csv, capsys):
    no_caption = tmp_path / "nocap.csv"
    pd.DataFrame({"image": ["img/0.png"], "text_x": ["a"]}).to_csv(no_caption, index=False)
    (tmp_path / "notstore").mkdir()
    (tmp_path / "notstore" / "x.txt").write_text("hello")
    cases = {
        "does not exist": ["--source", f"pairs:{tmp_path}/missing.csv"],
        "no caption column": ["--source", f"pairs:{no_caption}"],
        "image folder": ["--source", f"imagefolder:{tmp_path}/nofolder"],
        "unknown model 'no-such-model'": ["--model", "no-such-model"],
        "is not a feature store": ["--store", tmp_path / "notstore"],
    }
    for expected, extra in cases.items():
        args = [
            "extract",
            "--dataset",
            "mine",
            "--source",
            "digits",
            "--store",
            tmp_path / "s.zarr",
            *extra,
        ]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and expected in one_line_error(err), (expected, err)


def test_missing_image_file_is_reported_up_front(tmp_path, pairs_csv):
    (pairs_csv.parent / "img/5.png").unlink()
    with pytest.raises(UserError, match="missing image files: .*5.png"):
        load_source(f"pairs:{pairs_csv}", "train")


def test_no_network_says_how_to_predownload(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(ROOT),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "extract",
            "--model",
            "facebook/dinov2-small",
            "--store",
            tmp_path / "s.zarr",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert "hf download facebook/dinov2-small" in run.stderr and "local directory" in run.stderr
    assert one_line_error(run.stderr)


class TinyTorchvisionSet:
    """Stands in for a torchvision dataset class (CIFAR-style `train=` signature)."""

    classes = ["cat", "dog"]

    def __init__(self, root, train: bool = True, download: bool = False):
        self.targets = [0, 1, 1] if train else [1, 0]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.new("RGB", (12, 12), color=(40 * i, 0, 0)), self.targets[i]


def test_torchvision_source_and_prompts(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "TinySet", TinyTorchvisionSet, raising=False)
    test = load_source("torchvision:TinySet", "test")
    assert test.manifest["label"].tolist() == [1, 0]
    assert test.manifest["label_name"].tolist() == ["dog", "cat"]
    assert test.load_image(1).size == (12, 12)
    prompts = load_source("torchvision:TinySet", "prompts").manifest
    assert prompts["caption"].iloc[0] == "a photo of a cat." and set(prompts["label"]) == {0, 1}
    with pytest.raises(UserError, match="no dataset 'NoSuchSet'"):
        load_source("torchvision:NoSuchSet", "test")


def test_timm_encoder_layers_and_pooling(monkeypatch):
    """timm:<name> through the real code path; weights random (no download here)."""
    import timm

    create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        return create(name, pretrained=False, img_size=56, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    encoder = load_encoder("timm:vit_small_patch14_dinov2.lvd142m")
    assert encoder.modality == "image" and encoder.dim == 384
    assert len(encoder.layer_names) == 13 and encoder.layer_names[-1] == "final_norm"
    model = encoder.model
    image = Image.fromarray(np.uint8(np.random.default_rng(0).integers(0, 255, (60, 80, 3))))
    # workers give uint8 pixels; embed scales and normalises them with timm's data config
    raw = encoder.collate([encoder.prepare(image)])["pixel_values"]
    assert raw.dtype == torch.uint8
    raw = torch.nn.functional.interpolate(raw.float(), size=56)
    config = timm.data.resolve_model_data_config(encoder.model)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    pixels = (raw / 255 - mean) / torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        got = encoder.embed({"pixel_values": raw})
        tokens = model._pos_embed(model.patch_embed(pixels))
        tokens = model.norm_pre(tokens)
        for i, block in enumerate(model.blocks):
            tokens = block(tokens)
            torch.testing.assert_close(got[i], tokens[:, 0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[-1], model.norm(tokens)[:, 0], rtol=1e-4, atol=1e-4)
