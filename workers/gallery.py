"""What an image encoder sees in a picture: the captions of its nearest captioned images, and kNN probes.

A gallery is a captioned dataset (the `shapes` generator's, say). It is embedded once per encoder (and
adapter) and kept with the warm model, so a playground request embeds only its one picture. The
probes are the evaluation's kNN probe (`workers/eval/encoders.py`): a majority vote of the k nearest
gallery images on each label the dataset has.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.jobs import JobFailed

PROBE_LABELS = ("shape", "colour", "count", "position")
MAX_PICTURE_BYTES = 4 * 2**20
MAX_GALLERY = 5000  # images embedded per gallery (the first ones of the dataset)
KEEP = 4  # galleries kept embedded


@dataclass
class Gallery:
    z: np.ndarray  # [N, D] unit vectors
    captions: list[str]
    labels: dict[str, np.ndarray]  # label -> [N] ids
    names: dict[str, list[str]]  # label -> the name of each id, where the generator names them
    texts: list[str] | None = None  # the distinct captions, for an encoder with a text side (jepa-text)
    text_z: np.ndarray | None = None  # [T, D'] their text latents, unit vectors


_CACHE: OrderedDict[str, Gallery] = OrderedDict()
_LOCK = threading.Lock()


def decode_picture(encoded: str, size: int) -> np.ndarray:
    """A base64 PNG/JPEG (a `data:` URL is accepted) as an RGB uint8 [size, size, 3], resized to fit."""
    from PIL import Image, UnidentifiedImageError

    text = encoded.split(",", 1)[1] if encoded.startswith("data:") else encoded
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise JobFailed("image_png: not base64 (send a PNG or JPEG file, base64-encoded)") from None
    if len(raw) > MAX_PICTURE_BYTES:
        raise JobFailed(f"image_png: {len(raw)} bytes; at most {MAX_PICTURE_BYTES} are accepted")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            if img.width * img.height > 40_000_000:
                raise JobFailed(f"image_png: {img.width}x{img.height} pixels is too large")
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise JobFailed("image_png: not a readable image (PNG or JPEG)") from None
    return np.asarray(rgb, dtype=np.uint8)


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """An HxWx3 uint8 image at the encoder's input size."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise JobFailed(f"image: shape {list(image.shape)}; an image is HxWx3")
    if image.shape[0] == image.shape[1] == size:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def _unit(z: np.ndarray) -> np.ndarray:
    return (z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-9)).astype(np.float32)


def _names(generator: str) -> dict[str, list[str]]:
    if generator != "shapes":
        return {}
    from workers.synth.shapes import COLOURS, POSITIONS, SHAPES

    return {"shape": list(SHAPES), "colour": list(COLOURS), "position": list(POSITIONS)}


def gallery(
    key: str,
    arrays: Callable[[], tuple[str, dict[str, np.ndarray]]],
    embed: Callable[[np.ndarray], np.ndarray],
    embed_texts: Callable[[list[str]], np.ndarray] | None = None,
) -> tuple[Gallery, bool]:
    """The embedded gallery for `key` (encoder, adapter, dataset), embedding it on a miss; (gallery, was_warm).
    With `embed_texts` (a jepa-text encoder) its distinct captions are put in the text space too."""
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key], True
    generator, data = arrays()
    if "images" not in data or "caption" not in data:
        have = ", ".join(sorted(data))
        raise JobFailed(f"gallery: the dataset has no images with captions (it has {have}); use a `shapes` dataset")
    n = min(len(data["images"]), MAX_GALLERY)
    labels = {k: np.asarray(data[k][:n]) for k in PROBE_LABELS if k in data}
    found = Gallery(
        z=_unit(embed(np.asarray(data["images"][:n], dtype=np.uint8))),
        captions=[str(c) for c in data["caption"][:n]],
        labels=labels,
        names=_names(generator),
    )
    if embed_texts is not None:
        found.texts = sorted(set(found.captions))
        found.text_z = _unit(embed_texts(found.texts))
    with _LOCK:
        _CACHE[key] = found
        while len(_CACHE) > KEEP:
            _CACHE.popitem(last=False)
    return found, False


def look(found: Gallery, z: np.ndarray, k: int, z_text: np.ndarray | None = None) -> dict[str, Any]:
    """The k nearest gallery images of one embedding: their captions, and the kNN vote on each label.
    With `z_text` (the encoder's prediction of the picture's caption latent), also the k captions
    nearest to it in the text space (`text_matches`)."""
    sims = found.z @ _unit(z.reshape(1, -1))[0]
    k = min(k, len(sims))
    order = np.argsort(-sims, kind="stable")[:k]
    neighbours = [{"index": int(i), "similarity": float(sims[i]), "caption": found.captions[i]} for i in order]
    captions: list[str] = []
    for nb in neighbours:
        if nb["caption"] not in captions:
            captions.append(nb["caption"])
    probes: dict[str, Any] = {}
    for label, ids in found.labels.items():
        votes: dict[int, int] = {}
        for i in order:
            votes[int(ids[i])] = votes.get(int(ids[i]), 0) + 1
        best = max(votes, key=lambda v: (votes[v], -v))  # ties: the smaller id, as a stable rule
        names = found.names.get(label)

        def name(v: int, names: list[str] | None = names) -> str:
            return names[v] if names and 0 <= v < len(names) else str(v)

        probes[label] = {
            "prediction": name(best),
            "share": votes[best] / k,
            "votes": {name(v): c for v, c in sorted(votes.items(), key=lambda item: -item[1])},
        }
    text_matches = None
    if z_text is not None and found.text_z is not None and found.texts is not None:
        scores = found.text_z @ _unit(z_text.reshape(1, -1))[0]
        nearest = np.argsort(-scores, kind="stable")[: min(k, len(scores))]
        text_matches = [{"caption": found.texts[i], "similarity": float(scores[i])} for i in nearest]
    return {"neighbours": neighbours, "captions": captions, "probes": probes, "k": k, "text_matches": text_matches}
