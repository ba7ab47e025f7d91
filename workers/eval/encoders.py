"""The `evaluate` job for JEPA encoders: probes, collapse diagnostics and retrieval, with baselines.

Every figure is computed three times in the same run, on the same held-out split: for the trained
encoder, for a randomly initialised encoder of the same architecture, and for raw pixels. Random-init ViT
features are a strong baseline on synthetic shapes, so only the gains say whether training helped:
`shape_linear_gain` = trained - random, `shape_linear_gain_pixels` = trained - pixels.

- linear probe: closed-form ridge regression on one-hot labels, ridge strength picked on a validation
  slice of the probe-training split, then refit on all of it;
- kNN probe: cosine k-nearest neighbours, majority vote;
- collapse diagnostics on CENTRED embeddings (an uncentred collapse to a constant vector plus noise
  would otherwise look healthy): mean per-dimension std of the normalised embeddings, scaled by sqrt(D)
  (1.0 means the spread is isotropic, 0 means collapse), and RankMe, the exponential of the entropy of
  the normalised singular values (effective rank, 1..D);
- for `jepa-text` checkpoints, image->text and text->image recall@1/@5 in the space the objective
  trained (the cross predictors, or the InfoNCE projections), with two definitions of a hit:
  `<dir>_attr_r<k>`: the retrieved item's shape, colour, count and position labels all equal the
  query's (an attribute-set hit); `<dir>_caption_r<k>`: its caption is identical to the query's (nearly
  unique captions make this one strict). Each comes with `_random` (random-init twin), `_chance` (a
  random ranking, from the held-out labels or captions themselves) and `_gain` (trained - random).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from workers.context import JobContext
from workers.models.jepa import JEPA, preprocess
from workers.models.text import CrossModalJEPA, tokenize
from workers.train_jepa import LABELS, Dataset, build_model, load_data, load_model

Label = Literal["shape", "colour", "count", "position"]


class EvalParams(BaseModel):
    """`with:` parameters of an `evaluate` step for JEPA encoders."""

    model_config = ConfigDict(extra="forbid")

    labels: list[Label] = Field(default_factory=lambda: list(LABELS))  # type: ignore[arg-type]
    test_fraction: float = Field(0.3, gt=0, lt=1, description="held-out share when data has one split")
    max_examples: int | None = Field(None, ge=20, description="use at most this many examples")
    knn_k: int = Field(20, ge=1)
    ridge_grid: list[float] = Field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0])
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    baseline_seed: int = Field(12345, description="initialisation seed of the random-init baseline")
    device: Literal["auto", "cpu", "cuda"] = "auto"


# ----------------------------------------------------------------------------------------------------
# probes and diagnostics (numpy/torch float64, no learning-rate tuning needed)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return (train - mu) / sd, (test - mu) / sd


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Weights for standardised x [n, d] (bias column appended) and one-hot y; dual form when d > n."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    n, d = x.shape
    if d > n:
        return x.T @ torch.linalg.solve(x @ x.T + alpha * torch.eye(n, dtype=x.dtype), y)
    return torch.linalg.solve(x.T @ x + alpha * torch.eye(d, dtype=x.dtype), x.T @ y)


def _ridge_predict(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w).argmax(1)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0),
) -> float:
    """Held-out accuracy of a ridge classifier; alpha chosen on the last 20 % of the training split."""
    tr, te = _standardise(train_x.astype(np.float64), test_x.astype(np.float64))
    xtr, xte = torch.from_numpy(tr), torch.from_numpy(te)
    classes = int(max(train_y.max(), test_y.max())) + 1
    y = torch.nn.functional.one_hot(torch.from_numpy(train_y), classes).double()
    cut = int(0.8 * len(xtr))
    best = max(
        alphas,
        key=lambda a: float(
            (_ridge_predict(xtr[cut:], _ridge_fit(xtr[:cut], y[:cut], a)) == torch.from_numpy(train_y[cut:]))
            .double()
            .mean()
        ),
    )
    pred = _ridge_predict(xte, _ridge_fit(xtr, y, best))
    return float((pred == torch.from_numpy(test_y)).double().mean())


def knn_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 20) -> float:
    """Held-out accuracy of a cosine k-NN majority vote on centred features."""
    mu = train_x.mean(0)
    a = torch.nn.functional.normalize(torch.from_numpy(train_x - mu).double(), dim=1)
    b = torch.nn.functional.normalize(torch.from_numpy(test_x - mu).double(), dim=1)
    nearest = (b @ a.T).topk(min(k, len(a)), dim=1).indices
    votes = torch.from_numpy(train_y)[nearest]
    classes = int(max(train_y.max(), test_y.max())) + 1
    counts = torch.nn.functional.one_hot(votes, classes).sum(1)
    return float((counts.argmax(1) == torch.from_numpy(test_y)).double().mean())


def collapse_stats(z: np.ndarray) -> dict[str, float]:
    """Diagnostics of CENTRED embeddings z [n, d]: `std` (sqrt(d) x mean per-dim std after l2
    normalisation; ~1 isotropic, 0 collapsed) and `rankme` (effective rank, exp of singular-value entropy)."""
    zc = torch.from_numpy(z - z.mean(0)).double()
    zn = torch.nn.functional.normalize(zc, dim=1)
    std = float(zn.std(0).mean() * math.sqrt(z.shape[1]))
    s = torch.linalg.svdvals(zc)
    p = s / s.sum().clamp(min=1e-12) + 1e-12
    return {"std": std, "rankme": float(torch.exp(-(p * p.log()).sum()))}


def recall_at(
    sim: np.ndarray, query_caps: Sequence[str], gallery_caps: Sequence[str], ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Share of queries whose top-k gallery items include one with the same key (a caption, or an
    attribute set as built by `attribute_keys`)."""
    order = np.argsort(-sim, axis=1, kind="stable")
    g = np.asarray(gallery_caps)
    q = np.asarray(query_caps)
    return {k: float(np.mean((g[order[:, :k]] == q[:, None]).any(1))) for k in ks}


