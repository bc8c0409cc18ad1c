"""Judge the digits demo's samples: a classifier trained on scikit-learn's real digits scores them.

    python train_flax.py --config=configs/digits.py          # writes ddpm-digits-8/
    python bench/judge_digits.py ddpm-digits-8                # 300 samples, diffusers' DDIM, 100 steps

Draws N samples with diffusers' own `DDPMPipeline` (its scheduler swapped for `DDIMScheduler`, 100 steps: what a
user of the exported folder runs, no uncond-flax involved), takes them back to 8x8 as scikit-learn's digits are, and
prints the classifier's mean confidence (mean of the top class probability) and the share of each predicted
digit, beside the same for held-out real digits. Good samples: confidence near the real digits' (the issue's
target is >= 0.80) and all ten digits near 10 % each. Slow on purpose; never part of a timed run.

Back to 8x8 (`--shrink`): `inverse` (default) undoes the trainer's own resize (antialiased bilinear, 8 px to the
model's resolution) by least squares, which gives a real digit back to within 2/255, so a perfect model scores
what real digits score. `area` (2x2 means; the judge's first version) blurs: real digits sent through the demo's
16 px resize and back by `area` score 0.83, not 0.90, so it caps what any sample can reach. Both are printed,
with that ceiling (the "real via N px" line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the trainer's resize, for undoing it (uncond_flax need not be installed)

HOLDOUT_FRACTION = 0.25


def train_judge(seed: int = 0) -> tuple[object, np.ndarray, np.ndarray]:
    """(classifier, held-out images (N, 8, 8) in [0, 1], their labels); trained on the other 75 % of the digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=HOLDOUT_FRACTION, random_state=seed, stratify=digits.target
    )
    # Logistic regression rather than a deeper net: its confidence drops on what is not a digit (noise, blends of
    # two digits, blanks score about 0.4-0.55 against 0.9 for real digits), which is what a judge must see.
    judge = LogisticRegression(max_iter=2000)
    judge.fit(x_train.reshape(len(x_train), -1), y_train)
    return judge, x_test, y_test


def to_digit_grid(images_NHWC: np.ndarray) -> np.ndarray:
    """Images in [0, 1], (N, H, W, C) with H, W multiples of 8 -> (N, 8, 8) grayscale by area averaging."""
    gray = np.asarray(images_NHWC, np.float64).mean(axis=-1)
    n, h, w = gray.shape
    if h % 8 or w % 8:
        raise ValueError(f"images are {h}x{w}; the judge needs sides that are multiples of 8")
    return gray.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))


def resize_operator(resolution: int) -> np.ndarray:
    """(resolution**2, 64): the trainer's resize of an 8x8 image to `resolution` px as a matrix (it is linear)."""
    from uncond_flax.data.transforms import resize_unit_float

    basis = np.eye(64, dtype=np.float32).reshape(64, 8, 8, 1)
    return np.stack([resize_unit_float(b, resolution).reshape(-1) for b in basis], axis=1).astype(np.float64)


def undo_resize(images_NHWC: np.ndarray) -> np.ndarray:
    """Square images in [0, 1] -> (N, 8, 8): the 8x8 images whose trainer-resize is nearest (least squares)."""
    gray = np.asarray(images_NHWC, np.float64).mean(axis=-1)
    n, h, w = gray.shape
    if h != w or h < 8:
        raise ValueError(f"images are {h}x{w}; the judge needs square images of at least 8 px")
    inverse = np.linalg.pinv(resize_operator(h))  # well conditioned (about 3.6 at 16 px): noise is not amplified
    return np.clip(gray.reshape(n, -1) @ inverse.T, 0.0, 1.0).reshape(n, 8, 8)


SHRINKS = {"inverse": undo_resize, "area": to_digit_grid}


def through_demo_resize(digits_N88: np.ndarray, resolution: int) -> np.ndarray:
    """Real digits (in [0, 1]) as the trainer feeds them at `resolution` px: (N, H, W, 1) in [0, 1]."""
    from uncond_flax.data.transforms import load_resized

    levels = np.rint(np.asarray(digits_N88) * 255.0).astype(np.uint8)  # what the digits source holds
    return np.stack([load_resized(image, resolution, "L") for image in levels]).astype(np.float64) / 255.0


def score(judge: object, digits_N88: np.ndarray) -> dict:
    """Mean top-class probability, and the share of each predicted digit (0..9)."""
    probs = judge.predict_proba(np.asarray(digits_N88).reshape(len(digits_N88), -1))
    predicted = probs.argmax(axis=1)
    shares = np.bincount(predicted, minlength=10) / len(predicted)
    return {
        "n": len(predicted),
        "mean_confidence": float(probs.max(axis=1).mean()),
        "class_shares": [float(s) for s in shares],  # unrounded: they sum to 1
        "digits_present": int((shares > 0).sum()),
    }


def sample_with_diffusers(folder: str, num_images: int, steps: int, seed: int, batch: int = 100) -> np.ndarray:
    """(N, H, W, C) in [0, 1] from the folder's DDPMPipeline, sampled by diffusers' DDIMScheduler (eta 0)."""
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    ddpm = DDPMPipeline.from_pretrained(folder)
    pipe = DDIMPipeline(unet=ddpm.unet, scheduler=DDIMScheduler.from_config(ddpm.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.manual_seed(seed)
    chunks = []
    for start in range(0, num_images, batch):
        out = pipe(
            batch_size=min(batch, num_images - start), num_inference_steps=steps, generator=generator, output_type="np"
        )
        chunks.append(out.images)
    return np.concatenate(chunks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="an exported DDPMPipeline folder, e.g. ddpm-digits-8")
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shrink", choices=sorted(SHRINKS), default="inverse", help="how samples go back to 8x8")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    judge, x_test, y_test = train_judge(args.seed)
    real = score(judge, x_test)
    real["accuracy"] = float((judge.predict(x_test.reshape(len(x_test), -1)) == y_test).mean())
    images = sample_with_diffusers(args.pipeline, args.num_samples, args.steps, args.seed)
    resolution = images.shape[1]
    results = {"samples": score(judge, SHRINKS[args.shrink](images)), "real": real}
    # The ceiling a perfect model reaches with this shrink, and the samples by the other one (to compare runs).
    results["real_through_demo"] = score(judge, SHRINKS[args.shrink](through_demo_resize(x_test, resolution)))
    other = next(name for name in SHRINKS if name != args.shrink)
    results[f"samples_{other}"] = score(judge, SHRINKS[other](images))
    for result in results.values():
        gap = np.abs(np.subtract(result["class_shares"], real["class_shares"]))
        result["class_tv"] = round(0.5 * float(gap.sum()), 4)
    if args.json:
        print(json.dumps({"shrink": args.shrink, "resolution": resolution, **results}))
        return 0
    names = {
        "real": "held-out real digits",
        "real_through_demo": f"real via {resolution} px, {args.shrink}",
        "samples": f"samples, {args.shrink}",
        f"samples_{other}": f"samples, {other}",
    }
    print(f"{args.num_samples} samples by DDIM-{args.steps}; class_tv: total variation from the real digits' shares")
    for key, name in names.items():
        result = results[key]
        shares = " ".join(f"{d}:{s:.2f}" for d, s in enumerate(result["class_shares"]))
        print(
            f"{name:<28} n={result['n']:4d}  mean confidence {result['mean_confidence']:.3f}  "
            f"class_tv {result['class_tv']:.3f}  shares {shares}"
        )
    print(f"judge accuracy on held-out real digits: {real['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
