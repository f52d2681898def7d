"""Compute precision (--precision fp32|bf16|auto), channels-last CNNs and folded batch norms:
what each changes in the features, and that a store never mixes precisions."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from stages.encoders import load_encoder, save_encoder
from stages.encoders.base import Encoder, spatial_mean, stack_pixels
from stages.encoders.fold import ConvActivation, OneDNNLinear, fuse_for_inference
from stages.encoders.precision import AUTO_ENV, place_encoder, resolve_precision
from stages.extract import ExtractOptions, extract
from stages.model import AlignedModel
from store import FeatureStore, UserError
from tests.helpers import (
    files,
    fill_disk_after,
    one_line_error,
    run_cli,
    save_random_timm,
    save_tiny_resnet,
)
from tests.model_helpers import tiny_run

CPU = torch.device("cpu")
FAST = ExtractOptions(batch_size=24, block_rows=64, num_workers=0, progress=False, limit=150)


def images(n: int, size: int = 96) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def pooled(encoder: Encoder, pictures: list[Image.Image]) -> list[torch.Tensor]:
    batch = encoder.collate([encoder.prepare(p) for p in pictures])
    with torch.inference_mode():
        return [x.double() for x in encoder.embed(batch)]


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def shuffle_norm_statistics(model: torch.nn.Module, seed: int = 0) -> None:
    """Trained-looking batch norms (random init has mean 0, var 1, scale 1, shift 0, which a
    wrong fold would pass unnoticed)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)


def test_precision_rule(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)
    import stages.encoders.precision as precision

    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setenv(AUTO_ENV, "bf16")  # pins what auto means; an explicit value still wins
    assert resolve_precision("auto", CPU) == "bf16" and resolve_precision("fp32", CPU) == "fp32"
    for bad in ("fp16", "float32", ""):
        with pytest.raises(UserError, match="--precision must be one of auto, fp32, bf16"):
            resolve_precision(bad, CPU)
    monkeypatch.setenv(AUTO_ENV, "half")
    with pytest.raises(UserError, match=AUTO_ENV):
        resolve_precision("auto", CPU)


