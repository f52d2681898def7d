"""A trained run as a model: new images and texts in, unit vectors of the shared space out.

    model = AlignedModel.from_run("runs/align/similar-rs")       # or .from_pretrained(EXPORT_DIR)
    image = model.encode_image(["cat.jpg", "dog.jpg"])            # (2, d) float32, L2-normalised
    text = model.encode_text(["a photo of a cat.", "a dog."])    # (2, d)
    probs, top_probs, top_classes = model.classify(["cat.jpg"], ["cat", "dog"])

Each frozen encoder is loaded with extraction's code (`load_encoder`), checked against the
fingerprint the store recorded when its features were extracted, and cut after the block (or
CNN / Swin stage) that computes the run's chosen layer (`truncate_encoder`: a run that picked
block 7 of 12 never runs blocks 8-12). Inputs go through extraction's path (prepare per
sample, collate, `embed` with the same pooling), so `encode_image` of a raw image equals the
head applied to its stored features up to the store's float16 rounding.

`export_model` writes a self-contained directory (see README, "Use the aligned model").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from stages.datasets import PROMPT_TEMPLATES, load_source, open_image, to_rgb
from stages.encoders import (
    Encoder,
    load_encoder,
    load_saved_encoder,
    save_encoder,
    truncate_encoder,
)
from stages.extract import RowDataset, limit_manifest, make_collate, pick_device, rows_to_embed
from stages.heads import CHECKPOINT, CONFIG, load_run
from stages.vectors import class_embeddings, unit_rows
from store import UserError, image_table
from store.manifest import normalise_manifest

SIDES = ("image", "text")
EXPORT_FORMAT = 1
ImageInput = Image.Image | str | Path


class Classification(NamedTuple):
    probs: torch.Tensor  # (B, C) softmax over the classes at the run's temperature
    top_probs: torch.Tensor  # (B, k) the k largest, descending
    top_classes: torch.Tensor  # (B, k) their class indices


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_id(run_dir: str | Path) -> str:
    """Which run's heads: the sha256 of head.safetensors (an export copies it byte for byte)."""
    return file_sha256(Path(run_dir) / CHECKPOINT)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _commit(revision: str | None) -> str | None:
    """A recorded revision worth asking the hub for: a commit hash, not "local" or a label."""
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    return None


def load_checked_encoder(
    spec: str, recorded: dict[str, Any], trust_remote_code: bool, where: str
) -> Encoder:
    """Extraction's encoder for `spec`, refused when its weights differ from those whose
    features the run was trained on (the fingerprint the store recorded)."""
    weights = recorded.get("weights") or None  # timm:NAME --weights FILE, as extracted
    encoder = load_encoder(spec, _commit(recorded.get("revision")), trust_remote_code, weights)
    expected = recorded.get("model_fingerprint")
    if expected and encoder.fingerprint() != expected:
        raise UserError(
            f"the weights of {spec} differ from those the store recorded when {where} was "
            "extracted (model fingerprint); load the same model version (--revision) or "
            "extract and align again"
        )
    return encoder


def export_section(path: str | Path) -> dict[str, Any] | None:
    """The `export` section of DIR/config.json; None when DIR is not an export."""
    try:
        return json.loads((Path(path) / CONFIG).read_text()).get("export")
    except (OSError, ValueError, AttributeError):  # no, a broken or an odd config.json
        return None


def layer_position(encoder: Encoder, layer: str, where: str) -> int:
    if layer not in encoder.layer_names:
        raise UserError(
            f"{where} uses layer {layer!r}, which {encoder.spec} does not have "
            f"(its layers: {', '.join(encoder.layer_names)})"
        )
    return encoder.layer_names.index(layer)


