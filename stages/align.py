"""Stage 2b: one training run, from stored pairs to a run directory; and which layers it uses.

Picks the layers (`resolve_layers`: auto, last, or IMAGE,TEXT), opens the pairs (stages.pairs),
splits them, hands them to the trainer of the head kind (the head registry, stages.heads:
gradient training in stages.train unless the kind names its own, as CSA's does) and writes the
run directory through stages.heads.write_run (one artifact: head.safetensors, config.json,
history.csv, curves.png, replaced only when the new run is complete).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages import similarity
from stages.heads import head_kind, head_kinds, write_run
from stages.lambda_cv import LambdaSearch, ZeroShotData, search_lambda
from stages.pairs import (
    MemoryPairs,
    PairSpec,
    StorePairs,
    batch_plan,
    load_extra_pairs,
    load_unpaired,
    open_pairs,
    pair_sources,
    parse_where,
    split_pairs,
)
from stages.select import SelectSettings, features_identity, read_selection, run_selection
from stages.threads import step_flops, threads_for
from stages.train import AlignSettings, TrainResult, train_heads, train_lambda_stack
from store import FeatureStore, UserError, pair_labels
from store.io import check_output


def trainer(head: str) -> Callable[..., TrainResult]:
    """The trainer of a registered head kind: its own, or gradient training (train_heads)."""
    return head_kind(head).trainer or train_heads


def unpaired_heads() -> list[str]:
    """The head kinds whose trainer takes unpaired rows for R_S: the gradient-trained ones."""
    return [name for name, kind in head_kinds().items() if kind.gradient_trained]


# -- --layers: auto | last | IMAGE,TEXT ---------------------------------------------------------
def selection_place(select_dir: Path, metric: str) -> Path:
    """Where `--layers auto --metric METRIC` keeps a selection it had to compute: select_dir
    when that holds none yet or one selected by METRIC; else a folder of its own beside it
    (SELECT_DIR-METRIC), so that another metric's selection is never rewritten."""
    info = read_selection(select_dir)
    if info is None or info.get("metric", "mutual_knn") == metric:
        return select_dir
    return select_dir.with_name(f"{select_dir.name}-{metric}")


def _usable_pair(info: dict | None, metric: str, spec: PairSpec, image, text) -> dict | None:
    """The pair METRIC picked in a selection.json made from these features, or None."""
    if info is None:
        return None
    # the selecting metric's pair is the top level (mutual kNN in files from before
    # --metric), the others' are under by_metric
    selecting = info.get("metric", "mutual_knn") == metric
    pair = info if selecting else (info.get("by_metric") or {}).get(metric)
    wanted = {
        "image_model": spec.image_model,
        "text_model": spec.text_model,
        "dataset": spec.dataset,
        "split": spec.split,
        "features": features_identity(spec),  # not another store's features
    }
    if (
        not isinstance(pair, dict)
        or any(info.get(key) != value for key, value in wanted.items())
        or pair.get("image_layer") not in image.layer_names
        or pair.get("text_layer") not in text.layer_names
    ):
        return None
    return pair


