"""Small pure pieces on embedding matrices, shared by evaluation, the model and the index: checked
matrices and label indices, unit rows, and class embeddings averaged over prompt templates.

The exact, float64-accumulated unit rows of the kNN search stay in `stages.knn`: its neighbour
lists must not depend on rounding; here float32 normalisation is what is wanted.
"""

from __future__ import annotations

import numpy as np
import torch

from store.errors import UserError

ArrayLike = torch.Tensor | np.ndarray


def as_matrix(x: ArrayLike, what: str) -> torch.Tensor:
    """A finite float 2-D tensor, or a UserError naming `what`."""
    t = torch.as_tensor(np.require(x, requirements="W") if isinstance(x, np.ndarray) else x)
    if t.ndim != 2:
        raise UserError(f"{what} must be a 2-D (rows, dim) array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise UserError(f"{what} has NaN or infinite values in {bad} of {t.shape[0]} rows")
    return t


def as_index(x: ArrayLike, size: int, what: str, n_rows: int) -> torch.Tensor:
    """Integer indices into range(size), one per row."""
    t = torch.as_tensor(np.array(x)).long()  # a copy: pandas columns are read-only
    if t.shape != (n_rows,):
        raise UserError(f"{what} needs one entry per row ({n_rows}), got shape {tuple(t.shape)}")
    if n_rows and (t.min() < 0 or t.max() >= size):
        raise UserError(f"{what} must lie in 0..{size - 1}, got {int(t.min())}..{int(t.max())}")
    return t


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return torch.nn.functional.normalize(x, dim=-1)


def unit_rows_f32(x: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, L2-normalised rows: what FAISS needs for cosine search."""
    import faiss

    x = np.array(x, dtype=np.float32, order="C")  # a copy: normalize_L2 works in place
    faiss.normalize_L2(x)
    return x


def class_embeddings(text_emb: ArrayLike, prompt_labels: ArrayLike, n_classes: int) -> torch.Tensor:
    """One unit vector per class: prompts L2-normalised, averaged over templates, renormalised."""
    text = unit_rows(as_matrix(text_emb, "prompt embeddings"))
    labels = as_index(prompt_labels, n_classes, "prompt labels", text.shape[0])
    counts = torch.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()[:10]
        raise UserError(f"classes {missing} have no prompt; every class needs at least one")
    sums = torch.zeros(n_classes, text.shape[1], dtype=text.dtype).index_add_(0, labels, text)
    return unit_rows(sums / counts[:, None].to(text.dtype))