def test_bf16_agrees_with_fp32_on_real_size_architectures(tmp_path):
    """A DINOv2-S-size ViT (12 blocks, width 384, 224 px) and EfficientNet-Lite0 (trained-like
    norms, folded, channels-last): every layer's pooled features in bf16 at cosine >= 0.999 to
    fp32, per row."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_attention_heads=6, patch_size=14)  # ViT-S/14
    Dinov2Model(config).save_pretrained(tmp_path / "vit")
    crop = {"height": 224, "width": 224}
    processor = BitImageProcessor(size={"shortest_edge": 224}, crop_size=crop)
    processor.save_pretrained(tmp_path / "vit")
    weights = tmp_path / "lite0.safetensors"
    save_random_timm("efficientnet_lite0", weights)
    pictures = images(3)
    for spec, extra in (
        (str(tmp_path / "vit"), {}),
        ("timm:efficientnet_lite0", {"weights": str(weights)}),
    ):
        fp32, bf16 = (load_encoder(spec, **extra) for _ in range(2))
        for encoder in (fp32, bf16):
            shuffle_norm_statistics(encoder.model)
        place_encoder(fp32, CPU, "fp32")
        place_encoder(bf16, CPU, "bf16")
        assert next(bf16.model.parameters()).dtype == torch.bfloat16
        assert len(fp32.layer_names) >= 6
        for name, a, b in zip(
            fp32.layer_names, pooled(fp32, pictures), pooled(bf16, pictures), strict=True
        ):
            worst = row_cosines(a, b).min().item()
            assert worst >= 0.999, (spec, name, worst)


def test_folded_norms_give_the_unfolded_features_and_are_put_back_on_save(tmp_path):
    """timm (BatchNormAct2d) and Hugging Face (BatchNorm2d) CNNs: the folded model's pooled
    layers equal the model as loaded (float32), and save_encoder writes the loaded weights."""
    weights = tmp_path / "r.safetensors"
    save_random_timm("resnet18", weights)
    specs = [
        ("timm:resnet18", {"weights": str(weights)}),
        (str(save_tiny_resnet(tmp_path / "hf")), {}),
    ]
    pictures = images(4)
    for spec, extra in specs:
        loaded = load_encoder(spec, **extra)
        shuffle_norm_statistics(loaded.model)
        state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        want = pooled(loaded, pictures)
        n_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())
        place_encoder(loaded, CPU, "fp32")
        left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())
        assert n_norms > 0 and left < n_norms / 2, (spec, n_norms, left)  # most folded
        for a, b in zip(pooled(loaded, pictures), want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
        save_encoder(loaded, tmp_path / "saved")
        saved = loaded.model.state_dict()
        assert saved.keys() == state.keys()
        assert all(torch.equal(saved[k], state[k]) for k in state)


def test_fused_linears_give_the_loaded_features_and_are_put_back_on_save(tmp_path):
    """Transformers (image and text) on the CPU: linears computed by oneDNN with the GELU after
    them fused give the features of the model as loaded (float32); the state dict keeps its
    keys, and save_encoder writes the loaded modules."""
    inputs = {"tiny-random-vit": images(4, 32), "tiny-random-text": ["a 7.", "a photo of a 3."]}
    for spec, items in inputs.items():
        encoder = load_encoder(spec)
        state = {k: v.clone() for k, v in encoder.model.state_dict().items()}
        batch = encoder.collate([encoder.prepare(x) for x in items])
        with torch.inference_mode():
            want = [x.double() for x in encoder.embed(batch)]
        place_encoder(encoder, CPU, "fp32")
        fused = [m for m in encoder.model.modules() if isinstance(m, OneDNNLinear)]
        assert len(fused) >= 4 * 6, spec  # q, k, v, out, and the two MLP linears per block
        assert sum(m.post_op[0] == "gelu" for m in fused) == 4, spec  # each block's MLP
        assert encoder.model.state_dict().keys() == state.keys()
        with torch.inference_mode():
            got = [x.double() for x in encoder.embed(batch)]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        save_encoder(encoder, tmp_path / spec)
        assert not any(isinstance(m, OneDNNLinear) for m in encoder.model.modules())
        saved = encoder.model.state_dict()
        assert all(torch.equal(saved[k], state[k]) for k in state)


def test_bf16_without_onednn_kernels_runs_unfused(monkeypatch, tmp_path):
    """A CPU without AVX-512 has no oneDNN bf16 linear or convolution ('could not create a
    primitive descriptor'): a bf16 encoder is then the loaded model cast to bf16, unfused,
    and gives exactly its features (a ViT's linears and a CNN's convolutions)."""
    mkldnn = torch.ops.mkldnn

    def float32_only(kernel):
        def call(x, *args):
            if x.dtype != torch.float32:
                raise RuntimeError("could not create a primitive descriptor (simulated)")
            return kernel(x, *args)

        return call

    weights = tmp_path / "lite0.safetensors"  # BatchNormAct2d: convolutions fused with ReLU6
    save_random_timm("efficientnet_lite0", weights)
    cases = (("tiny-random-vit", {}), ("timm:efficientnet_lite0", {"weights": str(weights)}))
    for name in ("_linear_pointwise", "_convolution_pointwise"):
        monkeypatch.setattr(mkldnn, name, float32_only(getattr(mkldnn, name)))
    for spec, extra in cases:
        placed, plain = load_encoder(spec, **extra), load_encoder(spec, **extra)
        for encoder in (placed, plain):
            shuffle_norm_statistics(encoder.model)
        place_encoder(placed, CPU, "bf16")
        plain.model.to(dtype=torch.bfloat16)
        if spec.startswith("timm:"):
            plain.model.to(memory_format=torch.channels_last)
        assert not placed.unfolded, spec
        fused = (OneDNNLinear, ConvActivation)
        assert not any(isinstance(m, fused) for m in placed.model.modules()), spec
        assert all(p.dtype == torch.bfloat16 for p in placed.model.parameters())
        for a, b in zip(pooled(placed, images(2, 64)), pooled(plain, images(2, 64)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class SkipsPastTheNorm(torch.nn.Module):
    """conv -> norm, but the convolution's output is also added after the norm: folding would
    change the sum, so the fold is refused."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)

    def forward(self, pixel_values):
        maps = self.conv(pixel_values)
        return self.norm(maps) + maps


def test_a_norm_that_cannot_fold_is_left_as_it_was():
    model = SkipsPastTheNorm().eval()
    shuffle_norm_statistics(model)

    def prepare(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)

    encoder = Encoder(
        spec="skip", model_id="skip", revision="", modality="image", pooling="gap",
        layer_names=["final"], layer_dims=[4], model=model, prepare=prepare,
        collate=stack_pixels, embed=lambda batch: [spatial_mean(model(batch["pixel_values"]))],
    )  # fmt: skip
    want = pooled(encoder, images(2))
    assert fuse_for_inference(encoder) == 0
    assert isinstance(model.norm, torch.nn.BatchNorm2d) and not encoder.unfolded
    torch.testing.assert_close(pooled(encoder, images(2)), want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory) -> str:
    return str(save_tiny_resnet(tmp_path_factory.mktemp("models") / "tiny-resnet"))


def test_precision_is_recorded_and_never_mixed_in_one_array(tmp_path, capsys, tiny_resnet):
    store = tmp_path / "s.zarr"
    args = ["extract", "--store", store, "--model", tiny_resnet, "--limit", "30",
            "--num-workers", "0", "--no-progress"]  # fmt: skip
    code, out, _ = run_cli([*args, "--precision", "bf16"], capsys)
    assert code == 0 and "rows/s, bf16)" in out
    array = FeatureStore(store).open("digits", "train", "image", tiny_resnet)
    assert array.attrs["precision"] == "bf16"
    before = files(store)
    code, _, err = run_cli([*args, "--precision", "fp32"], capsys)
    assert code == 2 and "different precision" in one_line_error(err)
    code, _, err = run_cli([*args, "--precision", "fp16"], capsys)
    assert code == 2 and "--precision must be one of" in one_line_error(err)
    assert files(store) == before  # neither refused run wrote anything
    fresh = tmp_path / "fresh.zarr"
    code, _, err = run_cli(["extract", "--store", fresh, "--precision", "half"], capsys)
    assert code == 2 and not fresh.exists()


def test_a_bf16_run_resumed_is_byte_identical(tmp_path, monkeypatch, tiny_resnet):
    """The disk fills up after one block of a bf16 CNN run (folded, channels-last); the same
    command finishes it byte-identical to an uninterrupted bf16 run."""
    opts = replace(FAST, precision="bf16")
    clean = tmp_path / "clean.zarr"
    extract(str(clean), "digits", "train", "digits", tiny_resnet, opts)
    fill_disk_after(monkeypatch, 7)  # block 0's 6 layers, then 1 layer of block 1
    store = tmp_path / "s.zarr"
    with pytest.raises(Exception, match="no space left on the device"):
        extract(str(store), "digits", "train", "digits", tiny_resnet, opts)
    monkeypatch.undo()
    array = FeatureStore(store).open("digits", "train", "image", tiny_resnet, check_source=False)
    assert array.completed_blocks().tolist() == [True, False, False]
    extract(str(store), "digits", "train", "digits", tiny_resnet, opts)
    assert files(store / "digits") == files(clean / "digits")
    fp32 = tmp_path / "fp32.zarr"
    extract(str(fp32), "digits", "train", "digits", tiny_resnet, replace(opts, precision="fp32"))
    a = FeatureStore(store).open("digits", "train", "image", tiny_resnet).read_layer("final")
    b = FeatureStore(fp32).open("digits", "train", "image", tiny_resnet).read_layer("final")
    assert (
        not np.array_equal(a, b)
        and row_cosines(torch.from_numpy(a), torch.from_numpy(b)).min() >= 0.99
    )


def test_aligned_model_runs_its_encoders_in_the_precision_asked(tmp_path):
    run = tiny_run(tmp_path / "run")
    fp32 = AlignedModel.from_run(run, device="cpu", precision="fp32")
    bf16 = AlignedModel.from_run(run, device="cpu", precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert {next(e.model.parameters()).dtype for e in bf16.encoders.values()} == {torch.bfloat16}
    pictures, texts = images(3, 32), ["a photo of a 3.", "a 7."]
    for a, b in ((fp32.encode_image(pictures), bf16.encode_image(pictures)),
                 (fp32.encode_text(texts), bf16.encode_text(texts))):  # fmt: skip
        assert a.dtype == b.dtype == torch.float32
        assert not torch.equal(a, b) and row_cosines(a, b).min() >= 0.99
    with pytest.raises(UserError, match="--precision must be one of"):
        AlignedModel.from_run(run, device="cpu", precision="fp16")


def test_an_array_from_before_precisions_were_recorded(tmp_path):
    """Complete: kept as it is (nothing is computed, so nothing can mix). Incomplete: refused,
    since its rows' precision is unknown."""
    import zarr

    opts = replace(FAST, precision="bf16")
    store = tmp_path / "s.zarr"
    extract(str(store), "digits", "train", "digits", "tiny-random-vit", opts)
    array = FeatureStore(store).open("digits", "train", "image", "tiny-random-vit")
    group = zarr.open_group(str(store), mode="r+")[array.path]
    del group.attrs["precision"]  # as an older version wrote it
    before = files(store)
    extract(str(store), "digits", "train", "digits", "tiny-random-vit", opts)
    assert files(store) == before
    group["complete"][1] = False  # an interrupted older run
    with pytest.raises(UserError, match="different precision"):
        extract(str(store), "digits", "train", "digits", "tiny-random-vit", opts)
