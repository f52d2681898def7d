"""A trained run as a model: new images and texts in, unit vectors of the shared space out.

    model = AlignedModel.from_run("runs/align/similar-rs")       # or .from_pretrained(EXPORT_DIR)
    image = model.encode_image(["cat.jpg", "dog.jpg"])            # (2, d) float32, L2-normalised
    text = model.encode_text(["a photo of a cat.", "a dog."])    # (2, d)
    probs, top_probs, top_classes = model.classify(["cat.jpg"], ["cat", "dog"])

Each frozen encoder is loaded by its family (`stages.encoders`), checked against the fingerprint
the store recorded when its features were extracted, and cut after the block (or CNN / Swin
stage) that computes the run's chosen layer (`truncate_encoder`: a run that picked block 7 of 12
never runs blocks 8-12). Inputs go through extraction's path (`stages.encoders.inputs`: prepare
per sample, collate, `embed` with the same pooling), so `encode_image` of a raw image equals the
head applied to its stored features up to the store's float16 rounding.

The arguments of the public methods are checked: a bad one is a `ValueError` or `TypeError`
(also a `UserError`, one line on the command line) naming the argument.

`export_model` writes a self-contained directory, the `EXPORT` artifact (docs/model.md, "The export
format"); `from_pretrained` reads it through the one reader of that kind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image

from stages.datasets import PROMPT_TEMPLATES, load_source, open_image, to_rgb
from stages.device import resolve_device
from stages.encoders import (
    Encoder,
    family_of,
    load_encoder,
    load_saved_encoder,
    save_encoder,
    truncate_encoder,
)
from stages.encoders.arguments import (
    ArgumentTypeError,
    ImageInput,
    as_image,
    checked_class_names,
    checked_templates,
    fill_template,
    image_list,
    missing_image_files,
    positive_int,
    string_list,
)
from stages.encoders.inputs import even_batches, limit_manifest, row_batches, rows_to_embed
from stages.encoders.precision import place_encoder, resolve_precision
from stages.heads import CHECKPOINT, CONFIG, load_run
from stages.progress import progress_bar
from stages.vectors import class_embeddings, unit_rows
from store import UserError, image_table
from store.artifacts import ArtifactKind, read_description, write_artifact
from store.io import check_output, file_sha256
from store.manifest import normalise_manifest

SIDES = ("image", "text")
EXPORT_FORMAT = 2  # 2: every file's checksum in `files`, each encoder's family recorded
EXPORT = ArtifactKind(
    name="export",
    description=CONFIG,
    remake="python -m pipeline export --run RUN --out {path} [--with-encoders]",
    files=(CHECKPOINT,),
    keys={"export": dict, "files": dict},
)


class Classification(NamedTuple):
    probs: torch.Tensor  # (B, C) softmax over the classes at the run's temperature
    top_probs: torch.Tensor  # (B, k) the k largest, descending
    top_classes: torch.Tensor  # (B, k) their class indices


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
    """The encoder of `spec`, refused when its weights differ from those whose features the
    run was trained on (the fingerprint the store recorded)."""
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
    """The `export` section of DIR/config.json; None when DIR is not an export (or unreadable:
    the readers say why)."""
    try:
        section = json.loads((Path(path) / CONFIG).read_text()).get("export")
    except (OSError, ValueError, AttributeError):  # no, a broken or an odd config.json
        return None
    return section if isinstance(section, dict) else None


def read_export(folder: Path) -> dict[str, Any]:
    """The export's config.json through the one reader of the EXPORT kind: every file present
    and unchanged (weights, tokenizer and processor files), the format this version writes."""
    try:
        description = read_description(EXPORT, folder)
    except UserError:
        if (folder / CHECKPOINT).is_file() and export_section(folder) is None:
            raise UserError(
                f"{folder} is not a directory written by `python -m pipeline export` "
                "(for a run directory use AlignedModel.from_run)"
            ) from None
        raise
    if description["export"].get("format") != EXPORT_FORMAT:
        raise EXPORT.error(folder, folder / CONFIG, "written by another version of `export`")
    return description


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
        precision: str = "auto",
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
        self.device = resolve_device(device)
        # the encoders' compute precision (fp32 or bf16); the heads stay float32
        self.precision = resolve_precision(precision, self.device)
        for side in SIDES:
            place_encoder(encoders[side], self.device, self.precision)
            heads[side].to(self.device).eval()
        self.temperature = float(config.get("temperature") or 0.05)

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: str = "auto",
        trust_remote_code: bool = False,
        precision: str = "auto",
    ) -> AlignedModel:
        """The model of an align run directory (config.json + head.safetensors). `precision`:
        the encoders' (fp32, bf16, or auto: bf16 where the device computes it natively)."""
        return cls._of_run(run_dir, load_run(run_dir), device, trust_remote_code, precision)

    @classmethod
    def _of_run(
        cls, run_dir, loaded, device: str, trust_remote_code: bool, precision: str = "auto"
    ) -> AlignedModel:
        config, image_head, text_head = loaded
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
        return cls(config, encoders, layers, heads, run_id(run_dir), device, precision)

    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | Path,
        device: str = "auto",
        trust_remote_code: bool = False,
        precision: str = "auto",
    ) -> AlignedModel:
        """The model of a directory written by `export`: its own truncated encoders when it
        holds them (offline, nothing downloaded), else the encoders named in its config. Every
        file is checked against the checksums the export recorded, and each saved encoder's
        preprocessing against the one recorded."""
        export_dir = Path(export_dir)
        export = read_export(export_dir)["export"]
        config, image_head, text_head = load_run(export_dir)
        encoders, layers = {}, {}
        for side in SIDES:
            info = export.get(side)
            wanted = ("layer", "spec", "family")
            if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in wanted):
                problem = f"`export.{side}` must name the encoder's {', '.join(wanted)}"
                raise EXPORT.error(export_dir, export_dir / CONFIG, problem)
            where = f"the {side} encoder of {export_dir}"
            if info.get("dir"):
                folder = export_dir / info["dir"]
                encoders[side] = load_saved_encoder(folder, info["layer"], info, trust_remote_code)
                check_preprocessing(encoders[side], info, export_dir, folder)
            else:
                encoders[side] = load_checked_encoder(info["spec"], info, trust_remote_code, where)
            # a truncated encoder keeps the names of the layers it still computes
            layers[side] = layer_position(encoders[side], info["layer"], where)
        heads = {"image": image_head, "text": text_head}
        return cls(config, encoders, layers, heads, run_id(export_dir), device, precision)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        trust_remote_code: bool = False,
        precision: str = "auto",
    ):
        """An export directory (`from_pretrained`) or an align run directory (`from_run`)."""
        loaded = load_run(path)  # the run reader: one line for a missing or unreadable run
        if "export" in loaded[0]:
            return cls.from_pretrained(path, device, trust_remote_code, precision)
        return cls._of_run(path, loaded, device, trust_remote_code, precision)

    # -- encoding -------------------------------------------------------------------------------
    def output_dim(self, side: str) -> int:
        """The width of the head's output (out_dim; CSA's heads add a slack dimension)."""
        width = self.encoders[side].layer_dims[self.layers[side]]
        with torch.inference_mode():
            probe = self.heads[side](torch.zeros(1, width, device=self.device))
        return int(probe.shape[1])

    def embed_rows(
        self,
        side: str,
        fetch: Callable[[int], Any],
        names: Sequence[str],
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> torch.Tensor:
        """Rows 0..len(names)-1 fetched by `fetch` -> (N, d) float32 unit vectors on the CPU,
        through extraction's prepare / collate / embed path, then the head."""
        encoder = self.encoders[side]
        if not len(names):
            return torch.zeros(0, self.output_dim(side))
        unit = " img" if side == "image" else " txt"
        bar = progress_bar(total=len(names), unit=unit, desc=f"embed {side}", enabled=progress)
        batches = row_batches(
            encoder, fetch, names, even_batches(len(names), batch_size), num_workers,
            **({"log": log} if log else {}),
        )  # fmt: skip
        outputs = []
        with bar:
            for rows, batch, errors in batches:
                bad = [i for i, err in enumerate(errors) if err]
                if bad:
                    raise UserError(f"cannot read image {names[rows[bad[0]]]}: {errors[bad[0]]}")
                with torch.inference_mode():
                    outputs.append(self.project_batch(side, batch).cpu())
                bar.update(len(rows))
        return torch.cat(outputs)

    def project_batch(self, side: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One collated batch (the encoder's `collate` output) -> (B, d) float32 unit rows on
        the model's device: the encoder up to the chosen layer in its precision (as extraction),
        then the head in float32, as on the stored features."""
        encoder, layer, head = self.encoders[side], self.layers[side], self.heads[side]
        batch = {k: v.to(self.device) for k, v in batch.items()}
        features = encoder.embed(batch)[layer].float()
        try:
            return unit_rows(head(features).float())
        except RuntimeError as err:  # a shape mismatch: another model or layer
            raise UserError(
                f"the {side} head cannot take {encoder.spec} layer "
                f"{encoder.layer_names[layer]} (dim {features.shape[1]}): "
                f"{str(err).splitlines()[0]}"
            ) from err

    def as_open_clip(self):
        """`(model, preprocess, tokenizer)` as open_clip's `create_model_and_transforms` and
        `get_tokenizer` give them, so that tools written for open_clip models (CLIP_benchmark,
        clip-retrieval) run on this model unchanged (stages.open_clip_api)."""
        from stages.open_clip_api import open_clip_triple

        return open_clip_triple(self)

    def encode_image(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 64):
        """Images (one or a list) -> (B, d) float32 unit vectors. An image is a PIL image, a
        file path, a numpy array (H, W, C: uint8 0..255 or float 0..1) or a torch tensor
        (C, H, W, likewise); a (N, H, W, C) array or (N, C, H, W) tensor is N images."""
        items = image_list(images)
        batch_size = positive_int(batch_size, "batch_size")
        for i, item in enumerate(items):
            if not isinstance(item, Image.Image | str | Path | np.ndarray | torch.Tensor):
                raise ArgumentTypeError(
                    f"images[{i}] must be a PIL image, an image path, a numpy array (HWC) or "
                    f"a torch tensor (CHW), not {type(item).__name__}"
                )
        missing_image_files(items)
        names = [str(x) if isinstance(x, str | Path) else f"image {i}" for i, x in enumerate(items)]
        # images in memory are checked (and arrays converted) here, files where they are read
        items = [
            x if isinstance(x, str | Path) else as_image(x, f"images[{i}]", open_image)
            for i, x in enumerate(items)
        ]

        def fetch(i: int) -> Image.Image:
            return to_rgb(as_image(items[i], f"images[{i}]", open_image))

        return self.embed_rows("image", fetch, names, batch_size)

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts (one or a list) -> (B, d) float32 unit vectors."""
        texts = string_list(texts, "texts", single=True)
        batch_size = positive_int(batch_size, "batch_size")
        return self.embed_rows("text", texts.__getitem__, texts, batch_size)

    def class_embeddings(
        self, class_names: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES
    ) -> torch.Tensor:
        """(C, d): every class name in every template, averaged as `evaluate` does."""
        class_names = checked_class_names(class_names)
        templates = checked_templates(templates)
        prompts = [fill_template(t, c) for c in class_names for t in templates]
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
        k = positive_int(k, "k")
        items = image_list(images)  # checked before the class names are embedded
        classes = self.class_embeddings(class_names, templates)
        logits = self.encode_image(items) @ classes.T / self.temperature
        probs = logits.softmax(dim=1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return Classification(probs, top.values, top.indices)


def check_preprocessing(
    encoder: Encoder, info: dict[str, Any], export_dir: Path, folder: Path
) -> None:
    """The preprocessing the loaded files give must be the one the export recorded (a tokenizer
    or processor read from other files would run, with other inputs)."""
    recorded = info.get("preprocessing")
    now = family_of(encoder).preprocessing(encoder)
    if recorded != now:
        keys = sorted(
            k for k in set(recorded or {}) | set(now) if (recorded or {}).get(k) != now.get(k)
        )
        raise EXPORT.error(
            export_dir,
            folder,
            "its processor or tokenizer files give other preprocessing than the export "
            f"recorded ({', '.join(keys[:5])})",
        )


# -- export -------------------------------------------------------------------------------------
def side_info(model: AlignedModel, side: str) -> dict[str, Any]:
    """What the export's config.json says about one encoder."""
    encoder = model.encoders[side]
    recorded = (model.config.get("store_fingerprint") or {}).get(side, {})
    kept, total = model.blocks[side]
    return {
        "spec": encoder.spec,
        "family": encoder.family,
        "model_id": recorded.get("model_id", encoder.model_id),
        "revision": recorded.get("revision", encoder.revision),
        "model_fingerprint": recorded.get("model_fingerprint"),
        **({"weights": recorded["weights"]} if recorded.get("weights") else {}),  # timm --weights
        "layer": model.config[f"{side}_layer"],
        "pooling": encoder.pooling,
        "blocks_run": kept,
        "blocks_total": total,
        "preprocessing": family_of(encoder).preprocessing(encoder),
    }


def export_model(
    run_dir: str | Path, out: str | Path, with_encoders: bool = False
) -> dict[str, Any]:
    """Write the EXPORT artifact `out`: config.json (the run's config, an `export` section and
    every file's checksum), head.safetensors and, with_encoders, each encoder truncated at its
    chosen layer (safetensors + processor / tokenizer files). Atomic (a complete successor
    replaces `out`), locked (a second writer stops with one line), files 0644. Returns the
    export section."""
    out = check_output(out, "dir")
    if out.is_dir() and any(out.iterdir()) and export_section(out) is None:
        raise UserError(f"{out} exists and is not an export; choose another --out")
    model = AlignedModel.from_run(run_dir, device="cpu", precision="fp32")  # weights as loaded
    export: dict[str, Any] = {"format": EXPORT_FORMAT, "run": str(Path(run_dir).resolve())}

    def fill(tmp: Path) -> dict[str, Any]:
        shutil.copyfile(Path(run_dir) / CHECKPOINT, tmp / CHECKPOINT)
        for side in SIDES:
            info = side_info(model, side)
            if with_encoders:
                folder = tmp / f"{side}_encoder"
                info.update(save_encoder(model.encoders[side], folder))
                weights = sorted(p.name for p in folder.glob("*.safetensors"))
                info.update(
                    dir=folder.name,
                    exported_bytes=sum((folder / name).stat().st_size for name in weights),
                    full_encoder_bytes=model.full_bytes[side],
                )
            export[side] = info
        config = {k: v for k, v in model.config.items() if k != "files"}
        return {**config, "export": export}

    return write_artifact(EXPORT, out, fill)["export"]


# -- embedding a whole data source ------------------------------------------------------------
def source_root(source_spec: str) -> Path | None:
    """The folder a file source's image paths are relative to (None: not a file source)."""
    kind, _, arg = source_spec.partition(":")
    if not arg or kind not in ("pairs", "imagefolder", "coco"):
        return None
    path = Path(arg).expanduser().resolve()
    return path.parent if kind == "pairs" else path


def row_ids(rows: pd.DataFrame, root: Path | None) -> np.ndarray:
    """Unique ids: a file's path relative to the source (`img/d0.png` and `sub/d0.png` are two
    images, not both `d0`), else the sample id; rows that share one (the captions of one image,
    the templates of one class) get `#1`, `#2`, ... after the first."""
    ids = rows["sample_id"].astype(str)
    if root is not None:
        paths = rows["image_path"].astype(str)
        relative = [
            Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else p
            for p in paths
        ]
        ids = pd.Series(np.where(paths != "", relative, ids), index=rows.index)
    repeat = ids.groupby(ids).cumcount()
    return np.where(repeat > 0, ids + "#" + repeat.astype(str), ids).astype(str)


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
    modality, id (unique per modality), path, caption, label_name, embedding (float32 unit
    vector)."""
    if modality not in ("image", "text", "both"):
        raise UserError(f"--modality must be image, text or both, not {modality!r}")
    source = load_source(source_spec, split)
    manifest = limit_manifest(normalise_manifest(source.manifest), limit)
    has = {"image": source.load_image is not None and bool((manifest["image_row"] >= 0).any())}
    has["text"] = bool((manifest["caption"] != "").any())
    sides = [s for s in SIDES if modality in (s, "both") and (has[s] or modality == s)]
    if not sides:
        raise UserError(f"{source_spec} ({split}) has neither images nor captions to embed")
    root = source_root(source_spec)
    tables = []
    for side in sides:
        fetch, names = rows_to_embed(source, manifest, side)
        rows = image_table(manifest) if side == "image" else manifest
        embeddings = model.embed_rows(side, fetch, names, batch_size, num_workers, progress)
        tables.append(
            pd.DataFrame(
                {
                    "modality": side,
                    "id": row_ids(rows, root),
                    "path": rows["image_path"].astype(str).to_numpy(),
                    "caption": "" if side == "image" else rows["caption"].astype(str).to_numpy(),
                    "label_name": rows["label_name"].astype(str).to_numpy(),
                    "embedding": list(embeddings.numpy()),
                }
            )
        )
    return pd.concat(tables, ignore_index=True)
