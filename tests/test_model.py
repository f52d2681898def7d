"""The aligned model on a demo-like setup (digits, tiny random encoders, a trained run): raw
inputs through the truncated encoders equal the heads on the stored features."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    BertModel,
    BitImageProcessor,
    ByT5Tokenizer,
    Dinov2Config,
    Dinov2Model,
)

from stages.align import run_align
from stages.datasets import digits_source
from stages.encoders import load_encoder, truncate_encoder
from stages.evaluate import evaluate_run, zero_shot_accuracy
from stages.extract import ExtractOptions, extract
from stages.heads import build_head, save_run
from stages.model import AlignedModel, export_model
from stages.pairs import PairSpec
from stages.train import AlignSettings
from store import FeatureStore, UserError, image_table
from tests.helpers import one_line_error, run_cli

N_TRAIN, N_TEST = 240, 80
FAST = ExtractOptions(batch_size=40, block_rows=80, num_workers=0, progress=False)
SETTINGS = AlignSettings(
    epochs=15, batch_size=64, warmup_steps=5, out_dim=24, hidden_dim=32, patience=5, lam=1.0
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """A float16 store of digits (train, test, prompts) and a run on non-last layers."""
    root = tmp_path_factory.mktemp("model")
    store = str(root / "features.zarr")
    for split, limit in (("train", N_TRAIN), ("test", N_TEST), ("prompts", 0)):
        opts = ExtractOptions(**{**FAST.__dict__, "limit": limit})
        if split != "prompts":
            extract(store, "digits", split, "digits", "tiny-random-vit", opts)
        extract(store, "digits", split, "digits", "tiny-random-text", opts)
    run = root / "run"
    spec = PairSpec(
        store=store,
        dataset="digits",
        split="train",
        image_model="tiny-random-vit",
        text_model="tiny-random-text",
    )
    run_align(spec, ("block.1", "layer.1"), SETTINGS, run, progress=False)
    return {"store": store, "run": run, "root": root}


def test_truncation_runs_fewer_blocks():
    encoder = load_encoder("tiny-random-vit")
    blocks = encoder.model.encoder.layer
    calls = []
    for block in blocks:
        block.register_forward_hook(lambda *_: calls.append(1))
    batch = {"pixel_values": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)}
    full = encoder.embed(batch)
    assert len(calls) == 4
    calls.clear()
    assert truncate_encoder(encoder, encoder.layer_names.index("block.1")) == 2
    cut = encoder.embed(batch)
    assert len(calls) == 2  # blocks 2 and 3 never ran
    torch.testing.assert_close(cut[1], full[1])  # same pooled layer as extraction

    text = load_encoder("tiny-random-text")
    tokens = text.collate(["a small text", "another one"])
    full = text.embed(tokens)
    assert truncate_encoder(text, 0) == 1  # `embeddings`: one layer runs (HF needs one)
    torch.testing.assert_close(text.embed(tokens)[0], full[0])


def stored_embeddings(demo, model: AlignedModel, split: str, modality: str) -> np.ndarray:
    """The run's head applied to the stored (float16) features, in float64 numpy."""
    config = model.config
    array = FeatureStore(demo["store"]).open("digits", split, modality, config[f"{modality}_model"])
    values = array.read_layer(config[f"{modality}_layer"])
    with torch.no_grad():
        out = model.heads[modality].cpu()(torch.from_numpy(values)).double().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_encode_image_equals_stored_path(demo):
    model = AlignedModel.from_run(demo["run"], device="cpu")
    assert model.blocks == {"image": (2, 4), "text": (2, 4)}
    source = digits_source("test")
    images = [source.load_image(i) for i in range(N_TEST)]
    raw = model.encode_image(images, batch_size=32)
    assert raw.dtype == torch.float32 and raw.shape == (N_TEST, SETTINGS.out_dim)
    np.testing.assert_allclose(raw.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    cosine = (raw.double().numpy() * stored_embeddings(demo, model, "test", "image")).sum(1)
    assert cosine.min() >= 0.999

    captions = list(source.manifest["caption"][:50])
    raw_text = model.encode_text(captions).double().numpy()
    stored = stored_embeddings(demo, model, "test", "text")[:50]
    assert (raw_text * stored).sum(1).min() >= 0.999


def test_zero_shot_from_raw_images_equals_evaluate(demo):
    model = AlignedModel.from_run(demo["run"], device="cpu")
    metrics = evaluate_run(demo["run"], demo["store"])
    source = digits_source("test")
    images = [source.load_image(i) for i in range(N_TEST)]
    classes = model.class_embeddings(source.label_names)
    raw = zero_shot_accuracy(model.encode_image(images), classes, source.manifest["label"][:N_TEST])
    assert raw["top1"] == metrics["zero_shot"]["top1"]
    assert raw["top5"] == metrics["zero_shot"]["top5"]

    result = model.classify(images[:6], source.label_names, k=3)
    np.testing.assert_allclose(result.probs.sum(1).numpy(), 1.0, rtol=1e-5)
    assert result.top_classes.shape == (6, 3)
    # probabilities are a softmax of cosine / temperature, computed here in float64
    image = model.encode_image(images[:6]).double()
    logits = image @ classes.double().T / model.config["temperature"]
    expected = torch.softmax(logits, dim=1)
    torch.testing.assert_close(result.probs.double(), expected, rtol=1e-4, atol=1e-6)
    assert (result.top_classes[:, 0] == expected.argmax(1)).all()


def test_image_paths_and_bad_images(demo, tmp_path):
    model = AlignedModel.from_run(demo["run"], device="cpu")
    image = digits_source("test").load_image(0)
    image.save(tmp_path / "a.png")
    torch.testing.assert_close(model.encode_image(tmp_path / "a.png"), model.encode_image(image))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*bad.png"):
        model.encode_image([tmp_path / "a.png", str(tmp_path / "bad.png")])
    with pytest.raises(UserError, match="do not exist: .*gone.png"):
        model.encode_image(str(tmp_path / "gone.png"))
    with pytest.raises(UserError, match="at least one class name"):
        model.classify(image, [])


def test_run_errors(demo, tmp_path):
    with pytest.raises(UserError, match="no head.safetensors"):
        (tmp_path / "empty").mkdir()
        AlignedModel.from_run(tmp_path / "empty")
    config = json.loads((demo["run"] / "config.json").read_text())
    # weights that differ from those the store recorded at extraction
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "head.safetensors").write_bytes((demo["run"] / "head.safetensors").read_bytes())
    wrong = {**config, "store_fingerprint": {**config["store_fingerprint"]}}
    wrong["store_fingerprint"]["image"] = {**wrong["store_fingerprint"]["image"]}
    wrong["store_fingerprint"]["image"]["model_fingerprint"] = "0" * 32
    (changed / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(UserError, match="weights of tiny-random-vit differ"):
        AlignedModel.from_run(changed)
    # an encoder that is not available offline: extraction's download hint
    recorded = {**config["store_fingerprint"], "text": {"model_spec": "nobody/no-model"}}
    gone = {**config, "text_model": "nobody/no-model", "store_fingerprint": recorded}
    (changed / "config.json").write_text(json.dumps(gone))
    with pytest.raises(UserError, match="hf download nobody/no-model"):
        AlignedModel.from_run(changed)


def test_export_with_encoders_loads_offline(demo, tmp_path):
    out = tmp_path / "export"
    export = export_model(demo["run"], out, with_encoders=True)
    assert export["image"]["blocks_run"] == 2 and export["image"]["blocks_total"] == 4
    assert export["image"]["exported_bytes"] < export["image"]["full_encoder_bytes"]
    assert not list(tmp_path.glob("*.tmp"))
    files = {p.name for p in out.rglob("*")}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pkl")) for f in files)
    original = AlignedModel.from_run(demo["run"], device="cpu")
    loaded = AlignedModel.from_pretrained(out, device="cpu")
    assert loaded.run_id == original.run_id
    images = [digits_source("test").load_image(i) for i in range(8)]
    torch.testing.assert_close(loaded.encode_image(images), original.encode_image(images))
    texts = ["a handwritten digit seven.", "the number 3 written by hand."]
    torch.testing.assert_close(loaded.encode_text(texts), original.encode_text(texts))
    # a changed weight file is refused
    weights = out / "image_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match="changed since it was written"):
        AlignedModel.from_pretrained(out)
    with pytest.raises(UserError, match="not a directory written by"):
        AlignedModel.from_pretrained(demo["run"])


def test_export_of_a_real_size_architecture(tmp_path):
    """DINOv2-S and MiniLM-L6 configs with random weights, saved locally: the truncated export
    holds only the blocks it runs."""
    torch.manual_seed(0)
    vit = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6))
    vit.save_pretrained(tmp_path / "vit")
    BitImageProcessor(size={"shortest_edge": 224}, crop_size=224).save_pretrained(tmp_path / "vit")
    tokenizer = ByT5Tokenizer()
    bert = BertModel(
        BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=6,
                   num_attention_heads=12, intermediate_size=1536)
    )  # fmt: skip
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    image, text = load_encoder(str(tmp_path / "vit")), load_encoder(str(tmp_path / "bert"))
    run = tmp_path / "run"
    config = {
        "image_model": str(tmp_path / "vit"), "text_model": str(tmp_path / "bert"),
        "image_layer": "block.5", "text_layer": "layer.2", "head": "linear",
        "image_dim": 384, "text_dim": 384, "out_dim": 16, "temperature": 0.05,
        "store_fingerprint": {
            "image": {"model_fingerprint": image.fingerprint()},
            "text": {"model_fingerprint": text.fingerprint()},
        },
    }  # fmt: skip
    save_run(run, build_head("linear", 384, 16), build_head("linear", 384, 16), config)
    export = export_model(run, tmp_path / "export", with_encoders=True)
    assert (export["image"]["blocks_run"], export["text"]["blocks_run"]) == (6, 3)
    # about half of ViT-S's blocks (the patch embedding and the norm stay whole)
    ratio = export["image"]["exported_bytes"] / export["image"]["full_encoder_bytes"]
    assert 0.45 < ratio < 0.6, ratio
    original = AlignedModel.from_run(run, device="cpu")
    loaded = AlignedModel.from_pretrained(tmp_path / "export", device="cpu")
    assert len(loaded.encoders["image"].model.encoder.layer) == 6
    pixels = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    torch.testing.assert_close(loaded.encode_image(picture), original.encode_image(picture))


