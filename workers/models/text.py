"""A small text encoder for synthetic captions, and the cross-modal JEPA that ties it to images.

The tokenizer (WordPiece, `tokenizers`) is fitted locally to the dataset's captions; the encoder is a
`transformers` BERT built from a config, never from downloaded weights. `CrossModalJEPA` ties the two
encoders together by one of two objectives (`TextConfig.align`):

- `predict`: two small predictors, image latent -> caption latent and back (MSE), both latents kept
  from collapsing by SIGReg (there is no EMA teacher on the text side);
- `infonce`: symmetric InfoNCE (CLIP): projections of the pooled image latent and of the caption latent
  into a shared space, where each image's own caption must outscore the batch's other captions and
  vice versa (temperature learnable or fixed); `both` adds the two.

Retrieval goes through `image_to_text`/`text_keys` and `text_to_image`/`image_keys`, which pick the
space the objective trained.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
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
    # infonce at weight 2: at the demo budget (200 steps, 3 seeds) attribute-set R@1 0.51/0.52 (i2t/t2i)
    # vs 0.48/0.50 at weight 1 and 0.01/0.03 for predict (docs/MODELS.md, "Cross-modal retrieval")
    align: Literal["predict", "infonce", "both"] = "infonce"
    cross_weight: float = Field(1.0, ge=0)  # weight of the image<->text prediction losses (predict, both)
    infonce_weight: float = Field(2.0, ge=0)  # weight of the symmetric InfoNCE loss (infonce, both)
    proj_dim: int = Field(64, ge=1)  # the shared space of InfoNCE
    temperature: float = Field(0.07, gt=0, le=1)  # initial (or fixed) softmax temperature of InfoNCE
    learn_temperature: bool = True
    sigreg_weight: float = Field(1.0, ge=0)  # on the pooled image and text latents (0.05 let the text latent collapse)
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
        if image_cfg.views and image_cfg.view_weight == 1.0:
            raise ValueError("jepa-text reads the image JEPA's full-image tokens; view_weight 1 skips them")
        self.cfg = image_cfg
        self.text_cfg = text_cfg
        self.image = JEPA(image_cfg)
        self.text = TextEncoder(text_cfg, vocab_size)
        self.img2txt = _mlp(image_cfg.embed_dim, text_cfg.pred_hidden, text_cfg.hidden)
        self.txt2img = _mlp(text_cfg.hidden, text_cfg.pred_hidden, image_cfg.embed_dim)
        self.contrastive = text_cfg.align != "predict"
        if self.contrastive:
            self.img_proj = _mlp(image_cfg.embed_dim, text_cfg.pred_hidden, text_cfg.proj_dim)
            self.txt_proj = _mlp(text_cfg.hidden, text_cfg.pred_hidden, text_cfg.proj_dim)
            log_scale = torch.tensor(math.log(1.0 / text_cfg.temperature))
            self.logit_scale: Tensor
            if text_cfg.learn_temperature:
                self.logit_scale = nn.Parameter(log_scale)
            else:
                self.register_buffer("logit_scale", log_scale)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        return self.image.embed(images)

    @torch.no_grad()
    def embed_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.text(ids, mask)

    # the retrieval space: image->text compares image_to_text(images) with text_keys(captions),
    # text->image compares text_to_image(captions) with image_keys(images) (cosine similarity)
    def image_to_text(self, z_img: Tensor) -> Tensor:
        return self.img_proj(z_img) if self.contrastive else self.img2txt(z_img)

    def text_keys(self, z_txt: Tensor) -> Tensor:
        return self.txt_proj(z_txt) if self.contrastive else z_txt

    def text_to_image(self, z_txt: Tensor) -> Tensor:
        return self.txt_proj(z_txt) if self.contrastive else self.txt2img(z_txt)

    def image_keys(self, z_img: Tensor) -> Tensor:
        return self.img_proj(z_img) if self.contrastive else z_img

    def infonce(self, z_img: Tensor, z_txt: Tensor) -> Tensor:
        """Symmetric InfoNCE over the batch: image i's positive is caption i, and caption i's is image i."""
        a = F.normalize(self.img_proj(z_img).float(), dim=-1)
        b = F.normalize(self.txt_proj(z_txt).float(), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * a @ b.T  # CLIP's cap on the scale
        target = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

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
        t = self.text_cfg
        reg = sigreg(z_img, generator=generator) + sigreg(z_txt, generator=generator)
        loss = loss + t.sigreg_weight * reg
        out["text_sigreg"] = reg.detach()
        if t.align in ("predict", "both"):
            cross = F.mse_loss(self.img2txt(z_img), z_txt) + F.mse_loss(self.txt2img(z_txt), z_img)
            loss = loss + t.cross_weight * cross
            out["cross_loss"] = cross.detach()
        if t.align in ("infonce", "both"):
            nce = self.infonce(z_img, z_txt)
            loss = loss + t.infonce_weight * nce
            out.update(infonce_loss=nce.detach(), logit_scale=self.logit_scale.detach().exp())
        return loss, out
