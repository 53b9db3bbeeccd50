#!/usr/bin/env python
"""Level decoding: level accuracy of one model's predictions decoded with several settings.

Runs the model once on a test split, keeps what the level decoder sees for every detection at
or above ``SPINE.LEVEL_HEAD.SCORE_THRESH`` (box centre, level log-probabilities over
SPINE.LEVELS), matches detections to the ground truth as VertebraEvaluator does (one-to-one,
mask IoU >= 0.5) and reports the level accuracy of the matched ones for each
``SPINE.LEVEL_HEAD.SPACING_WEIGHT`` in ``--spacing-weights`` (at the config's prior weight) and
for each ``SPINE.LEVEL_HEAD.PRIOR_WEIGHT`` in ``--prior-weights`` (framing prior of
``--prior-file``, default the config's; at the config's spacing weight). README, "CPU training
recipe and levels". Choose weights on a training split, confirm them on the test split.

    python benchmarks/bench_levels.py        # checkpoint v3 on spine_drr_test
    python benchmarks/bench_levels.py --config-file configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_stage1_cpu.yaml \\
        --weights output/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_stage1_cpu/model_final.pth --dataset spine_aasce_val

Prints one JSON line and saves it.
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import torch
from summarize import (  # benchmarks/ is on sys.path when run as a script
    SHIPPED_CONFIG,
    SHIPPED_WEIGHTS,
    float_list,
    write_result,
)
from tqdm import tqdm

_weights = float_list(lambda w: w >= 0, "weights must be >= 0")


def collect(cfg, weights: str, dataset: str, score_thresh: float) -> list:
    """Per image: (boxes XYXY, image height, level log-probs, [(gt index, detection index)]
    matched at IoU 0.5, gt level names) for the detections the decoder sees: at or above
    ``score_thresh``, and those the chain rescue accepted (SPINE.LEVEL_HEAD.RESCUE)."""
    from spine_d2.checkpoint import SpineCheckpointer
    from spine_d2.engine.trainer import SpineTrainer
    from spine_d2.evaluation.vertebra import _greedy_match, _load_ground_truth, masks_to_rles

    model = SpineTrainer.build_model(cfg)
    model.eval()
    SpineCheckpointer(model).load(weights)
    gt = _load_ground_truth(dataset)
    loader = SpineTrainer.build_test_loader(cfg, dataset)
    items = []
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"bench_levels {dataset}", unit="scan"):
            inst = model(batch)[0]["instances"].to("cpu")
            g = gt[batch[0]["image_id"]]
            confident = inst.scores >= score_thresh
            if inst.has("pred_rescued"):  # the chain rescue's picks are decoded with them
                confident = confident | inst.pred_rescued
            keep = confident.nonzero().flatten()
            inst = inst[keep]
            if len(inst) == 0:
                continue
            rles = masks_to_rles(inst.pred_masks)
            pairs = _greedy_match(g["rles"], g["classes"], rles, inst.pred_classes.tolist())
            items.append(
                (
                    inst.pred_boxes.tensor.numpy(),
                    batch[0]["height"],
                    inst.level_log_probs.numpy(),
                    [(gi, p) for gi, p, iou in pairs if iou >= 0.5 and g["levels"][gi]],
                    g["levels"],
                )
            )
    return items


def save_cache(path, source: tuple, items: list) -> None:
    """Pickle to a temporary name, then rename: an interrupted run never leaves half a cache.
    ``source``: (config file, weights, dataset), what decides which detections were kept."""
    from spine_d2.atomic import atomic_open

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        pickle.dump({"source": list(source), "items": items}, f)


def load_cache(path, source: tuple):
    """The cached items, or None when there is no cache yet; SystemExit naming the file when it
    is unreadable or was collected with another config, other weights or another dataset."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
        items, cached = data["items"], tuple(data["source"])
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError,
            AttributeError, ImportError, IndexError) as e:  # fmt: skip
        raise SystemExit(f"bench_levels: error: {path}: not a bench_levels cache ({e!r})")
    if cached != tuple(source):
        raise SystemExit(
            f"bench_levels: error: {path}: collected with {' / '.join(cached)}, not "
            f"{' / '.join(source)} (config / weights / dataset; delete it or name another --cache)"
        )
    return items


def with_end_drops(items) -> list:
    """Each image three times: as found, without its top detection, without its bottom one.

    On its own training films a model rarely misses an end vertebra, while on unseen films the
    ends are what it misses (AASCE val: T1 and L5), and a missing end is what shifts a decoded
    chain. Choosing decoder weights on training predictions with the ends dropped puts that
    failure into the split the weights are chosen on, without looking at the test split."""
    out = []
    for boxes, height, log_probs, pairs, gt_levels in items:
        out.append((boxes, height, log_probs, pairs, gt_levels))
        if len(boxes) < 3:
            continue
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        for drop in dict.fromkeys((int(cy.argmin()), int(cy.argmax()))):
            keep = [i for i in range(len(boxes)) if i != drop]
            new_index = {old: new for new, old in enumerate(keep)}
            out.append(
                (
                    boxes[keep],
                    height,
                    log_probs[keep],
                    [(gi, new_index[p]) for gi, p in pairs if p != drop],
                    gt_levels,
                )
            )
    return out