# -- the commands -----------------------------------------------------------------------------
def save_test_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    source = digits_source("test")
    paths = [folder / f"digit{i}.png" for i in range(n)]
    for i, path in enumerate(paths):
        source.load_image(i).save(path)
    return paths


def test_cli_export_embed_classify(demo, tmp_path, capsys):
    code, out, err = run_cli(["export", "--run", demo["run"], "--out", tmp_path / "exp"], capsys)
    assert code == 0, err
    assert "image tiny-random-vit layer block.1: 2 of 4 blocks" in out
    model = AlignedModel.load(tmp_path / "exp", device="cpu")  # an export without encoders
    assert model.blocks["image"] == (2, 4)

    out_file = tmp_path / "emb.parquet"
    args = ["embed", "--run", tmp_path / "exp", "--source", "digits", "--split", "test"]
    code, out, err = run_cli([*args, "--limit", 12, "--num-workers", 0, "--out", out_file], capsys)
    assert code == 0, err
    table = pd.read_parquet(out_file)
    assert list(table["modality"]) == ["image"] * 12 + ["text"] * 12
    source = digits_source("test")
    images = np.stack(table["embedding"][:12])
    expected = model.encode_image([source.load_image(i) for i in range(12)]).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5)
    texts = np.stack(table["embedding"][12:])
    captions = list(table["caption"][12:])
    assert captions == list(source.manifest["caption"][:12])
    np.testing.assert_allclose(texts, model.encode_text(captions).numpy(), atol=1e-5)

    paths = save_test_images(tmp_path / "images", 3)
    names = "zero,one,two,three"
    code, out, err = run_cli(
        ["classify", "--run", demo["run"], "--labels", names, "--top-k", 2, *paths], capsys
    )
    assert code == 0, err
    result = model.classify(paths, names.split(","), k=2)
    for path, probs, classes in zip(paths, result.top_probs, result.top_classes, strict=True):
        best, prob = names.split(",")[int(classes[0])], f"{float(probs[0]):.4f}"
        assert any(str(path) in x and best in x and prob in x for x in out.splitlines()), out
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("zero\none\n\ntwo\nthree\n")
    csv_file = tmp_path / "out.csv"
    code, _, err = run_cli(
        ["classify", "--run", demo["run"], "--labels-file", labels_file, "--csv", csv_file, *paths],
        capsys,
    )
    assert code == 0, err
    table = pd.read_csv(csv_file)
    assert len(table) == 9
    top1 = table[table["rank"] == 1]["probability"].to_numpy()
    np.testing.assert_allclose(top1, result.top_probs[:, 0].numpy(), rtol=1e-4)


