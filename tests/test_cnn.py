"""Image encoders whose layers differ in width: timm CNNs and Swin from local weight files,
Hugging Face CNNs, and the stages end to end on a store of such layers."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stages.encoders import load_encoder
from store import FeatureStore, UserError
from tests.helpers import (
    one_line_error,
    run_cli,
    save_random_timm,
    save_tiny_hf_maps,
    save_tiny_resnet,
)


# -- hand computations: the model run module by module, every stage map averaged over H, W --
def resnet_by_hand(model, x):
    x = model.act1(model.bn1(model.conv1(x)))
    stages = [x]
    x = model.maxpool(x)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        stages.append(x)
    pooled = [s.mean(dim=(2, 3)) for s in stages]
    return pooled + [pooled[-1]]  # the model's embedding: global average pooling of layer4


def convnext_by_hand(model, x):
    x, pooled = model.stem(x), []
    for stage in model.stages:
        x = stage(x)
        pooled.append(x.mean(dim=(2, 3)))
    norm = model.head.norm  # ConvNeXt normalises after pooling
    return pooled + [F.layer_norm(pooled[-1], norm.weight.shape, norm.weight, norm.bias, norm.eps)]


def swin_by_hand(model, x):
    x, pooled = model.patch_embed(x), []  # Swin's stages are (B, H, W, C)
    for layer in model.layers:
        x = layer(x)
        pooled.append(x.mean(dim=(1, 2)))
    return pooled + [model.norm(x).mean(dim=(1, 2))]


# name: (hand computation, layer widths, image side, architecture changes that keep tests fast)
SMALL_SWIN = {"img_size": 64, "window_size": 2, "embed_dim": 24, "depths": (1, 1, 1, 1)}
TIMM_CASES = {
    "resnet18": (resnet_by_hand, [64, 64, 128, 256, 512, 512], 64, {}),
    "convnext_atto": (convnext_by_hand, [40, 80, 160, 320, 320], 64, {}),
    "swin_tiny_patch4_window7_224": (swin_by_hand, [24, 48, 96, 192, 192], 64, SMALL_SWIN),
}


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_map_models_from_local_weights(tmp_path, monkeypatch, name):
    import timm

    by_hand, widths, side, changes = TIMM_CASES[name]
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *args, **kw: create(*args, **kw, **changes))
    state = save_random_timm(name, tmp_path / "w.safetensors")
    encoder = load_encoder(f"timm:{name}", weights=str(tmp_path / "w.safetensors"))
    n_stages = len(widths) - 1
    assert encoder.layer_names == [f"stage.{i}" for i in range(n_stages)] + ["final"]
    assert encoder.layer_dims == widths and encoder.pooling == "gap"
    loaded = encoder.model.state_dict()  # the file's weights, not timm's random init
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)

    # workers give uint8 images; embed scales and normalises them with timm's data config
    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, side, side)))
    config = timm.data.resolve_model_data_config(encoder.model)
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        got = encoder.embed({"pixel_values": raw.to(torch.uint8)})
        want = by_hand(encoder.model, (raw.float() / 255 - mean) / std)
    assert [tuple(t.shape) for t in got] == [(2, w) for w in widths]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)

    # preprocessing from timm's config for the name: uint8 crops in the workers that, scaled
    # and normalised on the device, are the pixels of timm's own eval transform
    from PIL import Image

    image = Image.fromarray(np.uint8(np.random.default_rng(1).integers(0, 256, (260, 300, 3))))
    pixels = encoder.prepare(image)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == config["input_size"]
    timm_pixels = timm.data.create_transform(**config, is_training=False)(image)
    torch.testing.assert_close((pixels.float() / 255 - mean[0]) / std[0], timm_pixels)


def test_fingerprint_covers_the_weights_file(tmp_path):
    state = save_random_timm("resnet18", tmp_path / "a.safetensors")
    save_file({**state, "fc.weight": state["fc.weight"] + 1}, tmp_path / "head.safetensors")
    save_file({**state, "layer1.0.conv1.weight": -state["layer1.0.conv1.weight"]},
              tmp_path / "b.safetensors")  # fmt: skip
    torch.save(state, tmp_path / "a.pth")  # a plain state dict: loads with weights_only=True
    prints = {
        f: load_encoder("timm:resnet18", weights=str(tmp_path / f)).fingerprint()
        for f in ("a.safetensors", "b.safetensors", "head.safetensors", "a.pth")
    }
    assert prints["a.safetensors"] != prints["b.safetensors"]
    # the classifier is not part of the encoder, but the file's content is fingerprinted
    assert prints["a.safetensors"] != prints["head.safetensors"]
    assert len(set(prints.values())) == 4


class NotATensor:
    pass


def test_weights_errors(tmp_path, capsys):
    state = save_random_timm("resnet18", tmp_path / "r.safetensors")
    torch.save({"state_dict": state, "extra": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match="weights_only=True"):
        load_encoder("timm:resnet18", weights=str(tmp_path / "pickled.pth"))
    with pytest.raises(UserError, match="does not fit timm:convnext_atto"):
        load_encoder("timm:convnext_atto", weights=str(tmp_path / "r.safetensors"))
    with pytest.raises(UserError, match="no such file"):
        load_encoder("timm:resnet18", weights=str(tmp_path / "missing.safetensors"))
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(UserError, match=".safetensors, .pth"):
        load_encoder("timm:resnet18", weights=str(tmp_path / "w.npz"))
    args = ["extract", "--store", tmp_path / "s.zarr", "--limit", "4", "--num-workers", "0"]
    code, _, err = run_cli([*args, "--weights", tmp_path / "r.safetensors"], capsys)
    assert code == 2 and "--weights is for timm:<name> models" in one_line_error(err)


def test_hf_resnet_stages_are_pooled_maps(tmp_path):
    """A Hugging Face CNN (save_pretrained layout): the stem and every stage averaged over
    H, W, then the model's pooled output, from the processor's own pixels."""
    from PIL import Image
    from transformers import AutoImageProcessor

    directory = save_tiny_resnet(tmp_path / "resnet")
    encoder = load_encoder(str(directory))
    assert encoder.layer_names == ["stage.0", "stage.1", "stage.2", "stage.3", "stage.4", "final"]
    assert encoder.layer_dims == [8, 8, 16, 24, 32, 32] and encoder.pooling == "gap"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(np.uint8(rng.integers(0, 255, (50, 70, 3)))) for _ in range(3)]
    pixels = AutoImageProcessor.from_pretrained(directory)(images=images, return_tensors="pt")
    with torch.no_grad():
        got = encoder.embed(encoder.collate([encoder.prepare(im) for im in images]))
        hidden = encoder.model(**pixels, output_hidden_states=True).hidden_states
    want = [h.double().mean(dim=(2, 3)) for h in hidden]
    want.append(want[-1])  # ResNet's pooler: global average pooling of the last stage
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.double().numpy(), w.numpy(), rtol=1e-5, atol=1e-6)


def test_mixed_width_store_through_select_align_evaluate(tmp_path, capsys, monkeypatch):
    """A CNN (layers 8 to 32 wide) and a text model: extract, store ls, select, align on a
    narrow stage and on `auto`, evaluate: every stage reads its layer at its own width."""
    monkeypatch.chdir(tmp_path)  # no params.yaml: the flags below are all there is
    resnet = str(save_tiny_resnet(tmp_path / "resnet"))
    store = tmp_path / "s.zarr"
    common = ["--store", store, "--num-workers", "0", "--block-rows", "64"]
    for model, split, limit in [
        (resnet, "train", 200), ("tiny-random-text", "train", 200),
        (resnet, "test", 60), ("tiny-random-text", "test", 60), ("tiny-random-text", "prompts", 0),
    ]:  # fmt: skip
        code, _, err = run_cli(
            ["extract", "--model", model, "--split", split, "--limit", limit, *common], capsys
        )
        assert code == 0, err
    code, out, _ = run_cli(["store", "ls", "--store", store], capsys)
    assert code == 0 and "8-32" in out

    models = ["--image-model", resnet, "--text-model", "tiny-random-text", "--store", store]
    code, _, err = run_cli(["select", *models, "--out", tmp_path / "sel", "--k", "5"], capsys)
    assert code == 0, err
    selection = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert selection["last_image_layer"] == "final"
    array = FeatureStore(store).open("digits", "train", "image", resnet)
    train = ["--epochs", "3", "--warmup-steps", "2", "--out-dim", "8", "--no-progress"]
    # the narrow stage streamed from the store in windows (a tiny memory cap), auto in memory
    for layers, run, cap in (("stage.2,layer.0", "narrow", "8KiB"), ("auto", "auto", "0")):
        code, _, err = run_cli(
            ["align", *models, "--layers", layers, "--select-dir", tmp_path / "sel",
             "--out", tmp_path / run, "--memory-cap", cap, *train],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert config["streamed_from_store"] == (run == "narrow")
        chosen = config["image_layer"] if run == "narrow" else selection["image_layer"]
        assert config["image_layer"] == chosen
        from safetensors.torch import load_file

        heads = load_file(tmp_path / run / "head.safetensors")
        width = array.layer_dims[array.layer_index(chosen)]
        assert any(v.ndim == 2 and v.shape[1] == width for k, v in heads.items() if "image" in k)
        code, _, err = run_cli(["evaluate", "--run", tmp_path / run, "--store", store], capsys)
        assert code == 0, err
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert 0 <= metrics["zero_shot"]["top1"] <= 100
    assert json.loads((tmp_path / "narrow" / "config.json").read_text())["image_layer"] == "stage.2"

    # the run as a model: the CNN cut after stage.2, raw test images through it equal the head
    # on the stored (float16) stage.2 features
    from stages.datasets import digits_source
    from stages.model import AlignedModel

    model = AlignedModel.from_run(tmp_path / "narrow", device="cpu")
    assert model.blocks["image"] == (3, 5)
    stored = FeatureStore(store).open("digits", "test", "image", resnet).read_layer("stage.2")
    with torch.no_grad():
        want = model.heads["image"](torch.from_numpy(stored)).double()
    want = want / want.norm(dim=1, keepdim=True)
    source = digits_source("test")
    raw = model.encode_image([source.load_image(i) for i in range(len(stored))]).double()
    assert (raw * want).sum(1).min() >= 0.999


# -- run only up to the chosen stage ------------------------------------------------------------
def record_runs(modules: list[torch.nn.Module]) -> list[int]:
    """Hooks on `modules`: the list fills with the position of each one that runs."""
    ran: list[int] = []
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda *_, i=i: ran.append(i))
    return ran


# the stage modules after the stem, with the index of the `stage.i` layer each one outputs
TIMM_STAGES = {
    "resnet18": lambda m: [(getattr(m, f"layer{i}"), i) for i in range(1, 5)],  # stage.0: stem
    "convnext_atto": lambda m: [(s, i) for i, s in enumerate(m.stages)],
    "swin_tiny_patch4_window7_224": lambda m: [(s, i) for i, s in enumerate(m.layers)],
}


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_map_models_run_only_up_to_the_chosen_stage(tmp_path, monkeypatch, name):
    """Cut at stage.2: the later stages never run, and the stages kept give the pooled values
    of the whole model (the hand computation above) and of extraction's embed."""
    import timm

    from stages.encoders import truncate_encoder

    by_hand, widths, side, changes = TIMM_CASES[name]
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *args, **kw: create(*args, **kw, **changes))
    save_random_timm(name, tmp_path / "w.safetensors")
    encoder = load_encoder(f"timm:{name}", weights=str(tmp_path / "w.safetensors"))
    stages = TIMM_STAGES[name](encoder.model)
    ran = record_runs([module for module, _ in stages])
    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, side, side)))
    batch = {"pixel_values": raw.to(torch.uint8)}
    config = timm.data.resolve_model_data_config(encoder.model)
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        want = by_hand(encoder.model, (raw.float() / 255 - mean) / std)
        ran.clear()
        whole = encoder.embed(batch)
    assert ran == list(range(len(stages)))
    ran.clear()

    assert truncate_encoder(encoder, encoder.layer_names.index("stage.2")) == 3
    with torch.no_grad():
        cut = encoder.embed(batch)
    assert ran == [pos for pos, (_, layer) in enumerate(stages) if layer <= 2]
    assert len(cut) == 3
    for i in range(3):
        torch.testing.assert_close(cut[i], whole[i], rtol=0, atol=0)
        torch.testing.assert_close(cut[i], want[i], rtol=1e-4, atol=1e-4)
    # the stages after it are gone from the model (and from its weights), not only skipped
    inside = {id(m) for m in encoder.model.modules()}
    assert [layer for module, layer in stages if id(module) in inside] == [
        layer for _, layer in stages if layer <= 2
    ]