class AlignedModel:
    """Two frozen encoders, each run up to its chosen layer, and the two trained heads."""

    def __init__(
        self,
        config: dict[str, Any],
        encoders: dict[str, Encoder],
        layers: dict[str, int],
        heads: dict[str, torch.nn.Module],
        run_id: str,
        device: str = "auto",
    ):
        self.config, self.encoders, self.layers, self.heads = config, encoders, layers, heads
        self.run_id = run_id  # which run's heads these are (see `run_id`)
        self.full_bytes = {side: param_bytes(e.model) for side, e in encoders.items()}
        self.blocks = {
            side: (
                truncate_encoder(encoders[side], layers[side]),
                len(encoders[side].layer_names) - 1,
            )
            for side in SIDES
        }  # (blocks run, blocks of the whole encoder)
        self.device = pick_device(device)
        for side in SIDES:
            encoders[side].model.to(self.device)
            heads[side].to(self.device).eval()
        self.temperature = float(config.get("temperature") or 0.05)

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_run(
        cls, run_dir: str | Path, device: str = "auto", trust_remote_code: bool = False
    ) -> AlignedModel:
        """The model of an align run directory (config.json + head.safetensors)."""
        config, image_head, text_head = load_run(run_dir)
        missing = [
            f"{s}_{k}" for s in SIDES for k in ("model", "layer") if f"{s}_{k}" not in config
        ]
        if missing:
            raise UserError(f"{run_dir}/{CONFIG} lacks {', '.join(missing)}; train it with align")
        recorded = config.get("store_fingerprint") or {}
        encoders, layers = {}, {}
        for side in SIDES:
            where = f"the {side} features of run {run_dir}"
            info = recorded.get(side, {})  # the spec as extracted (a --name is no spec)
            spec = info.get("model_spec") or config[f"{side}_model"]
            encoders[side] = load_checked_encoder(spec, info, trust_remote_code, where)
            layers[side] = layer_position(encoders[side], config[f"{side}_layer"], where)
        heads = {"image": image_head, "text": text_head}
        return cls(config, encoders, layers, heads, run_id(run_dir), device)

    @classmethod
    def from_pretrained(
        cls, export_dir: str | Path, device: str = "auto", trust_remote_code: bool = False
    ) -> AlignedModel:
        """The model of a directory written by `export`: its own truncated encoders when it
        holds them (offline, nothing downloaded), else the encoders named in its config."""
        export_dir = Path(export_dir)
        config, image_head, text_head = load_run(export_dir)
        export = config.get("export") or {}
        if export.get("format") != EXPORT_FORMAT:
            raise UserError(
                f"{export_dir} is not a directory written by `python -m pipeline export` "
                "(for a run directory use AlignedModel.from_run)"
            )
        encoders, layers = {}, {}
        for side in SIDES:
            info = export[side]
            where = f"the {side} encoder of {export_dir}"
            if info.get("dir"):
                folder = export_dir / info["dir"]
                for name, sha in info["sha256"].items():
                    if not (folder / name).is_file() or file_sha256(folder / name) != sha:
                        raise UserError(f"{folder / name} is missing or changed since the export")
                encoders[side] = load_saved_encoder(
                    folder, info["layer"], info.get("timm"), trust_remote_code
                )
            else:
                encoders[side] = load_checked_encoder(info["spec"], info, trust_remote_code, where)
            # a truncated encoder keeps the names of the layers it still computes
            layers[side] = layer_position(encoders[side], info["layer"], where)
        heads = {"image": image_head, "text": text_head}
        return cls(config, encoders, layers, heads, run_id(export_dir), device)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", trust_remote_code: bool = False):
        """An export directory (`from_pretrained`) or an align run directory (`from_run`)."""
        build = cls.from_run if export_section(path) is None else cls.from_pretrained
        return build(path, device, trust_remote_code)

    # -- encoding -------------------------------------------------------------------------------
    def embed_rows(
        self,
        side: str,
        fetch: Callable[[int], Any],
        names: Sequence[str],
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = False,
    ) -> torch.Tensor:
        """Rows 0..len(names)-1 fetched by `fetch` -> (N, d) float32 unit vectors on the CPU,
        through extraction's prepare / collate / embed path, then the head."""
        encoder, layer, head = self.encoders[side], self.layers[side], self.heads[side]
        loader = DataLoader(
            RowDataset(fetch, encoder.prepare, list(names)),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=make_collate(encoder),
        )
        cuda = self.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
        unit = " img" if side == "image" else " txt"
        bar = tqdm(
            total=len(names), unit=unit, desc=f"embed {side}", disable=not progress, file=sys.stderr
        )
        outputs = []
        with bar:
            for rows, batch, errors in loader:
                bad = [i for i, err in enumerate(errors) if err]
                if bad:
                    raise UserError(f"cannot read image {names[rows[bad[0]]]}: {errors[bad[0]]}")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with torch.inference_mode():
                    with autocast:
                        features = encoder.embed(batch)[layer].float()
                    try:  # the head in float32, as on the stored features
                        outputs.append(unit_rows(head(features).float()).cpu())
                    except RuntimeError as err:  # a shape mismatch: another model or layer
                        raise UserError(
                            f"the {side} head cannot take {encoder.spec} layer "
                            f"{encoder.layer_names[layer]} (dim {features.shape[1]}): "
                            f"{str(err).splitlines()[0]}"
                        ) from err
                bar.update(len(rows))
        if not outputs:
            return torch.zeros(0, int(self.config.get("out_dim") or 0))
        return torch.cat(outputs)

    def encode_image(
        self, images: ImageInput | Sequence[ImageInput], batch_size: int = 64
    ) -> torch.Tensor:
        """PIL images or image paths (one or a list) -> (B, d) float32 unit vectors."""
        items = [images] if isinstance(images, Image.Image | str | Path) else list(images)
        paths = [str(x) for x in items if not isinstance(x, Image.Image)]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise UserError(f"{len(missing)} image file(s) do not exist: {shown}")
        names = [x if isinstance(x, str | Path) else f"image {i}" for i, x in enumerate(items)]

        def fetch(i: int) -> Image.Image:
            item = items[i]
            return to_rgb(item) if isinstance(item, Image.Image) else open_image(item)

        return self.embed_rows("image", fetch, [str(n) for n in names], batch_size)

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts (one or a list) -> (B, d) float32 unit vectors."""
        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        return self.embed_rows("text", texts.__getitem__, texts, batch_size)

    def class_embeddings(
        self, class_names: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES
    ) -> torch.Tensor:
        """(C, d): every class name in every template, averaged as `evaluate` does."""
        class_names = [str(c).strip() for c in class_names]
        if not class_names or not all(class_names):
            raise UserError("give at least one class name, and no empty ones")
        if not templates or any("{}" not in t for t in templates):
            raise UserError("give at least one template, each with a {} for the class name")
        prompts = [t.format(c) for c in class_names for t in templates]
        labels = np.repeat(np.arange(len(class_names)), len(templates))
        return class_embeddings(self.encode_text(prompts), labels, len(class_names))

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        class_names: Sequence[str],
        templates: Sequence[str] = PROMPT_TEMPLATES,
        k: int = 5,
    ) -> Classification:
        """Zero-shot: softmax over cosine / temperature against the class embeddings."""
        classes = self.class_embeddings(class_names, templates)
        logits = self.encode_image(images) @ classes.T / self.temperature
        probs = logits.softmax(dim=1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return Classification(probs, top.values, top.indices)


# -- export -------------------------------------------------------------------------------------
def side_info(model: AlignedModel, side: str) -> dict[str, Any]:
    """What the export's config.json says about one encoder."""
    encoder = model.encoders[side]
    recorded = (model.config.get("store_fingerprint") or {}).get(side, {})
    processor = encoder.processor
    if processor is None:  # timm: the data config is part of its pretrained config
        keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
        preprocessing = {k: encoder.config[k] for k in keys if k in encoder.config}
    elif encoder.modality == "image":
        preprocessing = processor.to_dict()
    else:
        preprocessing = {"tokenizer": type(processor).__name__}
    kept, total = model.blocks[side]
    return {
        "spec": encoder.spec,
        "model_id": recorded.get("model_id", encoder.model_id),
        "revision": recorded.get("revision", encoder.revision),
        "model_fingerprint": recorded.get("model_fingerprint"),
        **({"weights": recorded["weights"]} if recorded.get("weights") else {}),  # timm --weights
        "layer": model.config[f"{side}_layer"],
        "pooling": encoder.pooling,
        "blocks_run": kept,
        "blocks_total": total,
        "preprocessing": json.loads(json.dumps(preprocessing, default=str)),
    }


