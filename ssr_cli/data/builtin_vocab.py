"""The built-in class vocabularies: PASCAL VOC 2012 and COCO 2014, as CLIP-ES uses them.

Facts from CLIP-ES (CVPR 2023, ``clip_text.py``): the single template
``a clean origami {}.``, the per-class prompt strings with synonyms folded in,
and the background words. The COCO prompt strings are kept exactly as CLIP-ES
has them, including its spelling ``sknowboard`` for snowboard, because the
published numbers were obtained with those strings. Canonical class names are
the dataset's own (VOC: ``aeroplane`` ... ``tvmonitor``; COCO: the standard 80
category names ``person`` ... ``toothbrush``) so that label files are easy to
write; ``ALIASES`` adds the other common spellings.
"""

from __future__ import annotations

CLIP_ES_TEMPLATES: tuple[str, ...] = ("a clean origami {}.",)

# (canonical name, CLIP-ES prompt string)
_VOC: tuple[tuple[str, str], ...] = (
    ("aeroplane", "aeroplane"),
    ("bicycle", "bicycle"),
    ("bird", "bird avian"),
    ("boat", "boat"),
    ("bottle", "bottle"),
    ("bus", "bus"),
    ("car", "car"),
    ("cat", "cat"),
    ("chair", "chair seat"),
    ("cow", "cow"),
    ("diningtable", "diningtable"),
    ("dog", "dog"),
    ("horse", "horse"),
    ("motorbike", "motorbike"),
    ("person", "person with clothes,people,human"),
    ("pottedplant", "pottedplant"),
    ("sheep", "sheep"),
    ("sofa", "sofa"),
    ("train", "train"),
    ("tvmonitor", "tvmonitor screen"),
)

VOC_CLASSES: tuple[str, ...] = tuple(name for name, _ in _VOC)
VOC_PROMPTS: tuple[str, ...] = tuple(prompt for _, prompt in _VOC)

VOC_BACKGROUND: tuple[str, ...] = (
    "ground",
    "land",
    "grass",
    "tree",
    "building",
    "wall",
    "sky",
    "lake",
    "water",
    "river",
    "sea",
    "railway",
    "railroad",
    "keyboard",
    "helmet",
    "cloud",
    "house",
    "mountain",
    "ocean",
    "road",
    "rock",
    "street",
    "valley",
    "bridge",
    "sign",
)

# COCO's background list is VOC's without "keyboard" (a COCO class) and "sign".
COCO_BACKGROUND: tuple[str, ...] = tuple(w for w in VOC_BACKGROUND if w not in ("keyboard", "sign"))

_COCO: tuple[tuple[str, str], ...] = (
    ("person", "person with clothes,people,human"),
    ("bicycle", "bicycle"),
    ("car", "car"),
    ("motorcycle", "motorbike"),
    ("airplane", "aeroplane"),
    ("bus", "bus"),
    ("train", "train"),
    ("truck", "truck"),
    ("boat", "boat"),
    ("traffic light", "traffic light"),
    ("fire hydrant", "fire hydrant"),
    ("stop sign", "stop sign"),
    ("parking meter", "parking meter"),
    ("bench", "bench"),
    ("bird", "bird avian"),
    ("cat", "cat"),
    ("dog", "dog"),
    ("horse", "horse"),
    ("sheep", "sheep"),
    ("cow", "cow"),
    ("elephant", "elephant"),
    ("bear", "bear"),
    ("zebra", "zebra"),
    ("giraffe", "giraffe"),
    ("backpack", "backpack,bag"),
    ("umbrella", "umbrella,parasol"),
    ("handbag", "handbag,purse"),
    ("tie", "necktie"),
    ("suitcase", "suitcase"),
    ("frisbee", "frisbee"),
    ("skis", "skis"),
    ("snowboard", "sknowboard"),  # sic: CLIP-ES's string
    ("sports ball", "sports ball"),
    ("kite", "kite"),
    ("baseball bat", "baseball bat"),
    ("baseball glove", "glove"),
    ("skateboard", "skateboard"),
    ("surfboard", "surfboard"),
    ("tennis racket", "tennis racket"),
    ("bottle", "bottle"),
    ("wine glass", "wine glass"),
    ("cup", "cup"),
    ("fork", "fork"),
    ("knife", "knife"),
    ("spoon", "dessertspoon"),
    ("bowl", "bowl"),
    ("banana", "banana"),
    ("apple", "apple"),
    ("sandwich", "sandwich"),
    ("orange", "orange"),
    ("broccoli", "broccoli"),
    ("carrot", "carrot"),
    ("hot dog", "hot dog"),
    ("pizza", "pizza"),
    ("donut", "donut"),
    ("cake", "cake"),
    ("chair", "chair seat"),
    ("couch", "sofa"),
    ("potted plant", "pottedplant"),
    ("bed", "bed"),
    ("dining table", "diningtable"),
    ("toilet", "toilet"),
    ("tv", "tvmonitor screen"),
    ("laptop", "laptop"),
    ("mouse", "mouse"),
    ("remote", "remote control"),
    ("keyboard", "keyboard"),
    ("cell phone", "cell phone"),
    ("microwave", "microwave"),
    ("oven", "oven"),
    ("toaster", "toaster"),
    ("sink", "sink"),
    ("refrigerator", "refrigerator"),
    ("book", "book"),
    ("clock", "clock"),
    ("vase", "vase"),
    ("scissors", "scissors"),
    ("teddy bear", "teddy bear"),
    ("hair drier", "hairdrier,blowdrier"),
    ("toothbrush", "toothbrush"),
)

COCO_CLASSES: tuple[str, ...] = tuple(name for name, _ in _COCO)
COCO_PROMPTS: tuple[str, ...] = tuple(prompt for _, prompt in _COCO)

# Other spellings accepted in label files and XML (matching also ignores case, spaces and '_').
VOC_ALIASES: dict[str, tuple[str, ...]] = {
    "aeroplane": ("airplane",),
    "motorbike": ("motorcycle",),
    "sofa": ("couch",),
    "tvmonitor": ("tv", "television"),
}
COCO_ALIASES: dict[str, tuple[str, ...]] = {
    "motorcycle": ("motorbike",),
    "airplane": ("aeroplane",),
    "couch": ("sofa",),
    "tv": ("tvmonitor", "television"),
    "hair drier": ("hair dryer",),
    "cell phone": ("mobile phone",),
}
