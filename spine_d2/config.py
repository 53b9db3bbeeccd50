"""Config keys of spine-d2. Every key is new (INPUT.XRAY.*, SPINE.*, ZOI.*): detectron2's own
defaults are left untouched, so a plain detectron2 YAML means the same thing here."""

from detectron2.config import CfgNode as CN

# Vertebral levels top to bottom; used to order and name vertebrae when levels are known.
VERTEBRA_LEVELS = (
    [f"C{i}" for i in range(1, 8)]
    + [f"T{i}" for i in range(1, 13)]
    + [f"L{i}" for i in range(1, 6)]
    + ["S1"]
)


def add_spine_config(cfg):
    """Add spine-d2's keys to a detectron2 config (idempotent)."""
    if "SPINE" in cfg:
        return cfg
    _C = cfg

    # ---------------------------------------------------------------- X-ray augmentation
    _C.INPUT.XRAY = CN()
    # Channels fed to the model: 3 = grayscale repeated (ImageNet-style backbones), 1 = single.
    _C.INPUT.XRAY.CHANNELS = 3

    # Low-dose simulation in the photon domain: scan -> line integral -> Poisson + electronic
    # noise at a sampled dose fraction -> back to the log domain.
    _C.INPUT.XRAY.LOW_DOSE = CN({"ENABLED": True})
    _C.INPUT.XRAY.LOW_DOSE.PROB = 0.5  # chance of degrading a training scan
    _C.INPUT.XRAY.LOW_DOSE.DOSE_RANGE = (0.05, 0.5)  # dose fraction of the reference dose
    _C.INPUT.XRAY.LOW_DOSE.PHOTONS = 20000.0  # unattenuated photons per pixel at full dose
    _C.INPUT.XRAY.LOW_DOSE.MU_MAX = 5.0  # line integral that a white (1.0) pixel stands for
    _C.INPUT.XRAY.LOW_DOSE.ELECTRONIC_STD = 5.0  # Gaussian detector noise, in photons

    _C.INPUT.XRAY.CLAHE = CN({"ENABLED": True})
    _C.INPUT.XRAY.CLAHE.PROB = 0.3
    _C.INPUT.XRAY.CLAHE.CLIP_LIMIT = (1.0, 3.0)  # sampled uniformly
    _C.INPUT.XRAY.CLAHE.TILE_GRID = 8  # tiles per side

    # CLAHE on every scan, in training and in inference alike, right after the resize: a fixed
    # preprocessing step (unlike the random CLAHE above) that a model trained with it needs at
    # inference too, so it lives in the model's config. For bone under dense overlap (shoulders,
    # pelvis) on full-spine films.
    _C.INPUT.XRAY.EQUALIZE = CN({"ENABLED": False})
    _C.INPUT.XRAY.EQUALIZE.CLIP_LIMIT = 2.0
    _C.INPUT.XRAY.EQUALIZE.TILE_GRID = 8  # tiles per side

    _C.INPUT.XRAY.GAMMA = CN({"ENABLED": True})
    _C.INPUT.XRAY.GAMMA.PROB = 0.5
    _C.INPUT.XRAY.GAMMA.RANGE = (0.7, 1.5)  # exponent, sampled log-uniformly

    # Brightness/contrast as a random intensity window (what a viewer's window/level does).
    _C.INPUT.XRAY.WINDOW = CN({"ENABLED": True})
    _C.INPUT.XRAY.WINDOW.PROB = 0.5
    _C.INPUT.XRAY.WINDOW.BRIGHTNESS = 0.1  # max shift of the window centre (fraction of range)
    _C.INPUT.XRAY.WINDOW.CONTRAST = (0.8, 1.25)  # multiplicative contrast range

    _C.INPUT.XRAY.BLUR = CN({"ENABLED": True})
    _C.INPUT.XRAY.BLUR.PROB = 0.2
    _C.INPUT.XRAY.BLUR.SIGMA_RANGE = (0.3, 1.2)  # Gaussian sigma in pixels

    # MONOCHROME1 vs MONOCHROME2: sites disagree on whether bone is bright.
    _C.INPUT.XRAY.INVERT = CN({"ENABLED": False})
    _C.INPUT.XRAY.INVERT.PROB = 0.1

    _C.INPUT.XRAY.ROTATION = CN({"ENABLED": True})
    _C.INPUT.XRAY.ROTATION.ANGLE = 10.0  # degrees, sampled in [-ANGLE, ANGLE]

    _C.INPUT.XRAY.SCALE_JITTER = CN({"ENABLED": True})
    _C.INPUT.XRAY.SCALE_JITTER.RANGE = (0.85, 1.15)  # extra scale after the resize

    _C.INPUT.XRAY.HFLIP = CN({"ENABLED": True})
    _C.INPUT.XRAY.HFLIP.PROB = 0.5

    # ---------------------------------------------------------------- datasets and levels
    _C.SPINE = CN()
    # Extra COCO datasets registered at setup, without code: [[name, json_file, image_root], ...]
    _C.SPINE.COCO_DATASETS = []
    # On invalid COCO records: False raises naming the record, True skips and logs counts.
    _C.SPINE.SKIP_INVALID_ANNOTATIONS = False
    # Share of each DATASETS.TRAIN entry in the training stream, one weight per entry (e.g.
    # [0.75, 0.25]), whatever the datasets' sizes (data/sampler.py); [] = detectron2's
    # concatenation, where each dataset's share is its share of the images.
    _C.SPINE.TRAIN_DATASET_WEIGHTS = []
    # Ordered level names, top to bottom.
    _C.SPINE.LEVELS = list(VERTEBRA_LEVELS)

    # Level branch of ROI_HEADS.NAME "LevelROIHeads": one level class per SPINE.LEVELS entry.
    _C.SPINE.LEVEL_HEAD = CN()
    _C.SPINE.LEVEL_HEAD.LOSS_WEIGHT = 0.5  # weight of its cross-entropy in the total loss
    _C.SPINE.LEVEL_HEAD.SCORE_THRESH = 0.5  # detections this confident are decoded jointly
    _C.SPINE.LEVEL_HEAD.SKIP_COST = 2.0  # nats per level skipped between neighbours (a miss)
    _C.SPINE.LEVEL_HEAD.REPEAT_COST = 4.0  # nats for one level on two neighbours (a duplicate)
    # nats per squared level between a jump and the spacing ratio of two neighbours; 0 = off (helps
    # on full-spine films, hurts on cropped DRR views: README, "CPU training recipe and levels")
    _C.SPINE.LEVEL_HEAD.SPACING_WEIGHT = 0.0
    # Framing prior (modeling.levels.LevelPrior, written by tools/fit_level_prior.py): JSON path
    # and its weight in the decoder (nats per nat of prior log-likelihood); 0 = off
    _C.SPINE.LEVEL_HEAD.PRIOR_FILE = ""
    _C.SPINE.LEVEL_HEAD.PRIOR_WEIGHT = 0.0
    # Context branch (modeling/roi_heads.py): > 1 also pools each proposal's box enlarged this
    # many times (ribs, pelvis: what tells T1 from C7, L5 from S1) into the class and level
    # logits, through zero-initialised layers; 0 = off (3.0 in a 1200-iteration AASCE fine-tune
    # found T1 and L5 no more often: docs/results-aasce.md, "The real-data default")
    _C.SPINE.LEVEL_HEAD.CONTEXT_SCALE = 0.0
    # Loss weights by level, e.g. [["T1", 2.0], ["L5", 3.0]]: foreground proposals matched to a
    # vertebra of a listed level weigh this much in the box classification, box regression and
    # mask losses (the end vertebrae of a film are the ones found least often); [] = off
    _C.SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS = []
    # The same for vertebrae cut by the scan's border (``truncated`` in the annotations, or a
    # mask touching the augmented scan's border): a fragment weighs this much (times its
    # level's weight). The built-in DRR checkpoint misses fragments, not whole vertebrae. 1 = off
    _C.SPINE.LEVEL_HEAD.TRUNCATED_WEIGHT = 1.0
    # [first, last] level names: only detections whose decoded level lies in this range are
    # output (films annotated T1..L5 show C7 and S1 too); [] = every detection
    _C.SPINE.LEVEL_HEAD.OUTPUT_RANGE = []
    # Weight of the level branch's log-probabilities in the decoder (nats per nat). A branch
    # fine-tuned on films always annotated T1..L5 is sure that the top body is T1 whatever it is;
    # with an end classifier (below) configs/aasce/..._end_classifier_cpu.yaml leaves it out (0)
    # and names the chain from the classifier, the framing prior and the spacing. 1 = as it is.
    _C.SPINE.LEVEL_HEAD.BRANCH_WEIGHT = 1.0
    # End classifier (modeling/end_classifier.py, tools/train_end_classifier.py): a JSON naming
    # a small ResNet that tells C7/T1/T2/T3 at the chain's top and L3/L4/L5/S1 at its bottom from
    # the ribs, clavicles and pelvis around them; the decoder adds WEIGHT x its log-probabilities
    # there (FLOOR nats for other names). "" = off.
    _C.SPINE.LEVEL_HEAD.END_CLASSIFIER = CN()
    _C.SPINE.LEVEL_HEAD.END_CLASSIFIER.FILE = ""
    _C.SPINE.LEVEL_HEAD.END_CLASSIFIER.WEIGHT = 2.0
    _C.SPINE.LEVEL_HEAD.END_CLASSIFIER.FLOOR = -7.0
    # Chain rescue (modeling/rescue.py): on films that show EXPECTED vertebrae (17 on full-spine
    # AP films, T1..L5), detections scored MIN_SCORE..SCORE_THRESH that fill a gap of the chain
    # or extend one of its ends are accepted with the confident ones (``pred_rescued``; the
    # evaluator and the ZOI export keep them). 0 = off (cropped views show varying counts).
    _C.SPINE.LEVEL_HEAD.RESCUE = CN()
    _C.SPINE.LEVEL_HEAD.RESCUE.EXPECTED = 0
    _C.SPINE.LEVEL_HEAD.RESCUE.MIN_SCORE = 0.2
    _C.SPINE.LEVEL_HEAD.RESCUE.GAP_FACTOR = 1.6  # a spacing this x its neighbours' is a gap
    _C.SPINE.LEVEL_HEAD.RESCUE.MAX_OVERLAP = 0.3  # box IoU with any confident detection

    # Suppression of overlapping detections at inference (modeling/soft_nms.py): "hard"
    # (detectron2's NMS at MODEL.ROI_HEADS.NMS_THRESH_TEST), "linear" soft NMS (a detection
    # overlapping a higher one by IoU > NMS_THRESH_TEST keeps 1 - IoU of its score instead of
    # being deleted: at 0.5 the detections over score 0.5 are hard NMS's, COCO AP gains the
    # neighbours hard NMS deleted) or "gaussian" (every overlap scales by exp(-IoU^2 / SIGMA))
    _C.SPINE.NMS = CN()
    _C.SPINE.NMS.METHOD = "hard"
    _C.SPINE.NMS.SIGMA = 0.5
    # Re-rank detections by their mask's confidence (LevelROIHeads._rescore_by_masks): a score
    # becomes SCORE_THRESH + (score - SCORE_THRESH) x maskness above SPINE.LEVEL_HEAD.SCORE_THRESH
    # and score x maskness under it, so no detection crosses that cut (COCO AP changes; what
    # the evaluator, levels and the ZOI export keep does not, while their cuts are equal)
    _C.SPINE.MASK_RESCORE = False
    # A learned rescorer (modeling/rescorer.py, tools/fit_rescorer.py): a JSON whose small MLP
    # scores each detection from its overlaps with the others, the level branch and its mask,
    # fitted on one checkpoint's predictions. Replaces the score after the mask head (and
    # MASK_RESCORE's); the score cuts (SPINE.LEVEL_HEAD / EVAL / ZOI.SCORE_THRESH) then apply to
    # its scale. "" = off.
    _C.SPINE.RESCORER = CN()
    _C.SPINE.RESCORER.FILE = ""

    # Training: "SGD" (detectron2's build_optimizer) or "ADAMW" (SOLVER.BASE_LR,
    # SOLVER.WEIGHT_DECAY, no decay on norms and biases). SOLVER.AMP.ENABLED on the CPU
    # trains under bfloat16 autocast (no loss scaling needed); on CUDA detectron2's AMPTrainer.
    _C.SPINE.OPTIMIZER = "SGD"
    _C.SPINE.ADAMW_BETAS = (0.9, 0.999)

    _C.SPINE.EVAL = CN()
    _C.SPINE.EVAL.AMP = ""  # "" (fp32), "fp16" or "bf16" autocast in evaluation; check AP first
    _C.SPINE.EVAL.AMP_SCOPE = "model"  # "model" (whole forward) or "features" (backbone + RPN head)
    _C.SPINE.EVAL.IOU_THRESH = 0.5  # mask IoU for a prediction to count as finding a vertebra
    _C.SPINE.EVAL.SCORE_THRESH = (
        0.5  # predictions below this score are ignored by VertebraEvaluator
    )
    # Resamples of the test images for 95 % intervals of recall, precision, Dice and level
    # accuracy (logged, and saved in vertebra_results.json); 0: none. The films are the unit.
    _C.SPINE.EVAL.BOOTSTRAP = 2000

    # ---------------------------------------------------------------- ZOI export
    _C.ZOI = CN()
    _C.ZOI.EXPORT_AFTER_EVAL = False  # run ZOIExportHook after the final evaluation (and eval-only)
    _C.ZOI.EXPORT_EVERY_EVAL = False  # also export after every TEST.EVAL_PERIOD evaluation
    _C.ZOI.DATASETS = []  # splits to export; empty = DATASETS.TEST
    _C.ZOI.MARGIN = 4  # pixels added around each ZOI's bounding box
    _C.ZOI.SCORE_THRESH = 0.5  # predictions below this are not exported
    _C.ZOI.FORMAT = "png"  # "png" (gray + alpha, scan's bit depth) or "npz" (pixels + mask arrays)
    _C.ZOI.PNG_COMPRESSION = 1  # zlib level 0-9: 1 is ~8x faster than 6 and ~5% larger
    _C.ZOI.BATCH_SIZE = 4  # scans per forward pass
    _C.ZOI.NUM_WORKERS = 2  # DataLoader workers decoding and resizing scans
    _C.ZOI.AMP = ""  # "" (fp32), "fp16" or "bf16" autocast; changes numerics: check AP first
    _C.ZOI.AMP_SCOPE = "model"  # "model" (whole forward) or "features" (backbone + RPN head only)
    _C.ZOI.ANCHOR_LEVEL = ""  # level of the top (or bottom) vertebra found, e.g. "C2"; "" = none
    _C.ZOI.ANCHOR_AT = "top"  # which end ANCHOR_LEVEL names: "top" or "bottom"
    _C.ZOI.GAP_FACTOR = 1.6  # spacing > this x neighbouring spacings = suspected missed vertebra
    # [first, last] levels every scan shows (full-spine AP films: ['T1', 'L5']): where the chain
    # found starts below first or stops above last, the levels beyond its ends are reported as
    # suspected missing too (a gap whose "after" or "before" is null); [] = the ends unchecked
    _C.ZOI.EXPECTED_LEVELS = []
    # A scan whose level names beat the same chain named one level up or down by less than
    # this many nats of the decoder's evidence (``level_margin`` in the manifest) is listed in
    # level_conflicts as "uncertain": check its names. Model-specific; 0 = never.
    _C.ZOI.LEVEL_MARGIN = 0.0
    return cfg