def test_cli_bad_input_is_one_line(demo, tmp_path, capsys):
    paths = save_test_images(tmp_path, 1)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    csv_file = tmp_path / "out.csv"
    cases = [
        (["classify", "--run", demo["run"], "--labels", " , ", *paths], "class names"),
        (["classify", "--run", demo["run"], "--labels", "a,b", tmp_path / "x.png"], "not exist"),
        (
            [
                "classify",
                "--run",
                demo["run"],
                "--labels",
                "a,b",
                "--csv",
                csv_file,
                paths[0],
                tmp_path / "bad.png",
            ],
            "cannot read image",
        ),  # fmt: skip
        (["classify", "--run", tmp_path, "--labels", "a", *paths], "no head.safetensors"),
        (["export", "--run", tmp_path, "--out", tmp_path / "e"], "no head.safetensors"),
        (
            [
                "embed",
                "--run",
                demo["run"],
                "--source",
                "pairs:nothing.csv",
                "--out",
                tmp_path / "e.parquet",
            ],
            "does not exist",
        ),  # fmt: skip
    ]
    for args, message in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert message in one_line_error(err), err
    assert not csv_file.exists() and not (tmp_path / "e").exists()
    assert not (tmp_path / "e.parquet").exists()


def stored_image_embeddings(demo) -> np.ndarray:
    """The head on the stored test features, float64, unit rows."""
    return stored_embeddings(
        demo, AlignedModel.from_run(demo["run"], device="cpu"), "test", "image"
    )


