"""An end classifier: which vertebra the top and the bottom of a detected chain are.

Full-spine AP films are annotated T1..L5, and a level branch trained on them learns "the topmost
body is T1, the lowest L5" whatever they are: a film that also shows C7 (or S1), or misses T1 (or
L5), is then named one level off from end to end (docs/results-aasce.md, "Where the names slide").
What tells T1 from C7 is around the body, not in it: the first ribs and the clavicles, and for L5
against L4 and S1 the pelvis, whose iliac crests rise beside L4-L5 two to three body widths from
the midline. :class:`EndClassifier` is a ResNet (the detector's own depth, initialised from a
detector checkpoint's bottom-up weights) that looks at a context box of 8 body widths by 7 body
heights around a body, cut from the detector's own input image, and names it among
C7/T1/T2/T3 (top group) or L3/L4/L5/S1 (bottom group). It is taught C7 and S1 on boxes placed one
T1-T2 (L4-L5) step beyond the annotated ends, which is what the detector never learns.

At inference (``LevelROIHeads`` with SPINE.LEVEL_HEAD.END_CLASSIFIER.FILE) the decoder adds, at
the topmost and the lowest confident detection, WEIGHT times the classifier's log-probabilities
of its group's four names (FLOOR nats for every other name) to the evidence it already has.
``tools/train_end_classifier.py`` trains one; its files are a JSON (format, architecture, crop,
the weights' sha256, how it was trained) next to the weights, read with ``weights_only`` after
the sha256 matches.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import BoxMode
from torch import nn
from torchvision.ops import roi_align

from ..atomic import atomic_open
from ..data.io import file_sha256
from ..errors import SpineError, torch_load_reason
from .jsonfile import read_model_json, write_model_json

__all__ = [
    "END_CLASSIFIER_FORMAT",
    "END_NAMES",
    "EndClassifier",
    "add_end_evidence",
    "context_boxes",
    "crop_contexts",
    "end_rows",
    "end_samples",
    "train_end_classifier",
]

END_CLASSIFIER_FORMAT = "spine_d2.end_classifier/1"
#: Top group, then bottom group: each named among its own four.
END_NAMES = ("C7", "T1", "T2", "T3", "L3", "L4", "L5", "S1")
TOP, BOTTOM = 0, 1
#: Half-sizes of the context box in body widths and heights: ribs and clavicles beside T1, the
#: iliac crests beside L5. 8 body widths, where 3.2 (1.6) left the crests out: level accuracy on
#: spine_aasce_val 0.912 against 0.893 (docs/results-aasce.md, "The end classifier in the model").
CONTEXT_HALF = (4.0, 3.5)
CROP_SIZE = (256, 320)  # height, width: 37 px per body height, 40 per body width


def context_boxes(boxes, half: Sequence[float] = CONTEXT_HALF) -> np.ndarray:
    """XYXY boxes enlarged about their centres to 2 x half[0] widths by 2 x half[1] heights."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return np.stack([cx - half[0] * w, cy - half[1] * h, cx + half[0] * w, cy + half[1] * h], 1)


def crop_contexts(
    image: torch.Tensor,
    boxes,
    size: Sequence[int] = CROP_SIZE,
    half: Sequence[float] = CONTEXT_HALF,
) -> torch.Tensor:
    """N x C x size crops of ``image`` (C x H x W, already normalised like the detector's input)
    around ``boxes`` (XYXY in the image's pixels), bilinear; outside the image reads 0."""
    ctx = torch.as_tensor(context_boxes(boxes, half), dtype=torch.float32, device=image.device)
    rois = torch.cat([torch.zeros(len(ctx), 1, device=image.device), ctx], 1)
    return roi_align(image.float()[None], rois, tuple(size), 1.0, 2, True)


def end_samples(record: dict) -> Dict[str, np.ndarray]:
    """Training boxes (XYXY, the record's pixels) of one annotated film: T1-T3 and L3-L5 as
    annotated, C7 one T1->T2 step above T1 and S1 one L4->L5 step below L5 when their centres
    lie on the film (the films are annotated T1..L5 only)."""
    by_level = {}
    for a in record.get("annotations", []):
        level = a.get("level")
        if level:
            by_level[level] = np.asarray(
                BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS), np.float64
            )
    out = {n: by_level[n] for n in END_NAMES if n in by_level}
    for name, near, far, inside in (
        ("C7", "T1", "T2", lambda y: y > 0),
        ("S1", "L5", "L4", lambda y: y < record["height"]),
    ):
        if near in by_level and far in by_level:
            step = _centre(by_level[near]) - _centre(by_level[far])
            box = by_level[near] + np.r_[step, step]
            if inside(_centre(box)[1]):
                out[name] = box
    return out


