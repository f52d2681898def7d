"""The evaluation protocol (prompts by protocol, recorded), the open_clip interface of an aligned
model, and our evaluation checked by LAION's CLIP_benchmark's own zero-shot classification and
retrieval code run on `as_open_clip()`."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from clip_benchmark.metrics import zeroshot_retrieval
from PIL import Image

from benchmarks.crosscheck import clip_benchmark_metrics
from stages.align import run_align
from stages.datasets import digits_source, load_source
from stages.evaluate import evaluate_run, retrieval_recall
from stages.extract import ExtractOptions, extract
from stages.model import AlignedModel
from stages.pairs import PairSpec
from stages.prompts import (
    PromptSpec,
    clip_class_names,
    clip_data,
    protocol_dataset,
    resolve_class_names,
)
from stages.serve.service import run_protocol
from stages.sweep import SweepSettings, run_sweep
from stages.train import AlignSettings
from store import FeatureStore, UserError
from tests.helpers import one_line_error, run_cli
from tests.model_helpers import tiny_run

IMAGE, TEXT = "tiny-random-vit", "tiny-random-text"
# float32 features: the store then holds what the live model computes, so both sides of the
# cross-check see the same numbers (float16 storage would move near-ties)
FAST = ExtractOptions(batch_size=40, block_rows=80, num_workers=0, progress=False, dtype="float32")
SETTINGS = AlignSettings(
    epochs=15, batch_size=64, warmup_steps=5, out_dim=24, hidden_dim=32, patience=5, lam=1.0
)
CIFAR = PromptSpec("clip", "source", "cifar10")  # CLIP's 18 CIFAR-10 templates, our names


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy machine: two torch threads waiting on each other cost more than
    the work (the module ran 3x slower with the default threads on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the protocol's data --------------------------------------------------------------------------
def test_dataset_names_map_to_clip_benchmark():
    assert protocol_dataset("imagenet") == "imagenet1k"
    assert protocol_dataset("CIFAR10") == "cifar10"
    assert protocol_dataset("my-pets", "OxfordIIITPet") == "pets"
    assert protocol_dataset("Food101") == "food101"
    with pytest.raises(UserError, match="no zero-shot protocol for dataset 'digits'"):
        protocol_dataset("digits")


def test_clip_class_names_follow_clip_benchmark():
    # ImageNet folders of WordNet ids, any subset, in folder order: the curated names
    wnids = ["n01440764", "n02123045", "n15075141"]
    assert clip_class_names("imagenet1k", wnids) == ["tench", "tabby cat", "toilet paper"]
    assert resolve_class_names("source", wnids, None) == ["tench", "tabby cat", "toilet paper"]
    with pytest.raises(UserError, match="n09999999 is not one of ImageNet-1k"):
        clip_class_names("imagenet1k", ["n01440764", "n09999999"])
    # torchvision's Caltech101 drops the background class that CLIP_benchmark's keeps
    curated = clip_data("classnames")["caltech101"]
    assert curated[:3] == ["background", "off-center face", "centered face"]
    names = clip_class_names("caltech101", [f"c{i}" for i in range(101)])
    assert names[:2] == ["off-center face", "centered face"] and len(names) == 101
    # Food101: the dataset's names with spaces; CIFAR: the dataset's names as they are
    assert clip_class_names("food101", ["apple_pie", "baby_back_ribs"]) == [
        "apple pie",
        "baby back ribs",
    ]
    assert clip_class_names("cifar10", ["airplane", "automobile"]) == ["airplane", "automobile"]
    with pytest.raises(UserError, match="pets has 37 class names but this source has 3 labels"):
        clip_class_names("pets", ["a", "b", "c"])


def test_prompts_split_by_protocol(tmp_path):
    source = load_source("digits", "prompts", CIFAR)
    templates = clip_data("templates")["cifar10"]
    assert source.prompts["template_list"] == templates and len(templates) == 18
    expected = [t.replace("{c}", name) for name in source.label_names for t in templates]
    assert source.manifest["caption"].tolist() == expected
    # the label names stay the labels' own (what the image splits call them)
    assert source.manifest["label_name"].tolist() == [
        name for name in source.label_names for _ in templates
    ]
    # a second prompt set of the same dataset, side by side: prompts-NAME
    other = load_source("digits", "prompts-clip", CIFAR)
    assert other.manifest.equals(source.manifest) and other.prompts == source.prompts
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    templates_file = tmp_path / "t.txt"
    templates_file.write_text("a scan of {c}.\n\nthe handwritten {}\n{{set}} {c}\n")
    source = load_source("digits", "prompts", PromptSpec(str(templates_file), str(names)))
    assert source.manifest["caption"].tolist()[:4] == [
        "a scan of digit 0.",
        "the handwritten digit 0",
        "{set} digit 0",
        "a scan of digit 1.",
    ]
    # recorded in CLIP's form, as CLIP_benchmark fills them: template.format(c=name)
    recorded = source.prompts["template_list"]
    assert recorded == ["a scan of {c}.", "the handwritten {c}", "{{set}} {c}"]
    assert [t.format(c="digit 0") for t in recorded] == source.manifest["caption"].tolist()[:3]
    assert source.prompts["classnames"] == f"file:{names}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--templates", "{t}"], "must hold exactly one {c}"),
        (["--classnames", "{n}"], "has 3 names but the dataset has 10 labels"),
        (["--templates", "clip"], "no zero-shot protocol for dataset 'digits'"),
        (["--templates", "clip", "--protocol-dataset", "nope"], "for dataset 'nope'"),
        (["--classnames", "{t}/missing.txt"], "does not exist"),
        (["--templates", "{d}"], "--templates {d} is a directory, not a file"),
        (["--classnames", "/dev/zero"], "not a regular file; give source, clip or a text file"),
    ],
)
def test_bad_prompt_options_are_one_line(extra, message, tmp_path, capsys):
    bad_template, short_names = tmp_path / "templates.txt", tmp_path / "names.txt"
    bad_template.write_text("a photo of {c}.\na photo without the class.\n")
    short_names.write_text("one\ntwo\nthree\n")
    extra = [a.format(t=bad_template, n=short_names, d=tmp_path) for a in extra]
    message = message.replace("{d}", str(tmp_path))
    store = tmp_path / "features.zarr"
    args = ["extract", "--model", TEXT, "--split", "prompts", "--store", store, *extra]
    code, _, err = run_cli([*args, "--no-progress"], capsys)
    assert code == 2 and message in one_line_error(err)
    assert not store.exists()


def test_clip_without_the_package_is_one_line(monkeypatch):
    import stages.prompts as prompts

    def missing(name):
        raise prompts.metadata.PackageNotFoundError(name)

    prompts.clip_benchmark_dir.cache_clear()
    prompts.clip_data.cache_clear()
    monkeypatch.setattr(prompts.metadata, "distribution", missing)
    try:
        with pytest.raises(UserError, match="needs CLIP_benchmark's data: install the `protocol`"):
            load_source("digits", "prompts", PromptSpec("clip", "source", "mnist"))
    finally:
        prompts.clip_benchmark_dir.cache_clear()
        prompts.clip_data.cache_clear()


def test_prompt_options_need_the_prompts_split(tmp_path, capsys):
    store = tmp_path / "features.zarr"
    args = ["extract", "--model", TEXT, "--split", "test", "--store", store, "--templates", "clip"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "apply to --split prompts" in one_line_error(err)
    assert not store.exists()


# -- as_open_clip ---------------------------------------------------------------------------------
def test_as_open_clip_gives_the_models_vectors(tmp_path):
    model = AlignedModel.from_run(tiny_run(tmp_path / "run"), device="cpu")
    clip_model, preprocess, tokenizer = model.as_open_clip()
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (30 + i, 41, 3), dtype=np.uint8) for i in range(5)]
    images = [Image.fromarray(p) for p in pixels]
    with torch.no_grad():
        ours = clip_model.encode_image(torch.stack([preprocess(im) for im in images]))
    cosine = torch.nn.functional.cosine_similarity(ours, model.encode_image(images))
    assert ours.shape == (5, 8) and cosine.min() >= 0.999
    texts = ["a photo of a cat.", "7", "a much longer caption that pads the others"]
    tokens = tokenizer(texts)
    assert tokens.dtype == torch.int64 and tokens.shape[:2] == (3, 2)
    with torch.no_grad():
        image_f, text_f, scale = clip_model(torch.stack([preprocess(images[0])]), tokens)
    cosine = torch.nn.functional.cosine_similarity(text_f, model.encode_text(texts))
    assert cosine.min() >= 0.999
    assert float(scale) == pytest.approx(1 / model.temperature)
    with pytest.raises(ValueError, match="encode_text takes what this model's tokenizer"):
        clip_model.encode_text(tokens[:, 0])


# -- the cross-check with CLIP_benchmark ----------------------------------------------------------
def make_caption_pairs(folder: Path, n_images: int = 48) -> Path:
    """A pairs CSV of digits images (PNG), each with two captions no other image has, and a
    label: a retrieval case without tied captions."""
    source = digits_source("test")
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = []
    for i in range(n_images):
        path = folder / f"img{i}.png"
        source.load_image(i).save(path)
        label = words[int(source.manifest["label"][i])]
        for view in ("a scan of", "handwriting showing"):
            rows.append({"image": path.name, "caption": f"{view} {label}, sample {i}",
                         "label": label, "split": "test"})  # fmt: skip
    table = folder / "pairs.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict:
    """A float32 store of digits (train, the whole test split, CLIP-protocol prompts) and of a
    captioned pairs file; a run trained on the digits."""
    root = tmp_path_factory.mktemp("protocol")
    store = str(root / "features.zarr")
    pairs = make_caption_pairs(root)
    for dataset, source, split, limit in (
        ("digits", "digits", "train", 240),
        ("digits", "digits", "test", 0),
        ("digits", "digits", "prompts", 0),
        ("captions", f"pairs:{pairs}", "test", 0),
        ("captions", f"pairs:{pairs}", "prompts", 0),
    ):
        opts = ExtractOptions(**{**FAST.__dict__, "limit": limit, "prompts": CIFAR})
        if split != "prompts":
            extract(store, dataset, split, source, IMAGE, opts)
        extract(store, dataset, split, source, TEXT, opts)
    spec = PairSpec(store=store, dataset="digits", split="train", image_model=IMAGE,
                    text_model=TEXT)  # fmt: skip
    run = root / "run"
    run_align(spec, ("block.1", "layer.1"), SETTINGS, run, progress=False)
    model = AlignedModel.from_run(run, device="cpu")
    return {"store": store, "run": run, "pairs": pairs, "model": model, "root": root}


def ours(checked: dict, dataset: str) -> dict:
    metrics = evaluate_run(checked["run"], checked["store"], dataset, "test")
    return {**metrics["zero_shot"], **metrics["retrieval"]}


def test_clip_benchmark_agrees_without_ties(checked):
    """Captions no two images share: every metric equal. Tolerance: one query (100 / n %),
    for a query whose two best candidates differ by float32 rounding between the batch shapes
    of the two paths; they agree exactly here."""
    source = load_source(f"pairs:{checked['pairs']}", "test")
    record = FeatureStore(checked["store"]).open("captions", "prompts", "text", TEXT).attrs
    theirs = clip_benchmark_metrics(checked["model"], source, record["prompts"])
    mine = ours(checked, "captions")
    assert mine["n_images"] == 48 and mine["n_texts"] == 96
    for key, value in theirs.items():
        n = mine["n_texts"] if key.startswith("t2i") else mine["n_images"]
        assert abs(mine[key] - value) <= 100 / n + 1e-9, (key, mine[key], value)
    assert 0 < mine["top5"] < 100 and 0 < mine["i2t_r5"] < 100  # not a trivial agreement


def test_clip_benchmark_on_the_demo_test_split(checked):
    """The demo's test split: zero-shot (CLIP's CIFAR-10 templates, the record's names) and
    text->image agree; image->text differs, because digits' captions repeat (50 distinct
    strings over 359 images): each image's caption ties with the same caption of other images.
    CLIP_benchmark's torch.topk breaks such ties by position, so its I2T depends on the order of
    the dataset; ours is the exact expectation over a random order of the tied candidates,
    checked here as the mean of CLIP_benchmark's own recall_at_k over random candidate orders."""
    source = digits_source("test")
    record = ours_record(checked)
    theirs = clip_benchmark_metrics(checked["model"], source, record)
    mine = ours(checked, "digits")
    assert mine["n_images"] == 359 and mine["protocol"] == "clip/source (cifar10)"
    assert mine["prompts"]["template_list"] == clip_data("templates")["cifar10"]
    for key in ("top1", "top5", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert abs(mine[key] - theirs[key]) <= 100 / 359 + 1e-9, (key, mine[key], theirs[key])
    reversed_order = clip_benchmark_metrics(
        checked["model"], source, record, order=np.arange(359)[::-1].copy()
    )
    assert reversed_order["i2t_r1"] != theirs["i2t_r1"]  # CLIP_benchmark: order-dependent

    # the same embeddings both ways: CLIP_benchmark's recall_at_k over shuffled candidates
    model = checked["model"]
    pictures = [source.load_image(i) for i in range(359)]
    image_emb = model.encode_image(pictures)
    text_emb = model.encode_text(source.manifest["caption"].tolist())
    owner = torch.as_tensor(source.manifest["image_row"].to_numpy().copy())
    exact = retrieval_recall(image_emb, text_emb, owner)
    assert exact["i2t_r1"] == pytest.approx(mine["i2t_r1"], abs=100 / 359)
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(300):
        order = torch.as_tensor(rng.permutation(len(text_emb)))
        scores = image_emb @ text_emb[order].T
        positive = owner[order][None, :] == torch.arange(359)[:, None]
        hits = zeroshot_retrieval.recall_at_k(scores, positive, k=1) > 0
        draws.append(100 * hits.double().mean().item())
    mean, error = np.mean(draws), np.std(draws) / np.sqrt(len(draws))
    assert abs(mean - exact["i2t_r1"]) < 4 * error + 1e-9, (mean, error, exact["i2t_r1"])


def ours_record(checked: dict) -> dict:
    return FeatureStore(checked["store"]).open("digits", "prompts", "text", TEXT).attrs["prompts"]


def test_classify_uses_the_recorded_prompts(checked, capsys):
    image = checked["root"] / "img0.png"  # made by make_caption_pairs
    store, out = checked["store"], checked["root"] / "c.csv"
    args = ["classify", "--run", checked["run"], "--prompts-dataset", "digits", "--store", store,
            "--top-k", "10", "--csv", out, image]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    table = pd.read_csv(out)
    model, record = checked["model"], ours_record(checked)
    result = model.classify([str(image)], record["class_names"], record["template_list"], k=10)
    expected = [record["class_names"][int(c)] for c in result.top_classes[0]]
    assert table["class"].astype(str).tolist() == expected
    np.testing.assert_allclose(table["probability"], result.top_probs[0].numpy(), atol=1e-6)
    code, _, err = run_cli([*args[:-1], "--labels", "a,b", image], capsys)
    assert code == 2 and "--prompts-dataset takes" in one_line_error(err)


def test_serve_names_the_protocol_evaluate_recorded(checked, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checked["run"], run)
    metrics = evaluate_run(run, checked["store"], "digits", "test")
    (run / "metrics.json").write_text(json.dumps(metrics))
    found = run_protocol(run)
    assert found["protocol"] == "clip/source (cifar10)"
    assert found["prompts"] == metrics["zero_shot"]["prompts"]
    assert found["prompts"]["template_list"][0].count("{c}") == 1
    assert found["evaluated_on"] == {"eval_dataset": "digits", "split": "test",
                                     "prompts_split": "prompts"}  # fmt: skip


def test_sweep_records_the_protocol_and_follows_new_prompts(checked, tmp_path):
    """A complete run is kept, but evaluated again when the prompts were extracted again with
    other templates; sweep.csv and summary.md say which protocol the numbers come from."""
    store = tmp_path / "features.zarr"
    shutil.copytree(checked["store"], store)
    spec = PairSpec(store=str(store), dataset="digits", split="train", image_model=IMAGE,
                    text_model=TEXT)  # fmt: skip
    layers = {"last": ("final_norm", "layer.3"), "similar": ("block.1", "layer.1")}
    sweep = SweepSettings(methods=("linear-similar",), n_pairs=(0,), seeds=(0,))
    out = tmp_path / "sweep"
    base = replace(SETTINGS, epochs=3)
    run_sweep(spec, layers, base, sweep, out, log=lambda _: None)
    first = pd.read_csv(out / "sweep.csv")
    assert first["zs_protocol"].tolist() == ["clip/source (cifar10)"]
    assert (
        "Zero-shot prompts (templates/class names): clip/source (cifar10)."
        in (out / "summary.md").read_text()
    )

    opts = ExtractOptions(**{**FAST.__dict__, "overwrite": True, "prompts": PromptSpec()})
    extract(str(store), "digits", "prompts", "digits", TEXT, opts)
    run_sweep(spec, layers, base, sweep, out, log=lambda _: None)
    again = pd.read_csv(out / "sweep.csv")
    assert again["zs_protocol"].tolist() == ["simple/source"]
    assert again["train_seconds"].tolist() == first["train_seconds"].tolist()  # not retrained
    run_dir = next((out / "runs").rglob("metrics.json")).parent
    expected = evaluate_run(run_dir, store, "digits", "test")["zero_shot"]
    assert again["zs_top1"][0] == pytest.approx(expected["top1"], abs=1e-4)


def test_classify_with_template_protocols(checked, tmp_path, capsys):
    image = checked["root"] / "img1.png"
    out = tmp_path / "c.csv"
    names = ["zero", "one", "two", "three"]
    args = ["classify", "--run", checked["run"], "--labels", ",".join(names), "--templates",
            "clip", "--protocol-dataset", "mnist", "--csv", out, "--top-k", "4", image]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    templates = clip_data("templates")["mnist"]
    result = checked["model"].classify([str(image)], names, templates, k=4)
    table = pd.read_csv(out)
    assert table["class"].tolist() == [names[int(c)] for c in result.top_classes[0]]
    np.testing.assert_allclose(table["probability"], result.top_probs[0].numpy(), atol=1e-6)


def test_table_names_the_protocol_of_each_row(tmp_path):
    from types import SimpleNamespace

    from stages.table import write_table_files

    jobs = []
    for method, protocol in (("linear-last", "clip/clip (cifar10)"), ("csa-similar-rs", None)):
        run = tmp_path / method
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"head": method.split("-")[0]}))
        zero_shot = {"top1": 50.0, "top5": 90.0, **({"protocol": protocol} if protocol else {})}
        retrieval = {f"{d}_r{k}": 10.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
        metrics = {"zero_shot": zero_shot, "retrieval": retrieval}
        (run / "metrics.json").write_text(json.dumps(metrics))
        jobs.append(SimpleNamespace(method=method, run_dir=run))
    write_table_files(tmp_path, pd.DataFrame(), jobs)
    table = pd.read_csv(tmp_path / "table.csv")
    assert table["zs protocol"].tolist() == ["clip/clip (cifar10)", "unrecorded"]
    assert "| clip/clip (cifar10) |" in (tmp_path / "table.md").read_text()


def test_imagenet_folder_of_wordnet_ids_gets_the_curated_names(tmp_path):
    for wnid in ("n01440764", "n02123045"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / wnid / "a.png")
    spec = PromptSpec(dataset="imagenet")  # the defaults: simple templates, the labels' names
    source = load_source(f"imagefolder:{tmp_path}", "prompts", spec)
    assert source.prompts["class_names"] == ["tench", "tabby cat"]
    assert source.prompts["classnames"] == "wordnet"
    captions = source.manifest["caption"].tolist()
    assert captions[:2] == ["a photo of a tench.", "a blurry photo of a tench."]
    # the labels keep their folder names: the test split's images and the prompts agree on them
    assert set(source.manifest["label_name"]) == {"n01440764", "n02123045"}
    spec = PromptSpec("clip", "clip", dataset="imagenet")
    clip = load_source(f"imagefolder:{tmp_path}", "prompts", spec)
    assert clip.prompts["protocol_dataset"] == "imagenet1k"
    assert len(clip.prompts["template_list"]) == 80 == len(clip_data("templates")["imagenet1k"])
