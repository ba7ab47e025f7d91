"""A small text encoder for synthetic captions, and the cross-modal JEPA that ties it to images.

The tokenizer (WordPiece, `tokenizers`) is fitted locally to the dataset's captions; the encoder is a
`transformers` BERT built from a config, never from downloaded weights. `CrossModalJEPA` adds two small
predictors, image latent -> caption latent and back, so the two encoders share a latent space; both
latents are kept from collapsing by SIGReg (there is no EMA teacher on the text side).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn

from workers.models.jepa import JEPA, JepaConfig, sigreg

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


class TextConfig(BaseModel):
    """Text encoder size and the cross-modal objective. Defaults suit the `tiny` image preset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = 256
    hidden: int = 96
    layers: int = 2
    heads: int = 3
    max_len: int = 32
    cross_weight: float = 1.0  # weight of the image<->text prediction losses
    sigreg_weight: float = 1.0  # on the pooled image and text latents (0.05 let the text latent collapse)
    pred_hidden: int = 192


TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "rtx3090": {"vocab_size": 1024, "hidden": 384, "layers": 6, "heads": 6, "pred_hidden": 768},
}


def train_tokenizer(captions: Sequence[str], vocab_size: int = 256) -> Tokenizer:
    """A lower-casing WordPiece tokenizer fitted to `captions`; adds [CLS] ... [SEP] when encoding.

    The vocabulary is counted here rather than by `trainers.WordPieceTrainer`, whose result changes from
    process to process (ties are broken in hash order), which would break exact resume and
    reproducibility: specials, then every character (as a word start and as a `##` continuation, so any
    word of the captions' alphabet can be spelled), then whole words by descending count, ties in
    alphabetical order, until `vocab_size`.
    """
    tok = Tokenizer(models.WordPiece(vocab={s: i for i, s in enumerate(SPECIALS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in captions:
        normalised = tok.normalizer.normalize_str(text)
        counts.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(normalised))
    chars = sorted({ch for word in counts for ch in word})
    vocab = [*SPECIALS, *chars, *(f"##{ch}" for ch in chars)]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
    tok.add_special_tokens(SPECIALS)  # so decode() skips them
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def tokenize(tok: Tokenizer, captions: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask, [N, max_len] each, right-padded with [PAD] and truncated."""
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=max_len)
    tok.enable_truncation(max_length=max_len)
    encoded = tok.encode_batch(list(captions))
    ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
    return ids, mask


class TextEncoder(nn.Module):
    """BERT from a config; the caption latent is the masked mean of the last hidden states."""

    def __init__(self, cfg: TextConfig, vocab_size: int) -> None:
        super().__init__()
        # transformers (~1 s of CPU to import) is loaded only when a text encoder is built: image-only
        # jobs and the unit tests that import this module for `tokenize` never pay for it.
        from transformers import BertConfig, BertModel

        bert_cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=4 * cfg.hidden,
            max_position_embeddings=cfg.max_len,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = BertModel(bert_cfg, add_pooling_layer=False)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class CrossModalJEPA(nn.Module):
    """Image JEPA + text encoder + predictors image latent <-> caption latent."""

    def __init__(self, image_cfg: JepaConfig, text_cfg: TextConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = image_cfg
        self.text_cfg = text_cfg
        self.image = JEPA(image_cfg)
        self.text = TextEncoder(text_cfg, vocab_size)
        self.img2txt = _mlp(image_cfg.embed_dim, text_cfg.pred_hidden, text_cfg.hidden)
        self.txt2img = _mlp(text_cfg.hidden, text_cfg.pred_hidden, image_cfg.embed_dim)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        return self.image.embed(images)

    @torch.no_grad()
    def embed_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.text(ids, mask)

    def update_target(self, momentum: float) -> None:
        self.image.update_target(momentum)

    def ema_momentum(self, progress: float) -> float:
        return self.image.ema_momentum(progress)

    def forward(
        self,
        images: Tensor,
        ctx_idx: Tensor,
        tgt_idx: Tensor,
        ids: Tensor,
        mask: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss, out = self.image(images, ctx_idx, tgt_idx, generator)
        tokens = out["tokens"]
        # in EMA mode the full-image tokens come from the frozen target; the cross loss must train the
        # online encoder, so encode again with it
        z_img = (self.image.encoder(images) if self.image.target_encoder is not None else tokens).mean(1)
        z_txt = self.text(ids, mask)
        cross = F.mse_loss(self.img2txt(z_img), z_txt) + F.mse_loss(self.txt2img(z_txt), z_img)
        reg = sigreg(z_img, generator=generator) + sigreg(z_txt, generator=generator)
        t = self.text_cfg
        loss = loss + t.cross_weight * cross + t.sigreg_weight * reg
        out.update(cross_loss=cross.detach(), text_sigreg=reg.detach())
        return loss, out