def _centre(box) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64)
    return (b[:2] + b[2:]) / 2


class EndClassifier(nn.Module):
    """A ResNet (detectron2's, built from ``resnets``: MODEL.RESNETS keys) with global average
    pooling and one linear layer to the eight END_NAMES logits."""

    def __init__(self, resnets: dict, crop_size=CROP_SIZE, context_half=CONTEXT_HALF):
        super().__init__()
        from detectron2.config import get_cfg
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone.resnet import build_resnet_backbone

        cfg = get_cfg()
        for key, value in resnets.items():
            setattr(cfg.MODEL.RESNETS, key, value)
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        self.resnets = dict(resnets)
        self.crop_size = tuple(int(v) for v in crop_size)
        self.context_half = tuple(float(v) for v in context_half)
        self.body = build_resnet_backbone(cfg, ShapeSpec(channels=3))
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(self.body.output_shape()["res5"].channels, len(END_NAMES))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.body(crops)["res5"].float().mean((2, 3))))

    def crops(self, image: torch.Tensor, boxes) -> torch.Tensor:
        """N x 3 x crop_size context crops of ``image`` around ``boxes`` (gray repeated)."""
        x = crop_contexts(image, boxes, self.crop_size, self.context_half)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @torch.no_grad()
    def log_probs(self, image: torch.Tensor, boxes, group: int) -> np.ndarray:
        """N x 4 log-probabilities of the group's names (TOP: C7..T3, BOTTOM: L3..S1) for the
        bodies ``boxes`` of ``image``; the average of the crop and its mirror image."""
        if len(boxes) == 0:
            return np.zeros((0, 4))
        x = self.crops(image, boxes).to(self.fc.weight.device)
        logits = (self(x) + self(x.flip(-1))) / 2
        part = logits[:, 4 * group : 4 * group + 4].float()
        return F.log_softmax(part, dim=1).cpu().numpy()

    @classmethod
    def from_detector(cls, resnets: dict, bottom_up: dict, seed: int, **kwargs) -> "EndClassifier":
        """A classifier whose ResNet starts from a detector's ``backbone.bottom_up`` state dict
        and whose new layer is drawn from ``seed``. Together with ``train_end_classifier``'s seed
        a run is repeatable: built before that seed, the layer came from whatever state the
        global RNG was in, and two runs of one seed trained different classifiers."""
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(seed)
            model = cls(resnets, **kwargs)
        model.body.load_state_dict(bottom_up)
        return model

    # ------------------------------------------------------------------ files
    def save(self, path, source: dict) -> None:
        """``path`` (JSON) and its weights beside it (``<stem>.pth``), each written to a
        temporary name and renamed; the JSON holds the weights' sha256."""
        path = Path(path)
        weights = path.with_suffix(".pth")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().half() for k, v in self.state_dict().items()}
        with atomic_open(weights, "wb") as f:  # a file object: the archive is named "archive",
            torch.save(state, f)  # not after the temporary name, so one state gives one sha256
        head = {
            "format": END_CLASSIFIER_FORMAT,
            "weights": weights.name,
            "sha256": file_sha256(weights),
            "names": list(END_NAMES),
            "crop_size": list(self.crop_size),
            "context_half": list(self.context_half),
            "resnets": self.resnets,
        }
        write_model_json(path, head, "source", json.dumps(source, indent=1))

    @classmethod
    def load(cls, path) -> "EndClassifier":
        """The classifier of ``path`` in eval mode; a one-line SpineError naming the file when it
        is not one, or its weights are missing, changed or unreadable."""
        data = read_model_json(
            path, "vertebra end classifier", END_CLASSIFIER_FORMAT, "tools/train_end_classifier.py"
        )
        path = Path(path)
        if list(data.get("names", [])) != list(END_NAMES):
            raise SpineError(
                f"{path}: end classifier names {data.get('names')} are not {list(END_NAMES)}"
            )
        weights = path.parent / str(data.get("weights", ""))
        if not weights.is_file():
            raise SpineError(f"{path}: its weights {weights} are missing")
        if file_sha256(weights) != data.get("sha256"):
            raise SpineError(f"{weights}: sha256 does not match {path} (changed or corrupt file)")
        model = cls(data["resnets"], data["crop_size"], data["context_half"])
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict({k: v.float() for k, v in state.items()})
        except (
            RuntimeError,
            OSError,
            KeyError,
            AttributeError,
            EOFError,
            pickle.UnpicklingError,
        ) as e:
            raise SpineError(
                f"{weights}: not end classifier weights ({torch_load_reason(e)})"
            ) from None
        model.source = data.get("source", {})
        return model.eval()