def test_cli_index_and_search(demo, tmp_path, capsys):
    index_dir = tmp_path / "index"
    args = ["index", "--run", demo["run"], "--store", demo["store"], "--split", "test"]
    code, out, err = run_cli([*args, "--out", index_dir], capsys)
    assert code == 0, err
    assert f"{N_TEST} images of digits/test" in out and "IndexFlatIP" in out

    model = AlignedModel.from_run(demo["run"], device="cpu")
    query = "a handwritten digit seven."
    code, out, err = run_cli(["search", "--index", index_dir, "-k", 5, query], capsys)
    assert code == 0, err
    scores = stored_image_embeddings(demo) @ model.encode_text([query]).double().numpy()[0]
    best = np.argsort(-scores)[:5]
    lines = out.splitlines()[1:]
    manifest = image_table(FeatureStore(demo["store"]).manifest("digits", "test"))
    for line, row in zip(lines, best, strict=True):
        rank, score, sample_id, path = line.split()[:4]
        assert sample_id == manifest["sample_id"].iloc[row]
        assert abs(float(score) - scores[row]) < 1e-3  # float16 storage, printed to 4 places

    image = save_test_images(tmp_path / "q", 1)[0]
    code, out, err = run_cli(["search", "--index", index_dir, "--image", image, "-k", 1], capsys)
    assert code == 0, err
    assert manifest["sample_id"].iloc[0] in out.splitlines()[1]  # itself first

    # an approximate index past --exact-max, its recall against exact search recorded
    code, out, err = run_cli([*args, "--out", tmp_path / "ivf", "--exact-max", 10], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "ivf" / "index.json").read_text())
    assert meta["kind"].startswith("IndexIVFFlat") and 0.5 <= meta["recall_at_10_vs_exact"] <= 1

    # a model of another run is refused
    other = tmp_path / "other"
    config = json.loads((demo["run"] / "config.json").read_text())
    torch.manual_seed(1)
    heads = [build_head("linear", config[f"{s}_dim"], config["out_dim"]) for s in ("image", "text")]
    save_run(other, *heads, config)
    code, _, err = run_cli(["search", "--index", index_dir, "--run", other, "a query"], capsys)
    assert code == 2 and "built by run" in one_line_error(err)
    code, _, err = run_cli(["search", "--index", tmp_path, "a query"], capsys)
    assert code == 2 and "is not an index" in one_line_error(err)