def resolve_layers(
    layers: str,
    spec: PairSpec,
    select_dir: Path,
    settings: SelectSettings = SelectSettings(),
    *,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[str, str]:
    """(image layer name, text layer name) of `spec`'s features for `align --layers`.

    auto: the best pair by settings.metric (its first metric) in select_dir/selection.json when
    it was made for these models, dataset and split and scored that metric (and its layers
    exist); else in the metric's own folder (`selection_place`), computed there first when
    missing (`settings`). A selection of another metric is never rewritten.
    last: the last layer of each array. IMG,TXT: each by index (negative allowed) or name."""
    _, image, text = spec.arrays()
    layers = layers.strip()
    if layers == "last":
        return image.layer_names[-1], text.layer_names[-1]
    if layers == "auto":
        select_dir = Path(select_dir)
        metric = similarity.parse_metrics(settings.metric)[0]  # checked by SelectSettings
        pair = _usable_pair(read_selection(select_dir), metric, spec, image, text)
        place = selection_place(select_dir, metric)
        if pair is None and place != select_dir:
            pair = _usable_pair(read_selection(place), metric, spec, image, text)
        if pair is None:
            if read_selection(place) is not None or place != select_dir:
                log(
                    f"{select_dir}/selection.json is for other features or metrics; "
                    f"selecting by {metric} into {place}"
                )
            settings = replace(settings, metric=metric)
            pair = run_selection(spec, place, settings, progress=progress).info
        return pair["image_layer"], pair["text_layer"]
    parts = [p.strip() for p in layers.split(",")]
    if len(parts) != 2 or not all(parts):
        raise UserError(
            f"--layers must be auto, last or IMAGE,TEXT (index or name), got {layers!r}"
        )
    return (
        image.layer_names[image.layer_index(parts[0])],
        text.layer_names[text.layer_index(parts[1])],
    )


def layer_agreement(
    select_dir: Path, metric: str, spec: PairSpec, layers: tuple[str, str]
) -> dict[str, Any] | None:
    """How much the two chosen layers agree, from a selection of these features scored by
    `metric` (select_dir, or the metric's own folder, `selection_place`): the score and, when
    the selection was calibrated, the calibrated score and p-value of this pair, and for the
    selected pair also the p-value of the max (corrected for the search over pairs). None when
    no such selection scored this pair."""
    _, image, text = spec.arrays()
    select_dir = Path(select_dir)
    for place in dict.fromkeys((select_dir, selection_place(select_dir, metric))):
        info = read_selection(place)
        pair = _usable_pair(info, metric, spec, image, text)
        if pair is None:
            continue
        table = pd.read_parquet(place / "scores.parquet")
        row = table[(table["image_layer"] == layers[0]) & (table["text_layer"] == layers[1])]
        if row.empty or metric not in table:
            continue
        record = {"metric": metric, "score": float(row[metric].iloc[0]), "selection": str(place)}
        if f"{metric}_calibrated" in table:
            record.update(
                calibrated=float(row[f"{metric}_calibrated"].iloc[0]),
                p_value=float(row[f"{metric}_p_value"].iloc[0]),
                permutations=info["permutations"],
                alpha=info["alpha"],
            )
            if (pair["image_layer"], pair["text_layer"]) == tuple(layers):
                record["max_p_value"] = pair["p_value"]  # the selected pair: the max's p
        return record
    return None


def agreement_lines(agreement: dict[str, Any] | None, lam: float) -> list[str]:
    """What align prints about the layers' agreement; with lam > 0 on a pair not above the
    null (p-value, the max's for a selected pair, above alpha), one line saying so."""
    if agreement is None:
        return []
    a = agreement
    line = f"layer agreement: {a['metric']} {a['score']:.4f}"
    if "calibrated" not in a:
        return [line + " (not calibrated: `select --calibrate 100` tells whether it is chance)"]
    p = a.get("max_p_value", a["p_value"])
    which = "p of the max over pairs" if "max_p_value" in a else "p"
    lines = [line + f", calibrated {a['calibrated']:.4f}, {which} {p:.3g}"]
    if lam > 0 and p > a["alpha"]:
        lines.append(
            f"warning: these layers agree no more than chance ({which} {p:.3g} > "
            f"{a['alpha']}): R_S with lambda {lam:g} preserves a structure the other side does "
            "not share (try --lambda auto or 0)"
        )
    return lines


# -- data beyond the training pairs: never the evaluation split or the training split ----------
def check_overlap(
    spec: PairSpec,
    eval_split: str | None,
    allow_overlap: bool,
    extra_pairs: str | None,
    unpaired: tuple[str | None, str | None],
) -> None:
    """Refuse --extra-pairs / --unpaired-images / --unpaired-texts that name the training split
    itself (its rows would count twice) or the evaluation split (`eval_split`: SPLIT of the
    training dataset, or DATASET/SPLIT; its rows would leak into training and inflate the
    metrics), unless allow_overlap."""
    flags = [
        ("--extra-pairs", extra_pairs),
        ("--unpaired-images", unpaired[0]),
        ("--unpaired-texts", unpaired[1]),
    ]
    evaluated = None
    if eval_split and "/" in eval_split:
        evaluated = parse_where(eval_split, "the evaluation split")
    elif eval_split:
        evaluated = (spec.dataset, eval_split)
    for flag, where in flags:
        if not where:
            continue
        place = parse_where(where, flag)
        if allow_overlap:
            continue
        if place == (spec.dataset, spec.split):
            what = "the training split itself: its rows would count twice"
        elif place == evaluated:
            what = "the evaluation split: its rows would leak into training and inflate the metrics"
        else:
            continue
        raise UserError(
            f"{flag} {where} is {what}; name another split, or pass --allow-overlap to use it "
            "anyway (recorded in config.json)"
        )


def plot_curves(history: pd.DataFrame, path: Path, best_epoch: int | None = None) -> None:
    """Loss curves (train, validation, CLIP, lambda * R_S) and the lr / lambda schedules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rs, ax_sched) = plt.subplots(1, 3, figsize=(14, 4))
    e = history["epoch"]
    ax_loss.plot(e, history["train_loss"], label="train loss")
    ax_loss.plot(e, history["clip_loss"], label="train CLIP loss")
    ax_loss.plot(e, history["val_loss"], label="validation CLIP loss")
    ax_loss.plot(e, history["val_objective"], label="validation objective (early stopping)")
    if best_epoch:
        ax_loss.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="losses")
    ax_rs.plot(e, history["rs_image"], label="R_S image")
    ax_rs.plot(e, history["rs_text"], label="R_S text")
    ax_rs.set(xlabel="epoch", ylabel="R_S (nats)", title="STRUCTURE regularizer")
    ax_sched.plot(e, history["lr"], label="learning rate", color="tab:green")
    ax_sched.set(xlabel="epoch", ylabel="learning rate", title="schedules")
    ax_lam = ax_sched.twinx()
    ax_lam.plot(e, history["lambda"], label="lambda", color="tab:red")
    ax_lam.set_ylabel("lambda")
    for ax in (ax_loss, ax_rs, ax_sched, ax_lam):
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pairs_digest(train: np.ndarray, val: np.ndarray) -> str:
    """A short hash of the set of pair indices a run drew (train and validation together)."""
    chosen = np.sort(np.concatenate([train, val])).astype(np.int64)
    return hashlib.sha256(chosen.tobytes()).hexdigest()[:16]


def zeroshot_data(
    spec: PairSpec, prompts_split: str, text_layer: str, train: np.ndarray
) -> tuple[ZeroShotData | None, np.ndarray]:
    """For --lambda-criterion zeroshot: (the prompts of `prompts_split` at the text layer with
    their labels, or None when the split was not extracted; the label of every training pair
    `train`, -1 where none)."""
    store = FeatureStore(spec.store)
    labels = pair_labels(store.manifest(spec.dataset, spec.split))[train]
    try:
        prompts = store.open(spec.dataset, prompts_split, "text", spec.text_model)
        prompt_labels = store.manifest(spec.dataset, prompts_split)["label"].to_numpy(np.int64)
    except UserError:
        return None, labels
    if len(prompt_labels) == 0 or (prompt_labels < 0).any():
        return None, labels
    return ZeroShotData(prompts.read_layer(text_layer), prompt_labels), labels


def run_align(
    spec: PairSpec,
    layers: tuple[str, str],
    settings: AlignSettings,
    out: str | Path,
    *,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
    memory_cap: int = 0,
    unpaired: tuple[str | None, str | None] = (None, None),
    extra_pairs: str | None = None,
    extra_n: int = 0,
    eval_split: str | None = None,
    allow_overlap: bool = False,
    lambda_search: LambdaSearch | None = None,
    prompts_split: str = "prompts",
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], TrainResult]:
    """Load the pairs of `spec` at `layers` (image, text), split, train, and write the run
    directory (atomically: a previous run at `out` is replaced only by a complete one); returns
    (config as written, result). When the chosen layers of the pairs exceed `memory_cap` bytes
    (0 = no cap), batches are streamed from the store instead of held in memory; the weights
    are the same.

    unpaired: (images, texts) as DATASET/SPLIT of the same models: unpaired rows for R_S.
    extra_pairs, extra_n: DATASET/SPLIT of the same models, extra_n (0 = all) of its pairs added
    to the training pairs (the paper's in-domain mixing; validation stays on `spec`).
    eval_split: the split the run will be evaluated on (SPLIT of spec's dataset, or
    DATASET/SPLIT); none of the extra data may come from it, nor from the training split,
    unless allow_overlap (recorded in config.json).
    lambda_search: choose settings.lam by cross-validation on the training pairs first
    (stages.lambda_cv; the zeroshot criterion embeds the classes of `prompts_split`); the
    table goes to `log`, config.json records it under `lambda_search`."""
    out = check_output(out, "dir")  # before any work
    check_overlap(spec, eval_split, allow_overlap, extra_pairs, unpaired)
    if lambda_search is not None and (extra_pairs or any(unpaired)):
        raise UserError(
            "--lambda auto cross-validates the training pairs alone: it does not take "
            "--extra-pairs or --unpaired-*; give a number to --lambda"
        )
    kind = head_kind(settings.head)
    pairs = open_pairs(spec, image_layer=layers[0], text_layer=layers[1])
    train, val = split_pairs(
        pairs.image_rows,
        settings.n_pairs,
        settings.val_fraction,
        settings.seed,
        settings.min_val_pairs,
    )
    train_source, val_source = pair_sources(pairs, train, val, memory_cap)
    names = (pairs.info["image_layer"], pairs.info["text_layer"])
    added: dict[str, Any] = {}
    if extra_pairs:
        if not isinstance(train_source, MemoryPairs):
            raise UserError("--extra-pairs needs the training pairs in memory: raise --memory-cap")
        image, text = load_extra_pairs(spec, extra_pairs, extra_n, names, settings.seed)
        train_source = MemoryPairs(
            np.concatenate([train_source.image.numpy(), image]),
            np.concatenate([train_source.text.numpy(), text]),
        )
        added.update(extra_pairs=extra_pairs, extra_n=len(image))
    kwargs = {}
    if any(unpaired):
        if not kind.gradient_trained or settings.lam == 0:
            raise UserError(
                "--unpaired-images/--unpaired-texts feed R_S: they need --lambda > 0 and a "
                f"gradient-trained head ({', '.join(unpaired_heads())})"
            )
        rows = [
            load_unpaired(spec, modality, where, name, f"--unpaired-{modality}s") if where else None
            for modality, where, name in zip(("image", "text"), unpaired, names, strict=True)
        ]
        kwargs["unpaired"] = tuple(rows)
        added.update(
            unpaired_images=unpaired[0],
            unpaired_texts=unpaired[1],
            n_unpaired=[0 if r is None else len(r) for r in rows],
        )
    batch = batch_plan(len(train_source), settings.batch_size)[1]
    rs = settings.lam > 0 or lambda_search is not None
    flops = step_flops(batch, pairs.dims, settings.out_dim, settings.hidden_dim, rs)
    # one thread for small heads (stages.threads): the search's runs and the final one
    with threads_for(flops) as threads:
        if lambda_search is not None:
            if not isinstance(train_source, MemoryPairs):
                raise UserError(
                    "--lambda auto needs the training pairs in memory: raise --memory-cap"
                )
            zeroshot, labels = None, None
            if lambda_search.criterion == "zeroshot":
                zeroshot, labels = zeroshot_data(spec, prompts_split, names[1], train)
            added["lambda_search"] = search_lambda(
                train_source,
                val_source,
                pairs.image_rows[train],
                settings,
                lambda_search,
                trainer(kind.name),
                zeroshot=zeroshot,
                train_labels=labels,
                progress=progress,
                log=log,
                fit_grid=train_lambda_stack if kind.gradient_trained else None,
            )
            settings = replace(settings, lam=added["lambda_search"]["chosen"])
        fit = trainer(kind.name)
        result = fit(train_source, val_source, settings, progress=progress, **kwargs)
    added["torch_threads"] = threads
    hyper = asdict(settings)
    hyper["lambda"] = hyper.pop("lam")
    config = {
        "image_model": spec.image_model,
        "text_model": spec.text_model,
        "dataset": spec.dataset,
        "split": spec.split,
        "store": str(spec.store),
        **pairs.info,
        "image_dim": int(pairs.dims[0]),
        "text_dim": int(pairs.dims[1]),
        **hyper,
        "n_pairs_requested": settings.n_pairs,
        "n_pairs": int(len(train) + len(val)),
        "n_train": int(len(train_source)),
        # which pairs (train + validation): equal digests, equal subsets (the sweep's check)
        "pairs_digest": pairs_digest(train, val),
        "n_val": int(len(val)),
        "batch_size_used": batch_plan(len(train_source), settings.batch_size)[1],
        "epochs_run": int(len(result.history)),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "streamed_from_store": isinstance(train_source, StorePairs),
        "allow_overlap": bool(allow_overlap),
        **result.info,  # the trainer's own: optimiser, early stopping, best epoch (CSA: its fit)
        **added,
        **(extra_config or {}),
    }

    def diagnostics(folder: Path) -> None:
        (folder / "history.csv").write_text(result.history.to_csv(index=False), "utf-8")
        plot_curves(result.history, folder / "curves.png", config["best_epoch"])

    written = write_run(out, result.image_head, result.text_head, config, diagnostics)
    return written, result