def end_rows(centers) -> tuple:
    """(topmost, lowest) row of ``centers`` (N x 2, x y): the detections the classifier sees."""
    y = np.asarray(centers, dtype=np.float64)[:, 1]
    return int(y.argmin()), int(y.argmax())


def add_end_evidence(
    evidence: np.ndarray,
    centers: np.ndarray,
    top: Optional[np.ndarray],
    bottom: Optional[np.ndarray],
    level_names: Sequence[str],
    weight: float,
    floor: float,
) -> np.ndarray:
    """``evidence`` (N x L, the decoder's input) plus, on the topmost row (smallest y centre),
    ``weight`` x ``top`` (4 log-probs of C7..T3) and ``floor`` x ``weight`` on every other name,
    and the same on the lowest row with ``bottom`` (L3..S1). A name of a group missing from
    ``level_names`` is skipped. ``top``/``bottom`` None leave that end as it was."""
    out = np.array(evidence, dtype=np.float64, copy=True)
    if len(out) == 0:
        return out
    names = list(level_names)
    first, last = end_rows(centers)
    for row, lp, group in ((first, top, TOP), (last, bottom, BOTTOM)):
        if lp is None:
            continue
        add = np.full(len(names), float(floor))
        for k, name in enumerate(END_NAMES[4 * group : 4 * group + 4]):
            if name in names:
                add[names.index(name)] = float(lp[k])
        out[row] += weight * add
    return out


def train_end_classifier(
    model: EndClassifier,
    films: List[Tuple[torch.Tensor, Dict[str, np.ndarray]]],
    epochs: int = 12,
    batch_size: int = 32,
    lr: float = 1e-4,
    seed: int = 0,
    jitter: float = 0.12,
    progress=None,
) -> List[float]:
    """Fit ``model`` on ``films``: (image C x H x W normalised as the detector's input, {end
    name: XYXY box in that image}). AdamW, one-cycle schedule (the new layer at 10 x ``lr``),
    bf16 autocast on the CPU; each sample competes within its group only. Augmentation: box
    jitter (``jitter`` x its size, so that a detection's looser box reads alike), gamma,
    contrast, noise, mirror. Returns the mean loss of each epoch."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    samples = [(i, END_NAMES.index(n), b) for i, (_, s) in enumerate(films) for n, b in s.items()]
    if not samples:
        raise SpineError("no film has an annotated T1..T3 or L3..L5: nothing to train on")
    steps = epochs * -(-len(samples) // batch_size)
    opt = torch.optim.AdamW(
        [{"params": model.body.parameters()}, {"params": model.fc.parameters()}],
        lr=lr,
        weight_decay=0.05,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, [lr, 10 * lr], total_steps=steps, pct_start=0.1
    )
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cpu")
    losses = []
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(samples))
        total = 0.0
        for start in range(0, len(samples), batch_size):
            chunk = [samples[k] for k in order[start : start + batch_size]]
            x = torch.cat(
                [_augmented_crop(model, films[i][0], b, rng, jitter) for i, _, b in chunk]
            )
            y = torch.tensor([c for _, c, _ in chunk], device=device)
            with autocast:
                logits = model(x.to(device))
            block = torch.full_like(logits, -1e4)
            top = y < 4
            block[top, :4] = 0
            block[~top, 4:] = 0
            loss = F.cross_entropy(logits.float() + block, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(chunk)
            if progress is not None:
                progress.update(1)
        losses.append(total / len(samples))
    return losses


def _augmented_crop(model, image, box, rng, jitter) -> torch.Tensor:
    w, h = box[2] - box[0], box[3] - box[1]
    box = np.asarray(box) + rng.normal(0, jitter, 4) * np.r_[w, h, w, h]
    x = model.crops(image, [box])
    # photometric changes in the normalised frame: contrast about the crop's mean, noise
    mean = x.mean()
    x = (x - mean) * float(rng.uniform(0.75, 1.33)) + mean + float(rng.normal(0, 0.1))
    x = x + torch.randn_like(x[:, :1]) * float(rng.uniform(0, 0.13))
    return x.flip(-1) if rng.random() < 0.5 else x
