"""The encoder families' registry: a family registered from this file alone loads, cuts, saves
and loads again its models through the aligned model and its export; the built-in ones claim
their specs; and raw inputs reach any encoder through one path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from stages.encoders import (
    FAMILIES,
    Encoder,
    EncoderFamily,
    family_of,
    load_encoder,
    register_family,
    truncate_encoder,
)
from stages.encoders.base import save_weights
from store import UserError


class ToyNet(torch.nn.Module):
    """N blocks of tanh(Linear(12, 12)) on the pixels of a 2 x 2 RGB thumbnail."""

    def __init__(self, n_blocks: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(12, 12) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        layers = []
        for block in self.blocks:
            x = torch.tanh(block(x))
            layers.append(x)
        return layers


def toy_encoder(spec: str, model: ToyNet, n_blocks: int) -> Encoder:
    def prepare(image: Image.Image) -> torch.Tensor:
        pixels = torch.tensor(list(image.convert("RGB").resize((2, 2)).getdata()))
        return pixels.float().flatten() / 255

    return Encoder(
        spec=spec, model_id=spec, revision="toy", modality="image", pooling="none",
        layer_names=[f"block.{i}" for i in range(n_blocks)] + ["final_norm"],
        layer_dims=[12] * (n_blocks + 1), model=model.eval().requires_grad_(False),
        prepare=prepare, collate=lambda items: {"x": torch.stack(items)},
        embed=lambda batch: (lambda out: [*out, out[-1]])(model(batch["x"])),
        config={"toy": n_blocks}, family="toy",
    )  # fmt: skip


class ToyFamily(EncoderFamily):
    """`toy:N`: N random blocks, seeded."""

    name = "toy"

    def claims(self, spec: str) -> bool:
        return spec.startswith("toy:")

    def load(self, spec, revision=None, trust_remote_code=False, weights=None) -> Encoder:
        n_blocks = int(spec.removeprefix("toy:"))
        torch.manual_seed(n_blocks)
        return toy_encoder(spec, ToyNet(n_blocks), n_blocks)

    def cut(self, encoder: Encoder, keep: int) -> int:
        encoder.model.blocks = encoder.model.blocks[: max(keep, 1)]
        return max(keep, 1)

    def save(self, encoder: Encoder, folder: Path) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(encoder.model, folder / "model.safetensors")
        return {"toy": {"blocks": encoder.config["toy"]}}

    def load_saved(self, folder, recipe, trust_remote_code) -> Encoder:
        n_blocks = recipe["toy"]["blocks"]
        return toy_encoder(f"toy:{n_blocks}", ToyNet(n_blocks), n_blocks)

    def preprocessing(self, encoder: Encoder) -> dict:
        return {"thumbnail": 2}


@pytest.fixture
def toy_family():
    register_family(ToyFamily)
    yield FAMILIES["toy"]
    del FAMILIES["toy"]


def test_built_in_families_claim_their_specs(tmp_path):
    assert list(FAMILIES) == ["hf", "timm", "tiny"]
    assert family_of(load_encoder("tiny-random-text")).name == "tiny"
    assert FAMILIES["timm"].claims("timm:resnet18") and FAMILIES["hf"].claims("org/name")
    assert FAMILIES["hf"].claims(str(tmp_path))  # a local directory
    with pytest.raises(UserError, match="unknown model 'nonsense'"):
        load_encoder("nonsense")
    with pytest.raises(UserError, match="--weights is for timm"):
        load_encoder("tiny-random-vit", weights="w.safetensors")
    with pytest.raises(UserError, match="model directory ./nowhere does not exist"):
        load_encoder("./nowhere")


def test_a_family_registered_here_runs_through_the_model_and_its_export(toy_family, tmp_path):
    from safetensors.torch import load_file

    from stages.heads import build_head, save_run
    from stages.model import AlignedModel, export_model

    encoder = load_encoder("toy:3")
    assert family_of(encoder) is toy_family
    pictures = [Image.new("RGB", (5, 7), color) for color in ("red", "navy")]
    whole = encoder.embed(encoder.collate([encoder.prepare(p) for p in pictures]))
    assert truncate_encoder(encoder, encoder.layer_names.index("block.0")) == 1

    text = load_encoder("tiny-random-text")
    config = {
        "image_model": "toy:3", "text_model": "tiny-random-text", "image_layer": "block.0",
        "text_layer": "layer.0", "head": "linear", "image_dim": 12, "text_dim": 64,
        "out_dim": 4, "temperature": 0.05,
        "store_fingerprint": {"image": {"model_fingerprint": load_encoder("toy:3").fingerprint()},
                              "text": {"model_fingerprint": text.fingerprint()}},
    }  # fmt: skip
    torch.manual_seed(0)
    heads = [build_head("linear", config[f"{s}_dim"], 4) for s in ("image", "text")]
    save_run(tmp_path / "run", *heads, config)
    model = AlignedModel.from_run(tmp_path / "run", device="cpu")
    assert model.blocks["image"] == (1, 3)
    expected = model.encode_image(pictures)
    with torch.no_grad():
        by_hand = torch.nn.functional.normalize(heads[0](whole[0]), dim=1)
    torch.testing.assert_close(expected, by_hand)

    export = export_model(tmp_path / "run", tmp_path / "export", with_encoders=True)
    assert export["image"]["family"] == "toy" and export["image"]["toy"] == {"blocks": 3}
    saved = load_file(tmp_path / "export" / "image_encoder" / "model.safetensors")
    assert sorted(saved) == ["blocks.0.bias", "blocks.0.weight"]  # blocks 1 and 2 never run
    loaded = AlignedModel.from_pretrained(tmp_path / "export", device="cpu")
    torch.testing.assert_close(loaded.encode_image(pictures), expected, rtol=0, atol=0)


def test_an_export_of_an_unknown_family_is_one_line(toy_family, tmp_path):
    from stages.heads import build_head, save_run
    from stages.model import AlignedModel, export_model

    config = {
        "image_model": "toy:2", "text_model": "tiny-random-text", "image_layer": "block.1",
        "text_layer": "layer.0", "head": "linear", "image_dim": 12, "text_dim": 64,
        "out_dim": 4, "temperature": 0.05,
    }  # fmt: skip
    save_run(tmp_path / "run", build_head("linear", 12, 4), build_head("linear", 64, 4), config)
    export_model(tmp_path / "run", tmp_path / "export", with_encoders=True)
    del FAMILIES["toy"]
    try:
        with pytest.raises(UserError, match="encoder family 'toy', which this version"):
            AlignedModel.from_pretrained(tmp_path / "export", device="cpu")
    finally:
        register_family(ToyFamily)