def export_model(
    run_dir: str | Path, out: str | Path, with_encoders: bool = False
) -> dict[str, Any]:
    """Write `out` (via a temporary directory renamed at the end): config.json (the run's config
    plus an `export` section), head.safetensors and, with_encoders, each encoder truncated at
    its chosen layer (safetensors + processor / tokenizer files). Returns the export section."""
    out = Path(out)
    if out.exists() and export_section(out) is None:
        raise UserError(f"{out} exists and is not an export; choose another --out")
    model = AlignedModel.from_run(run_dir, device="cpu")
    export: dict[str, Any] = {"format": EXPORT_FORMAT, "run": str(Path(run_dir).resolve())}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(Path(run_dir) / CHECKPOINT, tmp / CHECKPOINT)
        for side in SIDES:
            info = side_info(model, side)
            if with_encoders:
                folder = tmp / f"{side}_encoder"
                info.update(save_encoder(model.encoders[side], folder))
                weights = sorted(p.name for p in folder.glob("*.safetensors"))
                info.update(
                    dir=folder.name,
                    sha256={name: file_sha256(folder / name) for name in weights},
                    exported_bytes=sum((folder / name).stat().st_size for name in weights),
                    full_encoder_bytes=model.full_bytes[side],
                )
            export[side] = info
        config = {**model.config, "export": export}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return export