def recall_chance(
    query_caps: Sequence[str], gallery_caps: Sequence[str], ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Expected recall@k of a random ranking (accounts for duplicate keys)."""
    counts: dict[str, int] = {}
    for c in gallery_caps:
        counts[c] = counts.get(c, 0) + 1
    n = len(gallery_caps)
    out = {}
    for k in ks:
        miss = [math.comb(n - counts.get(c, 0), k) / math.comb(n, k) for c in query_caps]
        out[k] = 1.0 - float(np.mean(miss))
    return out


RETRIEVAL_LABELS = ("shape", "colour", "count", "position")


def attribute_keys(labels: Mapping[str, np.ndarray], names: Sequence[str] = RETRIEVAL_LABELS) -> list[str]:
    """One key per example, equal for two examples iff all the named labels are equal ("3/5/2/4")."""
    missing = [n for n in names if n not in labels]
    if missing:
        raise ValueError(f"attribute-set retrieval needs labels {missing}; the data has {sorted(labels)}")
    return ["/".join(map(str, row)) for row in zip(*(np.asarray(labels[n]).tolist() for n in names), strict=True)]


# ----------------------------------------------------------------------------------------------------
# embedding


@torch.no_grad()
def embed_images(model: JEPA | CrossModalJEPA, images: np.ndarray, batch: int, device: torch.device) -> np.ndarray:
    model.eval().to(device)
    out = [
        model.embed(preprocess(torch.from_numpy(images[i : i + batch])).to(device)).float().cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy()


@torch.no_grad()
def cross_embeddings(
    model: CrossModalJEPA, ds: Dataset, tok: Any, batch: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image keys, image->text queries, text keys, text->image queries) in the model's retrieval space."""
    ids, mask = tokenize(tok, ds.captions, model.text_cfg.max_len)
    zi, pt, zt, pi = [], [], [], []
    for i in range(0, len(ds), batch):
        img = model.embed(preprocess(torch.from_numpy(ds.images[i : i + batch])).to(device))
        txt = model.embed_text(ids[i : i + batch].to(device), mask[i : i + batch].to(device))
        zi.append(model.image_keys(img).float().cpu())
        pt.append(model.image_to_text(img).float().cpu())
        zt.append(model.text_keys(txt).float().cpu())
        pi.append(model.text_to_image(txt).float().cpu())
    return tuple(torch.cat(v).numpy() for v in (zi, pt, zt, pi))  # type: ignore[return-value]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-9)
    b = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-9)
    return a @ b.T


def _split(data: Any, params: EvalParams) -> tuple[Dataset, Dataset]:
    """(probe-train, held-out test): an explicit {train, test} pair, or a seeded split of one dataset."""
    if isinstance(data, Mapping) and "train" in data and "test" in data:
        return load_data(data["train"]), load_data(data["test"])
    if isinstance(data, tuple | list) and len(data) == 2:
        return load_data(data[0]), load_data(data[1])
    ds = load_data(data)
    perm = np.random.default_rng(params.seed).permutation(len(ds))
    if params.max_examples:
        perm = perm[: params.max_examples]
    cut = int(len(perm) * (1 - params.test_fraction))
    return ds.subset(perm[:cut]), ds.subset(perm[cut:])