def test_timm_truncation_prunes_blocks(monkeypatch):
    """A timm DINOv2-S (random weights, 56 px): pruned after block 3, 4 of 12 blocks run and
    block 3's pooled CLS is extraction's."""
    import timm

    create = timm.create_model
    monkeypatch.setattr(
        timm,
        "create_model",
        lambda name, **kw: create(name, **{**kw, "pretrained": False}, img_size=56),
    )
    torch.manual_seed(0)
    encoder = load_encoder("timm:vit_small_patch14_dinov2.lvd142m")
    calls = []
    for block in encoder.model.blocks:
        block.register_forward_hook(lambda *_: calls.append(1))
    pixels = {"pixel_values": torch.randn(2, 3, 56, 56)}
    full = encoder.embed(pixels)
    assert len(calls) == 12
    calls.clear()
    assert truncate_encoder(encoder, encoder.layer_names.index("block.3")) == 4
    cut = encoder.embed(pixels)
    assert len(calls) == 4
    torch.testing.assert_close(cut[3], full[3])


# -- export with encoders: timm ViT, timm CNN, Hugging Face CNN -----------------------------
VIT = "vit_small_patch14_dinov2.lvd142m"
SMALL_VIT = {"img_size": 56}  # DINOv2-S at 56 px: 4 x 4 patches, 12 blocks of width 384
EXPORT_CASES = {  # image spec kind: (name, chosen layer, blocks run, prefixes of dropped tensors)
    "timm-vit": (VIT, "block.3", 4, [f"blocks.{i}." for i in range(4, 12)] + ["norm."]),
    "timm-cnn": ("resnet18", "stage.2", 3, ["layer3.", "layer4."]),
    "hf-cnn": ("resnet", "stage.2", 3, ["encoder.stages.2.", "encoder.stages.3."]),
    "hf-swin": ("swin", "stage.2", 3, ["encoder.layers.2.", "encoder.layers.3.", "layernorm."]),
}


def offline_timm(monkeypatch, changes: dict) -> list:
    """timm.create_model with `changes` and no hub: pretrained weights asked for fail as they
    would offline. Returns the `pretrained` flags it was called with."""
    import timm

    create, asked = timm.models.create_model, []  # timm's own, even when patched before

    def create_model(name, **kw):
        asked.append(kw.get("pretrained"))
        if kw.get("pretrained"):
            raise OSError(f"no network: {name}")
        return create(name, **{**kw, **changes})

    monkeypatch.setattr(timm, "create_model", create_model)
    return asked