# -- embedding a whole data source ------------------------------------------------------------
def embed_source(
    model: AlignedModel,
    source_spec: str,
    split: str,
    modality: str = "both",
    limit: int = 0,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per image and per caption of a data source (any `--source` of extract):
    modality, id, path, caption, label_name, embedding (float32 unit vector)."""
    if modality not in ("image", "text", "both"):
        raise UserError(f"--modality must be image, text or both, not {modality!r}")
    source = load_source(source_spec, split)
    manifest = limit_manifest(normalise_manifest(source.manifest), limit)
    has = {"image": source.load_image is not None and bool((manifest["image_row"] >= 0).any())}
    has["text"] = bool((manifest["caption"] != "").any())
    sides = [s for s in SIDES if modality in (s, "both") and (has[s] or modality == s)]
    if not sides:
        raise UserError(f"{source_spec} ({split}) has neither images nor captions to embed")
    tables = []
    for side in sides:
        fetch, names = rows_to_embed(source, manifest, side)
        rows = image_table(manifest) if side == "image" else manifest
        embeddings = model.embed_rows(side, fetch, names, batch_size, num_workers, progress)
        tables.append(
            pd.DataFrame(
                {
                    "modality": side,
                    "id": rows["sample_id"].astype(str).to_numpy(),
                    "path": rows["image_path"].astype(str).to_numpy(),
                    "caption": "" if side == "image" else rows["caption"].astype(str).to_numpy(),
                    "label_name": rows["label_name"].astype(str).to_numpy(),
                    "embedding": list(embeddings.numpy()),
                }
            )
        )
    return pd.concat(tables, ignore_index=True)


def write_parquet(table: pd.DataFrame, path: str | Path) -> None:
    """Via a temporary file renamed at the end: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