def cross_modal_recall(
    model: CrossModalJEPA, random_model: CrossModalJEPA, test: Dataset, tok: Any, batch: int, device: torch.device
) -> dict[str, float]:
    """i2t/t2i recall@1/@5, attribute-set (`attr`) and exact-caption (`caption`) hits, for the model and
    its random-init twin, with chance from the held-out keys themselves and the gain."""
    keys = {"caption": list(test.captions)}
    if all(n in test.labels for n in RETRIEVAL_LABELS):
        keys["attr"] = attribute_keys(test.labels)
    report: dict[str, float] = {}
    for suffix, m in (("", model), ("_random", random_model)):
        m.to(device)
        zi, pt, zt, pi = cross_embeddings(m, test, tok, batch, device)
        for direction, sim in (("i2t", _cosine(pt, zt)), ("t2i", _cosine(pi, zi))):
            for hit, key in keys.items():
                for k, v in recall_at(sim, key, key).items():
                    report[f"{direction}_{hit}_r{k}{suffix}"] = v
    for hit, key in keys.items():
        chance = recall_chance(key, key)
        for direction in ("i2t", "t2i"):
            for k in (1, 5):
                name = f"{direction}_{hit}_r{k}"
                report[f"{name}_chance"] = chance[k]
                report[f"{name}_gain"] = report[name] - report[f"{name}_random"]
    return report


def bar_chart(report: dict[str, float], labels: Sequence[str], path: Path) -> Path:
    """Grouped bars: trained / random init / pixels, for each label's linear and kNN probe."""
    import matplotlib  # only when a plot is drawn: the backend must be set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{lab}_{probe}" for lab in labels for probe in ("linear", "knn")]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names)), 3.8))
    for i, (suffix, title) in enumerate([("", "trained"), ("_random", "random init"), ("_pixels", "pixels")]):
        ax.bar(x + (i - 1) * 0.27, [report.get(n + suffix, 0.0) for n in names], 0.27, label=title)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# the job


def evaluate_encoder(
    ctx: JobContext, params: EvalParams | Mapping[str, Any], checkpoint_path: Path | str, data: Any
) -> dict[str, float]:
    """Probe a JEPA checkpoint against a random-init twin and raw pixels; returns flat metrics."""
    params = EvalParams.model_validate(params)
    device = torch.device(
        "cuda" if params.device == "cuda" or (params.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    model, train_params, tok = load_model(checkpoint_path)
    random_model = build_model(
        train_params.model_copy(update={"seed": params.baseline_seed}), tok.get_vocab_size() if tok else 0
    ).eval()
    train, test = _split(data, params)
    missing = [lab for lab in params.labels if lab not in train.labels]
    if missing:
        raise ValueError(f"data has no labels {missing}; it has {sorted(train.labels)}")
    ctx.log(f"evaluating on {len(train)} probe-train / {len(test)} held-out examples")

    feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, m in (("", model), ("_random", random_model)):
        feats[name] = (
            embed_images(m, train.images, params.batch_size, device),
            embed_images(m, test.images, params.batch_size, device),
        )
        ctx.raise_if_cancelled()
    feats["_pixels"] = (
        train.images.reshape(len(train), -1).astype(np.float32) / 255.0,
        test.images.reshape(len(test), -1).astype(np.float32) / 255.0,
    )

    report: dict[str, float] = {}
    for lab in params.labels:
        for suffix, (ftr, fte) in feats.items():
            ytr, yte = train.labels[lab], test.labels[lab]
            report[f"{lab}_linear{suffix}"] = linear_probe(ftr, ytr, fte, yte, params.ridge_grid)
            report[f"{lab}_knn{suffix}"] = knn_probe(ftr, ytr, fte, yte, params.knn_k)
        for probe in ("linear", "knn"):
            key = f"{lab}_{probe}"
            report[f"{key}_gain"] = report[key] - report[f"{key}_random"]
            report[f"{key}_gain_pixels"] = report[key] - report[f"{key}_pixels"]
        ctx.raise_if_cancelled()
    for suffix, (_, fte) in feats.items():
        for stat, value in collapse_stats(fte).items():
            report[f"{stat}{suffix}"] = value

    if isinstance(model, CrossModalJEPA) and isinstance(random_model, CrossModalJEPA) and test.captions:
        report.update(cross_modal_recall(model, random_model, test, tok, params.batch_size, device))

    out = ctx.workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(
        json.dumps(
            {"checkpoint": str(checkpoint_path), "n_train": len(train), "n_test": len(test), "metrics": report},
            indent=2,
            sort_keys=True,
        )
    )
    ctx.artifact(out / "report.json", kind="report", meta={"checkpoint": str(checkpoint_path)})
    ctx.artifact(
        bar_chart(report, params.labels, out / "probes.png"), kind="plot", meta={"checkpoint": str(checkpoint_path)}
    )
    return report
