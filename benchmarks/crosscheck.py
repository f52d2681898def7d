"""Our `evaluate` against LAION's CLIP_benchmark on the same run: agreement, not timing.

    python -m benchmarks.crosscheck --run runs/align/similar-rs --dataset digits --split test
    python -m benchmarks.crosscheck --run R --dataset mine --source pairs:pairs.csv --reversed

Runs CLIP_benchmark's own `zeroshot_classification.evaluate` and `zeroshot_retrieval.evaluate`
on `AlignedModel.as_open_clip()` over the split's images (from the source, through the model:
nothing read from the store), with the class names and templates recorded with the dataset's
prompts, and prints them next to `evaluate_run` on the stored features. Use a float32 store
(`extract --dtype float32`) to compare like with like. `--reversed` also runs CLIP_benchmark on
the images in reverse order: where captions repeat, its image->text recall moves (ties broken
by position), ours does not (exact expectation over tied orders; docs/evaluation.md).
`tests/test_protocol.py` runs the same on the demo and asserts the agreement.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from stages.datasets import Source, load_source
from stages.evaluate import evaluate_run, prompts_record
from stages.model import AlignedModel
from store import FeatureStore

KEYS = ("top1", "top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


class Images(torch.utils.data.Dataset):
    """A split's images as CLIP_benchmark's datasets give them: (tensor, target) with
    `classes`, or (tensor, [captions]) for retrieval; `order` permutes the images."""

    def __init__(self, source: Source, preprocess, captions: bool, order: np.ndarray | None = None):
        images = source.manifest.drop_duplicates("image_row").sort_values("image_row")
        rows = images["image_row"].to_numpy()
        self.rows = rows if order is None else rows[order]
        self.labels = dict(zip(images["image_row"], images["label"]))
        groups = source.manifest.groupby("image_row")["caption"]
        self.captions = {row: list(texts) for row, texts in groups}
        self.source, self.preprocess, self.with_captions = source, preprocess, captions
        self.classes = source.label_names

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        image = self.preprocess(self.source.load_image(row))
        return image, (self.captions[row] if self.with_captions else int(self.labels[row]))


def caption_batches(batch):
    """CLIP_benchmark's image_captions_collate_fn."""
    return torch.stack([image for image, _ in batch]), [texts for _, texts in batch]


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """CLIP_benchmark's `accuracy`, but for `.item()`: its float() of a one-element array is an
    error under numpy 2 (clip-benchmark 1.6.2)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def clip_benchmark_metrics(
    model: AlignedModel,
    source: Source,
    record: dict | None,
    order: np.ndarray | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """CLIP_benchmark's zero-shot top-1/5 (when `record` gives class names and templates) and
    R@1/5/10 (percent), run as its CLI runs a model: through open_clip's interface, in float32
    (amp=False: on the CPU its amp is bfloat16)."""
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    zeroshot_classification.accuracy = accuracy  # the numpy-2 fix of one line
    clip_model, preprocess, tokenizer = model.as_open_clip()
    out: dict[str, float] = {}
    if record is not None:
        images = Images(source, preprocess, False)
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size)
        zs = zeroshot_classification.evaluate(
            clip_model, loader, tokenizer, record["class_names"], record["template_list"],
            "cpu", amp=False,
        )  # fmt: skip
        out.update(top1=100 * zs["acc1"], top5=100 * zs["acc5"])
    if (source.manifest["caption"] != "").all():
        images = Images(source, preprocess, True, order)
        loader = torch.utils.data.DataLoader(
            images, batch_size=batch_size, collate_fn=caption_batches
        )
        rt = zeroshot_retrieval.evaluate(
            clip_model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
        )
        for k in (1, 5, 10):
            out[f"i2t_r{k}"] = 100 * rt[f"text_retrieval_recall@{k}"]
            out[f"t2i_r{k}"] = 100 * rt[f"image_retrieval_recall@{k}"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--store", default="features.zarr")
    parser.add_argument("--dataset", required=True, help="the store's dataset name")
    parser.add_argument("--source", default="", help="its --source (default: the dataset name)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--prompts-split", default="prompts")
    parser.add_argument("--reversed", action="store_true", help="also the images reversed")
    args = parser.parse_args()

    model = AlignedModel.from_run(args.run, device="cpu")
    source = load_source(args.source or args.dataset, args.split)
    metrics = evaluate_run(args.run, args.store, args.dataset, args.split, args.prompts_split)
    ours = {**metrics["zero_shot"], **metrics["retrieval"]}
    record = None
    if "skipped" not in metrics["zero_shot"]:
        store = FeatureStore(args.store)
        record = prompts_record(store, args.dataset, args.prompts_split, model.config["text_model"])
    theirs = clip_benchmark_metrics(model, source, record)
    flipped = {}
    if args.reversed:
        n = len(source.manifest.drop_duplicates("image_row"))
        flipped = clip_benchmark_metrics(model, source, None, np.arange(n)[::-1].copy())
    print(f"prompts: {metrics['zero_shot'].get('protocol', '-')}")
    print(f"{'metric':8s} {'evaluate':>9s} {'CLIP_benchmark':>15s} {'difference':>11s}"
          + (f" {'reversed':>9s}" if args.reversed else ""))  # fmt: skip
    for key in KEYS:
        if key in theirs:
            line = f"{key:8s} {ours[key]:9.3f} {theirs[key]:15.3f} {ours[key] - theirs[key]:11.2e}"
            if key in flipped:
                line += f" {flipped[key]:9.3f}"
            print(line)


if __name__ == "__main__":
    main()