@pytest.mark.parametrize("kind", list(EXPORT_CASES))
def test_export_with_encoders_round_trip(tmp_path, monkeypatch, kind):
    """A run on a non-last layer of a timm ViT (DINOv2-S), a timm CNN and a Hugging Face CNN,
    exported with its encoders: only the blocks or stages run are saved (safetensors, no
    pickle), and from_pretrained rebuilds the cut encoder without the original weights file or
    the hub and gives the same embeddings."""
    from safetensors.torch import load_file

    from tests.helpers import save_random_timm, save_tiny_hf_maps, save_tiny_resnet

    name, layer, keep, dropped = EXPORT_CASES[kind]
    hf = kind.startswith("hf")
    if hf:
        save = save_tiny_resnet if name == "resnet" else partial(save_tiny_hf_maps, name)
        spec, recorded = str(save(tmp_path / name)), {}
        weights = tmp_path / name / "model.safetensors"
    else:
        # the ViT's data config says 56 px too (timm registers 518); the export must carry it
        data = {"pretrained_cfg_overlay": {"input_size": (3, 56, 56)}} if kind == "timm-vit" else {}
        changes = SMALL_VIT if kind == "timm-vit" else {}
        offline_timm(monkeypatch, {**changes, **data})
        weights = tmp_path / "w.safetensors"
        save_random_timm(name, weights)
        spec, recorded = f"timm:{name}", {"weights": str(weights)}
    image = load_encoder(spec, weights=recorded.get("weights"))
    whole = {k: v.clone() for k, v in image.model.state_dict().items()}
    text = load_encoder("tiny-random-text")
    config = {
        "image_model": spec, "text_model": "tiny-random-text", "image_layer": layer,
        "text_layer": "layer.1", "head": "linear", "image_dim": image.layer_dims[
            image.layer_names.index(layer)], "text_dim": 64, "out_dim": 8, "temperature": 0.05,
        "store_fingerprint": {
            "image": {"model_spec": spec, "model_fingerprint": image.fingerprint(), **recorded},
            "text": {"model_fingerprint": text.fingerprint()},
        },
    }  # fmt: skip
    torch.manual_seed(0)
    heads = [build_head("linear", config[f"{s}_dim"], 8) for s in ("image", "text")]
    save_run(tmp_path / "run", *heads, config)
    export = export_model(tmp_path / "run", tmp_path / "export", with_encoders=True)
    info = export["image"]
    assert (info["blocks_run"], info["blocks_total"]) == (keep, 12 if kind == "timm-vit" else 5)
    # the saved tensors: the whole encoder's, less those of the blocks or stages not run
    saved = load_file(tmp_path / "export" / "image_encoder" / "model.safetensors")
    kept = {k: v for k, v in whole.items() if not k.startswith(tuple(dropped))}
    assert saved.keys() == kept.keys()
    assert all(torch.equal(saved[k], kept[k]) for k in kept)
    assert info["full_encoder_bytes"] == sum(v.numel() * v.element_size() for v in whole.values())
    tensor_bytes = sum(v.numel() * v.element_size() for v in kept.values())
    assert tensor_bytes <= info["exported_bytes"] < tensor_bytes + 65536  # + the file's header
    files = {p.name for p in (tmp_path / "export").rglob("*")}
    assert not any(f.endswith((".bin", ".pkl", ".pt", ".pth")) for f in files)

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)) for _ in "ab"]
    original = AlignedModel.from_run(tmp_path / "run", device="cpu")
    expected = original.encode_image(pictures)
    texts = ["a small text", "another one"]
    expected_text = original.encode_text(texts)
    # without --with-encoders the export names the encoder (and its --weights file)
    export_model(tmp_path / "run", tmp_path / "by-name")
    by_name = AlignedModel.from_pretrained(tmp_path / "by-name", device="cpu")
    torch.testing.assert_close(by_name.encode_image(pictures), expected, rtol=0, atol=0)
    weights.unlink()  # the export needs neither the original weights nor the hub
    if not hf:  # and the data config is the recorded one, not timm's registry's
        asked = offline_timm(monkeypatch, SMALL_VIT if kind == "timm-vit" else {})
    loaded = AlignedModel.from_pretrained(tmp_path / "export", device="cpu")
    if not hf:
        assert asked == [False]
    assert loaded.blocks["image"][0] == keep
    torch.testing.assert_close(loaded.encode_image(pictures), expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_text(texts), expected_text, rtol=0, atol=0)
