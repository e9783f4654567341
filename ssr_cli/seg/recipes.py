"""Per-head training recipes of the segmenter: the ``ssr fit-seg`` defaults that depend on ``--head``.

Every option named in :data:`RECIPE_FIELDS` (and ``--output-stride``) defaults to ``None`` on
the command line and is filled here, in one place, from the recipe of the chosen head; a value
the user gave always wins. The numbers come from the reference implementations:

- ``deeplabv2`` — CLIP-ES's segmentation baseline, kazuto1011/deeplab-pytorch (``main.py``,
  ``configs/voc12.yaml``): SGD, lr 2.5e-4 on the backbone, 10x on the ASPP weights, 20x on the
  ASPP biases, momentum 0.9, weight decay 5e-4 (0 on the biases), poly 0.9, output stride 8,
  BatchNorm frozen (eval mode, its parameters left out of the optimizer); batch 5 x 2
  accumulation, crop 321, 20,000 iterations.
- ``deeplabv3plus`` and ``aspp`` (DeepLabV3) — VainF/DeepLabV3Plus-Pytorch (``main.py``): SGD,
  lr 0.01 on the head and 0.1x (0.001) on the backbone, momentum 0.9, weight decay 1e-4, poly
  0.9, output stride 16, BatchNorm trained; batch 16, crop 513, 30,000 iterations. VainF decays
  every parameter; here norms and biases get no weight decay (``--norm-decay --bias-decay``
  restore VainF's choice).

Batch, crop and iterations are shared by all heads (``--batch-size 10 --crop-size 321 --iters
20000``, CLIP-ES's effective batch); they bound memory and time more than they define a head.
``--optimizer adamw`` keeps its own lr (6e-5) and weight decay (0.01) defaults and takes the
rest (multipliers, frozen BatchNorm, decay exclusions) from the head's recipe.

Plain Python (no torch): the CLI's help imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ssr_cli.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """The training defaults of one head. ``lr`` is the backbone's learning rate; the head's
    weights train at ``lr * head_lr_mult``, its biases at ``lr * head_bias_lr_mult`` (when
    only ``--head-lr-mult`` is given, the biases keep the recipe's ratio to it)."""

    source: str
    output_stride: int
    lr: float
    head_lr_mult: float
    head_bias_lr_mult: float
    weight_decay: float
    momentum: float
    poly_power: float
    freeze_bn: bool
    bias_decay: bool
    norm_decay: bool


_VAINF = Recipe(
    source="VainF/DeepLabV3Plus-Pytorch",
    output_stride=16,
    lr=1e-3,
    head_lr_mult=10.0,
    head_bias_lr_mult=10.0,
    weight_decay=1e-4,
    momentum=0.9,
    poly_power=0.9,
    freeze_bn=False,
    bias_decay=False,
    norm_decay=False,
)

RECIPES: dict[str, Recipe] = {
    "deeplabv3plus": _VAINF,
    "aspp": _VAINF,
    "deeplabv2": Recipe(
        source="kazuto1011/deeplab-pytorch (CLIP-ES's DeepLabV2)",
        output_stride=8,
        lr=2.5e-4,
        head_lr_mult=10.0,
        head_bias_lr_mult=20.0,
        weight_decay=5e-4,
        momentum=0.9,
        poly_power=0.9,
        freeze_bn=True,
        bias_decay=False,
        norm_decay=False,  # moot: frozen BatchNorm is not optimised at all
    ),
}

RECIPE_FIELDS = (
    "lr",
    "head_lr_mult",
    "head_bias_lr_mult",
    "weight_decay",
    "momentum",
    "poly_power",
    "freeze_bn",
    "bias_decay",
    "norm_decay",
)
ADAMW_DEFAULTS: dict[str, float] = {"lr": 6e-5, "weight_decay": 0.01}


def recipe_for(head: str) -> Recipe:
    """The recipe of ``head``; a one-line ConfigError for an unknown head."""
    try:
        return RECIPES[head]
    except KeyError:
        raise ConfigError(f"--head {head!r} is not known", hint=f"use one of {', '.join(RECIPES)}") from None


def fill_defaults(
    head: str, train: dict[str, Any], output_stride: int | None
) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """Fill the ``None`` entries of ``train`` (TrainConfig fields) and ``output_stride`` from the
    recipe of ``head``.

    Returns (the completed train dict, the output stride, a record for the manifest: head,
    source, the recipe's values, which fields came from it and which the user gave).
    """
    recipe = recipe_for(head)
    filled = dict(train)
    optimizer = filled.get("optimizer") or "sgd"
    from_recipe: list[str] = []
    given: list[str] = []
    for name in RECIPE_FIELDS:
        if filled.get(name) is not None:
            given.append(name)
            continue
        if optimizer == "adamw" and name in ADAMW_DEFAULTS:
            filled[name] = ADAMW_DEFAULTS[name]
        elif name == "head_bias_lr_mult":  # keeps the recipe's ratio to a given --head-lr-mult
            filled[name] = filled["head_lr_mult"] * recipe.head_bias_lr_mult / recipe.head_lr_mult
            from_recipe.append(name)
        else:
            filled[name] = getattr(recipe, name)
            from_recipe.append(name)
    if output_stride is None:
        output_stride = recipe.output_stride
        from_recipe.append("output_stride")
    else:
        given.append("output_stride")
    record = {
        "head": head,
        "source": recipe.source,
        "values": {k: v for k, v in asdict(recipe).items() if k != "source"},
        "from_recipe": from_recipe,
        "given": given,
    }
    if optimizer == "adamw":
        record["adamw_defaults"] = {k: v for k, v in ADAMW_DEFAULTS.items() if k not in given}
    return filled, output_stride, record
