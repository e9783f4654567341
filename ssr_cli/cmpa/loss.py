"""The cross-modal prototype contrastive loss of CMPA (METHOD.md section 2).

InfoNCE with cosine similarities and a learnable temperature tau:
``l(a) = -log( exp(S_pos/tau) / (exp(S_pos/tau) + sum_j exp(S_neg_j/tau)) )``.

- image -> text: each foreground image feature (class c) against the text prototypes:
  positive = class c's, negatives = every other class's and every background word's
  (the background words are the other texts of the CAM's softmax: our choice);
- text -> image: each prompt's TSA feature (class c, only classes with image
  prototypes) against the image prototypes: positive = the nearest of class c's M
  prototypes, negatives = every prototype of every other class (class c's other
  prototypes are left out of the denominator).

With ``text_live`` (``train-cmpa --text-target live``, the default), the image -> text
term scores the image features against the LIVE TSA class features of this step (the
mean of the class's normalised prompt features) instead of the text prototypes, which are
a snapshot refreshed every ``--proto-every`` steps: the seeds compare live ISA output with
live TSA output, so that is the similarity to train. A third term then pushes the
cross-modal prototypes of different classes apart: each class's image prototype (the
mean of its M centroids) against the live class features, positive = its own class.

``L`` = the mean of the terms that have anchors. Prototypes are constants; gradients
reach ISA through the image features, TSA through the text features, and tau through all.

Imports torch: import lazily.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssr_cli.cmpa.prototypes import Prototypes


def prototype_loss(
    img_feats: torch.Tensor,
    img_cls: torch.Tensor,
    txt_feats: torch.Tensor,
    txt_cls: torch.Tensor,
    protos: Prototypes,
    inv_tau: torch.Tensor,
    text_live: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, detached statistics) for one step.

    ``img_feats`` [P, d2] and ``txt_feats`` [Q, d2] L2-normalised, ``img_cls`` [P] /
    ``txt_cls`` [Q] 0-based class indices, ``inv_tau`` = 1/tau (0-d), ``text_live`` [K, d2]
    (L2-normalised, with gradient) or None. Statistics: ``loss_i2t``, ``loss_t2i``,
    ``loss_proto`` (NaN when absent) and the anchor counts.
    """
    k, m, dim = protos.image.shape
    terms = []
    nan = img_feats.new_tensor(float("nan"))
    stats: dict[str, torch.Tensor] = {}
    if img_feats.shape[0]:
        text = protos.text if text_live is None else text_live
        bank = torch.cat(
            [text.to(img_feats.dtype), protos.background.to(img_feats.dtype)], dim=0
        )  # [K+B, d2]
        logits = inv_tau * (img_feats @ bank.t())
        l_i2t = F.cross_entropy(logits, img_cls)
        terms.append(l_i2t)
        stats["loss_i2t"] = l_i2t.detach()
    else:
        stats["loss_i2t"] = nan
    keep = protos.valid[txt_cls]
    if bool(keep.any()):
        tf, tc = txt_feats[keep], txt_cls[keep]
        sims = torch.einsum("qd,kmd->qkm", tf, protos.image.to(tf.dtype))  # [Q, K, M]
        pos = sims[torch.arange(tf.shape[0], device=tf.device), tc].max(dim=1).values  # [Q]
        other = protos.valid.unsqueeze(0) & (
            torch.arange(k, device=tf.device).unsqueeze(0) != tc.unsqueeze(1)
        )
        keep_neg = other.unsqueeze(-1).expand(-1, -1, m).reshape(tf.shape[0], k * m)
        logits = inv_tau * torch.cat([pos.unsqueeze(1), sims.reshape(tf.shape[0], k * m)], dim=1)
        mask = torch.cat([torch.ones_like(keep_neg[:, :1]), keep_neg], dim=1)
        logits = logits.masked_fill(~mask, float("-inf"))  # after the scaling: no 0 * inf in d/d tau
        l_t2i = F.cross_entropy(logits, torch.zeros_like(tc))
        terms.append(l_t2i)
        stats["loss_t2i"] = l_t2i.detach()
    else:
        stats["loss_t2i"] = nan
    stats["loss_proto"] = nan
    if text_live is not None and int(protos.valid.sum()) >= 2:
        valid = protos.valid.nonzero().flatten()
        image_protos = F.normalize(protos.image[valid].mean(dim=1), dim=-1).to(text_live.dtype)  # [V, d2]
        logits = inv_tau * (image_protos @ text_live[valid].t())
        l_proto = F.cross_entropy(logits, torch.arange(valid.numel(), device=logits.device))
        terms.append(l_proto)
        stats["loss_proto"] = l_proto.detach()
    if not terms:
        return (inv_tau * 0.0), stats  # keeps the graph (DDP) with a zero gradient
    loss = torch.stack(terms).mean()
    stats["anchors_image"] = img_feats.new_tensor(float(img_feats.shape[0]))
    stats["anchors_text"] = img_feats.new_tensor(float(keep.sum()))
    return loss, stats


def similarity_stats(
    img_feats: torch.Tensor, img_cls: torch.Tensor, text_live: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cos of image features to their class's live text feature, mean cos to the
    other classes'): ``img_feats`` [P, d2], ``text_live`` [K, d2] (normalised)."""
    if img_feats.shape[0] == 0:
        nan = text_live.new_tensor(float("nan"))
        return nan, nan
    sims = img_feats.detach().float() @ text_live.detach().float().t()  # [P, K]
    same = sims[torch.arange(sims.shape[0], device=sims.device), img_cls]
    k = sims.shape[1]
    if k < 2:
        return same.mean(), text_live.new_tensor(float("nan"))
    other = (sims.sum(dim=1) - same) / (k - 1)
    return same.mean(), other.mean()