def level_accuracy(
    items, levels, skip_cost, repeat_cost, spacing_weight, prior=None, prior_weight=0.0
) -> tuple:
    """As LevelROIHeads decodes: level log-probs (+ prior_weight x prior), then decode_levels."""
    from spine_d2.modeling.levels import decode_levels

    hits = total = 0
    for boxes, height, log_probs, pairs, gt_levels in items:
        evidence = log_probs.astype("float64")
        if prior is not None and prior_weight > 0:
            evidence = evidence + prior_weight * prior.log_likelihood(boxes, height, levels)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        decoded = decode_levels(centres, evidence, skip_cost, repeat_cost, spacing_weight)
        hits += sum(levels[decoded[p]] == gt_levels[gi] for gi, p in pairs)
        total += len(pairs)
    return (hits / total if total else float("nan")), total


def check_replayable(config_file, head) -> None:
    """SystemExit unless the decoder this bench replays (level branch at full weight, spacing,
    prior) is the config's: an end classifier needs the input images, which are not cached."""
    if head.END_CLASSIFIER.FILE or head.BRANCH_WEIGHT != 1.0:
        raise SystemExit(
            f"bench_levels: error: {config_file}: SPINE.LEVEL_HEAD.END_CLASSIFIER.FILE / "
            "BRANCH_WEIGHT are not replayed here; measure that decoder with tools/train_net.py "
            "--eval-only"
        )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-file", default=SHIPPED_CONFIG)
    ap.add_argument("--weights", default=SHIPPED_WEIGHTS)
    ap.add_argument("--dataset", default="spine_drr_test")
    ap.add_argument("--spacing-weights", type=_weights, default="0,2,4,8,12,16")
    ap.add_argument("--prior-weights", type=_weights, default="0,0.25,0.5,1,2")
    ap.add_argument("--prior-file", default="", help="LevelPrior JSON (default: the config's)")
    ap.add_argument(
        "--drop-ends",
        action="store_true",
        help="score each image also without its top and without its bottom detection "
        "(with_end_drops): how weights chosen on a training split cope with missed ends",
    )
    ap.add_argument(
        "--cache",
        default="",
        help="pickle of the collected detections: read if it exists (no inference; it must "
        "come from the same --config-file, --weights and --dataset; a pickle runs code when "
        "read, so only name your own), else written, so decoder settings replay in seconds",
    )
    ap.add_argument("--out", default="output/bench/bench_levels.json")
    args = ap.parse_args(argv)

    from spine_d2.engine.setup import build_config
    from spine_d2.modeling.levels import LevelPrior

    cfg = build_config(args.config_file, ["MODEL.WEIGHTS", args.weights, "SPINE.EVAL.AMP", ""])
    head = cfg.SPINE.LEVEL_HEAD
    check_replayable(args.config_file, head)
    t0 = time.perf_counter()
    source = (args.config_file, args.weights, args.dataset)
    items = load_cache(args.cache, source) if args.cache else None
    if items is None:
        items = collect(cfg, args.weights, args.dataset, head.SCORE_THRESH)
        if args.cache:
            save_cache(args.cache, source, items)
    t_infer = time.perf_counter() - t0
    levels = list(cfg.SPINE.LEVELS)
    prior_file = args.prior_file or head.PRIOR_FILE
    prior = LevelPrior.load(prior_file) if prior_file else None
    by_weight, by_prior, matched = {}, {}, 0
    for w in args.spacing_weights:
        acc, matched = level_accuracy(items, levels, head.SKIP_COST, head.REPEAT_COST, w,
                                      prior, head.PRIOR_WEIGHT)  # fmt: skip
        by_weight[f"{w:g}"] = round(acc, 4)
    dropped = with_end_drops(items) if args.drop_ends else None
    by_prior_dropped = {}
    for w in args.prior_weights if prior is not None else []:
        acc, _ = level_accuracy(items, levels, head.SKIP_COST, head.REPEAT_COST,
                                head.SPACING_WEIGHT, prior, w)  # fmt: skip
        by_prior[f"{w:g}"] = round(acc, 4)
        if dropped is not None:
            acc, _ = level_accuracy(dropped, levels, head.SKIP_COST, head.REPEAT_COST,
                                    head.SPACING_WEIGHT, prior, w)  # fmt: skip
            by_prior_dropped[f"{w:g}"] = round(acc, 4)
    best = max(by_weight, key=by_weight.get)
    result = {
        "bench": "levels",
        "config": args.config_file,
        "weights": args.weights,
        "dataset": args.dataset,
        "matched_vertebrae": matched,
        "config_spacing_weight": head.SPACING_WEIGHT,
        "config_prior_weight": head.PRIOR_WEIGHT,
        "prior_file": prior_file,
        "drop_ends": args.drop_ends,
        "level_accuracy_by_spacing_weight": by_weight,
        "level_accuracy_by_prior_weight": by_prior,
        "level_accuracy_by_prior_weight_with_end_drops": by_prior_dropped,
        "best_spacing_weight": float(best),
        "best_level_accuracy": by_weight[best],
        "inference_s": round(t_infer, 1),
    }
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    from spine_d2.errors import run_cli

    run_cli(main, "bench_levels")