@pytest.mark.parametrize("kind", ["resnet", "convnext", "swin"])
def test_hf_map_models_run_only_up_to_the_chosen_stage(tmp_path, kind):
    """Hugging Face ResNet, ConvNeXt, Swin cut at stage.2 (the stem and two stages): the last
    two stages never run and stage.0-2 equal the whole model's pooled values."""
    from stages.encoders import truncate_encoder

    directory = tmp_path / kind
    if kind == "resnet":
        save_tiny_resnet(directory)
    else:
        save_tiny_hf_maps(kind, directory)
    encoder = load_encoder(str(directory))
    stages = getattr(encoder.model.encoder, "layers" if kind == "swin" else "stages")
    ran = record_runs(list(stages))
    pixels = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    batch = encoder.collate([encoder.prepare(image_from(p)) for p in pixels])
    with torch.no_grad():
        whole = encoder.embed(batch)
    assert ran == [0, 1, 2, 3]
    ran.clear()
    assert truncate_encoder(encoder, encoder.layer_names.index("stage.2")) == 3
    with torch.no_grad():
        cut = encoder.embed(batch)
    assert ran == [0, 1]
    for i in range(3):
        torch.testing.assert_close(cut[i], whole[i], rtol=0, atol=0)
    inside = {id(m) for m in encoder.model.modules()}
    assert [id(s) in inside for s in stages] == [True, True, False, False]
    # a second cut for a layer still computed changes nothing
    assert truncate_encoder(encoder, encoder.layer_names.index("stage.1")) == 3


def image_from(chw: torch.Tensor):
    from PIL import Image

    return Image.fromarray(chw.permute(1, 2, 0).numpy())
