"""Level decoding along the spine and the LevelROIHeads branch on synthetic scans."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from spine_d2.data.mapper import XrayDatasetMapper
from spine_d2.engine.setup import build_config
from spine_d2.modeling import LevelROIHeads, decode_levels
from spine_d2.modeling.levels import shift_margin

INSTANT = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"


def _curved_spine(n, start=(60.0, 10.0), step=14.0):
    """Centroids on a curve that runs sideways (a scoliotic S), top to bottom."""
    t = np.arange(n)
    return np.stack([start[0] + 25 * np.sin(t / 2.0), start[1] + step * t], axis=1)


def _log_probs(true_levels, num_levels, confident, rng, noise=0.3):
    """Flat, noisy level scores except for the ``confident`` detections."""
    lp = rng.normal(0, noise, (len(true_levels), num_levels))
    for i in confident:
        lp[i, true_levels[i]] += 8.0
    return lp - np.log(np.exp(lp).sum(1, keepdims=True))


def test_one_confident_vertebra_fixes_its_neighbours_in_any_input_order():
    rng = np.random.default_rng(0)
    true = np.arange(5, 13)  # 8 consecutive levels
    centers = _curved_spine(len(true))
    lp = _log_probs(true, 24, confident=[3], rng=rng)
    perm = rng.permutation(len(true))
    got = decode_levels(centers[perm], lp[perm])
    np.testing.assert_array_equal(got, true[perm])
    # the per-detection argmax alone gets most of them wrong
    assert (lp.argmax(1) != true).sum() >= 5


def test_strong_evidence_allows_a_skipped_level_and_a_lone_detection_takes_argmax():
    rng = np.random.default_rng(1)
    true = np.array([4, 5, 6, 8, 9])  # level 7 missed by the detector
    lp = _log_probs(true, 24, confident=range(5), rng=rng, noise=0.1)
    np.testing.assert_array_equal(decode_levels(_curved_spine(5), lp), true)
    assert decode_levels(_curved_spine(1), lp[:1]).tolist() == [4]
    assert decode_levels(np.zeros((0, 2)), np.zeros((0, 24))).shape == (0,)


def test_spacing_weight_puts_the_skip_where_the_geometry_shows_the_missed_vertebra():
    rng = np.random.default_rng(3)
    true = np.array([4, 5, 6, 8, 9])  # level 7 missed: a double spacing between 6 and 8
    centers = np.delete(_curved_spine(6), 3, axis=0)
    lp = _log_probs(true, 24, confident=[0], rng=rng, noise=0.1)  # only the top one is sure
    # the classifier alone cannot see the miss: the chain stays contiguous below level 4
    np.testing.assert_array_equal(decode_levels(centers, lp), [4, 5, 6, 7, 8])
    np.testing.assert_array_equal(decode_levels(centers, lp, spacing_weight=8.0), true)
    # even spacing: the same weight forbids a skip that the scores mildly prefer
    even = _curved_spine(5)
    lp_skip = _log_probs(np.array([4, 5, 6, 7, 8]), 24, confident=[0], rng=rng, noise=0.1)
    lp_skip[4, 9] += 1.5
    assert decode_levels(even, lp_skip, skip_cost=0.0)[4] == 9
    np.testing.assert_array_equal(
        decode_levels(even, lp_skip, skip_cost=0.0, spacing_weight=8.0), [4, 5, 6, 7, 8]
    )
    with pytest.raises(ValueError, match="spacing_weight must be >= 0, got -1"):
        decode_levels(even, lp_skip, spacing_weight=-1)


def test_a_duplicate_detection_does_not_shift_the_levels_below_it():
    rng = np.random.default_rng(2)
    true = np.array([3, 4, 4, 5, 6, 7])  # the second T? detected twice
    centers = _curved_spine(5)
    centers = np.insert(centers, 2, centers[1] + [1.0, 1.0], axis=0)
    lp = _log_probs(true, 24, confident=range(6), rng=rng, noise=0.1)
    np.testing.assert_array_equal(decode_levels(centers, lp), true)
    # a duplicate lies about no spacing from its twin: the spacing term lets the repeat stand
    np.testing.assert_array_equal(decode_levels(centers, lp, spacing_weight=8.0), true)


def test_spacing_weight_forbids_naming_two_vertebrae_one_spacing_apart_alike():
    """A chain whose ends disagree (AASCE val: all 17 bodies found, the top one sure it is T1,
    the bottom one, L5, sure it is L4): with repeats exempt from the spacing term the cheapest
    reading was a repeat (4 nats) that shifted every name below it up by one."""
    rng = np.random.default_rng(4)
    true = np.arange(5, 13)  # T1..T8 of SPINE.LEVELS (C1..C7 first)
    centers = _curved_spine(len(true))
    lp = _log_probs(true, 24, confident=[0], rng=rng, noise=0.1)
    lp[-1, true[-1] - 1] += 8.0  # the bottom one looks like the level above it, as strongly
    lp[3, true[3]] += 5.0  # and the middle leans to the truth
    plain = decode_levels(centers, lp, spacing_weight=0.0)
    assert (plain[1:] == plain[:-1]).any(), "plain decoding should pay the repeat"
    np.testing.assert_array_equal(decode_levels(centers, lp, spacing_weight=8.0), true)


@pytest.fixture
def level_model(synthetic_train):
    cfg = build_config(
        INSTANT, ["MODEL.ROI_HEADS.NAME", "LevelROIHeads", "SPINE.LEVEL_HEAD.SCORE_THRESH", "0.0"]
    )
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_mapper_gives_level_indices_into_spine_levels(level_model, synthetic_train):
    from detectron2.data import DatasetCatalog

    cfg, _ = level_model
    record = DatasetCatalog.get(synthetic_train)[0]
    out = XrayDatasetMapper(cfg, is_train=True)(record)
    ids = out["instances"].gt_level_ids.tolist()
    assert ids == [cfg.SPINE.LEVELS.index(lv) for lv in out["gt_levels"]]
    assert len(ids) == len(out["instances"]) > 0


def test_level_branch_trains_and_labels_every_detection(level_model, synthetic_train):
    from detectron2.data import DatasetCatalog

    cfg, model = level_model
    assert isinstance(model.roi_heads, LevelROIHeads)
    mapper = XrayDatasetMapper(cfg, is_train=True)
    batch = [mapper(r) for r in DatasetCatalog.get(synthetic_train)[:2]]
    model.train()
    with EventStorage():
        losses = model(batch)
        assert torch.isfinite(losses["loss_level"]) and losses["loss_level"] > 0
        losses["loss_level"].backward()
        assert model.roi_heads.level_predictor.weight.grad.abs().sum() > 0
        # unknown levels (-1) are ignored: no level loss at all
        for b in batch:
            b["instances"].gt_level_ids[:] = -1
        assert model(batch)["loss_level"].item() == 0.0

    model.eval()
    test_mapper = XrayDatasetMapper(cfg, is_train=False)
    with torch.no_grad():
        inst = model([test_mapper(DatasetCatalog.get(synthetic_train)[0])])[0]["instances"]
    assert len(inst) > 0 and inst.pred_levels.shape == (len(inst),)
    assert inst.pred_levels.min() >= 0 and inst.pred_levels.max() < len(cfg.SPINE.LEVELS)
    assert ((inst.level_scores > 0) & (inst.level_scores <= 1)).all()


def test_context_branch_loads_old_weights_unchanged_then_learns(level_model, synthetic_train):
    from detectron2.data import DatasetCatalog

    cfg, model = level_model
    ctx_cfg = cfg.clone()
    ctx_cfg.defrost()
    ctx_cfg.SPINE.LEVEL_HEAD.CONTEXT_SCALE = 3.0
    ctx_model = build_model(ctx_cfg)
    missing, unexpected = ctx_model.load_state_dict(model.state_dict(), strict=False)
    assert sorted(missing) == [
        f"roi_heads.context_{n}.{p}" for n in ("cls", "level") for p in ("bias", "weight")
    ]
    assert unexpected == []

    # enlarged about the centre, clipped to the image
    props = Instances((128, 128))
    props.proposal_boxes = Boxes(torch.tensor([[40.0, 40, 60, 50], [100, 0, 120, 10]]))
    ctx = ctx_model.roi_heads._context_boxes(props).tensor
    assert ctx.tolist() == [[20.0, 30, 80, 60], [80, 0, 128, 20]]

    record = DatasetCatalog.get(synthetic_train)[0]
    test_input = XrayDatasetMapper(cfg, is_train=False)(record)
    model.eval()
    ctx_model.eval()
    with torch.no_grad():
        old = model([test_input])[0]["instances"]
        new = ctx_model([test_input])[0]["instances"]
    assert len(old) > 0
    assert torch.allclose(old.pred_boxes.tensor, new.pred_boxes.tensor)
    assert torch.allclose(old.scores, new.scores)
    assert torch.equal(old.pred_levels, new.pred_levels)

    ctx_model.train()
    batch = [
        XrayDatasetMapper(cfg, is_train=True)(r) for r in DatasetCatalog.get(synthetic_train)[:2]
    ]
    with EventStorage():
        losses = ctx_model(batch)
        (losses["loss_cls"] + losses["loss_level"]).backward()
    assert ctx_model.roi_heads.context_cls.weight.grad.abs().sum() > 0
    assert ctx_model.roi_heads.context_level.weight.grad.abs().sum() > 0

    ctx_cfg.SPINE.LEVEL_HEAD.CONTEXT_SCALE = 0.8
    with pytest.raises(ValueError, match="CONTEXT_SCALE must be 0 \\(off\\) or > 1, not 0.8"):
        build_model(ctx_cfg)


def test_label_levels_decodes_confident_detections_only(level_model):
    cfg, model = level_model
    heads = model.roi_heads
    heads.level_score_thresh = 0.5
    inst = Instances((128, 128))
    inst.pred_boxes = Boxes(torch.tensor([[50, y, 80, y + 12] for y in (10.0, 30.0, 50.0, 70.0)]))
    inst.scores = torch.tensor([0.9, 0.9, 0.9, 0.1])
    logits = torch.zeros(4, len(cfg.SPINE.LEVELS))
    logits[0, 10] = 9.0  # top vertebra surely level 10; the next two undecided
    logits[3, 2] = 9.0  # the low-score one keeps its own argmax
    heads._label_levels(inst, logits)
    assert inst.pred_levels.tolist() == [10, 11, 12, 2]
    # what the decoder saw is kept: log-probabilities over SPINE.LEVELS, argmax 10 on top
    assert inst.level_log_probs.shape == (4, len(cfg.SPINE.LEVELS))
    assert torch.allclose(inst.level_log_probs.exp().sum(1), torch.ones(4))
    assert inst.level_log_probs[0].argmax() == 10


def test_shift_margin_is_what_the_names_win_by_over_the_chain_one_level_off():
    evidence = np.zeros((3, 6))
    evidence[[0, 1, 2], [1, 2, 3]] = [2.0, 3.0, 4.0]  # named 1, 2, 3: 9 nats
    evidence[0, 2] = 1.0  # named 2, 3, 4 instead: 1 nat; 0, 1, 2: 0 nats
    assert shift_margin(evidence, np.array([1, 2, 3])) == pytest.approx(8.0)
    evidence[2, 2] = 8.5  # now 0, 1, 2 is nearly as good
    assert shift_margin(evidence, np.array([1, 2, 3])) == pytest.approx(0.5)
    assert shift_margin(np.zeros((6, 6)), np.arange(6)) == np.inf  # no shift fits


def test_label_levels_keeps_the_scans_margin_on_every_instance(level_model):
    cfg, model = level_model
    heads = model.roi_heads
    heads.level_score_thresh = 0.5
    inst = Instances((128, 128))
    inst.pred_boxes = Boxes(torch.tensor([[50, y, 80, y + 12] for y in (10.0, 30.0, 50.0)]))
    inst.scores = torch.tensor([0.9, 0.9, 0.1])
    logits = torch.zeros(3, len(cfg.SPINE.LEVELS))
    logits[0, 10] = 9.0
    heads._label_levels(inst, logits)
    margins = inst.level_margin.tolist()
    assert len(set(margins)) == 1 and 0 < margins[0] < np.inf
    alone = inst[torch.tensor([0, 2])]  # one confident detection: no chain to name
    heads._label_levels(alone, logits[[0, 2]])
    assert torch.isnan(alone.level_margin).all()


def _framed_films(n_films=6, levels=("T1", "T2", "T3", "T4", "T5"), height=200.0, seed=0):
    """Dataset dicts of films that frame the same levels alike: level k at (k + 0.5) / 5 of the
    height, widths growing down the spine, a little jitter per film."""
    from detectron2.structures import BoxMode

    rng = np.random.default_rng(seed)
    films = []
    for f in range(n_films):
        anns = []
        for k, name in enumerate(levels):
            cy = (k + 0.5) / len(levels) * height + rng.normal(0, 2)
            w = 20.0 * 1.1**k * (1 + rng.normal(0, 0.02))
            anns.append(
                {"bbox": [50.0, cy - 6, w, 12.0], "bbox_mode": BoxMode.XYWH_ABS, "level": name}
            )
        anns.append({"bbox": [1, 1, 5, 5], "bbox_mode": BoxMode.XYWH_ABS})  # no level: ignored
        films.append(
            {"file_name": f"f{f}.png", "height": height, "width": 120, "annotations": anns}
        )
    return films


def test_level_prior_fit_round_trips_and_favours_the_level_where_a_box_sits(tmp_path):
    from spine_d2.modeling import LevelPrior

    prior = LevelPrior.fit(_framed_films(), source="films")
    assert prior.levels == ["T1", "T2", "T3", "T4", "T5"] and prior.count == [6] * 5
    np.testing.assert_allclose(prior.mean[:, 1], [0.1, 0.3, 0.5, 0.7, 0.9], atol=0.01)
    assert np.all(np.diff(prior.mean[:, 0]) > 0.05)  # relative width grows down the spine
    path = tmp_path / "prior.json"
    prior.save(path)
    back = LevelPrior.load(path)
    assert back.levels == prior.levels and back.source == "films"
    np.testing.assert_allclose(back.mean, prior.mean, atol=1e-4)

    names = ["C7", "T1", "T2", "T3", "T4", "T5"]
    boxes = np.array([[50, 94, 74, 106], [50, 174, 79, 186], [50, 14, 70, 26]])  # T3, T5, T1
    ll = back.log_likelihood(boxes, 200.0, names)
    assert ll.shape == (3, 6) and ll.argmax(1).tolist() == [3, 5, 1]
    # an unfitted level is possible but capped: ZMAX on both features, never favoured
    np.testing.assert_allclose(ll[:, 0], -0.5 * LevelPrior.ZMAX**2 * 2)
    assert (ll >= ll[:, :1]).all()
    # resizing the film changes nothing
    np.testing.assert_allclose(back.log_likelihood(boxes * 2, 400.0, names), ll)


def test_level_prior_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    from spine_d2.errors import SpineError
    from spine_d2.modeling import LevelPrior

    with pytest.raises(SpineError, match=r"missing.json: level prior file not found"):
        LevelPrior.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, msg in [
        ("{not json", "not a JSON level prior"),
        ('{"format": "other"}', "not a level prior"),
        ('{"format": "spine_d2.level_prior/1", "features": ["x"]}', "features"),
        (
            '{"format": "spine_d2.level_prior/1", "features": ["log_relative_width", '
            '"relative_y"], "levels": {"T1": {"mean": [0, 0.1], "std": [0.1, 0]}}}',
            "stds > 0",
        ),
    ]:
        bad.write_text(text)
        with pytest.raises(SpineError, match=rf"bad.json: .*{msg}"):
            LevelPrior.load(bad)
    with pytest.raises(SpineError, match="no level with 5"):
        LevelPrior.fit(_framed_films(n_films=2), source="two films")


def test_prior_puts_a_look_alike_chain_where_the_film_frames_it(level_model, tmp_path):
    from spine_d2.errors import SpineError
    from spine_d2.modeling import LevelPrior

    cfg, model = level_model
    heads = model.roi_heads
    heads.level_score_thresh = 0.5
    names = list(cfg.SPINE.LEVELS)
    prior = LevelPrior.fit(_framed_films(), source="films")
    inst = Instances((200, 120))
    inst.pred_boxes = Boxes(
        torch.tensor(
            [[50, cy - 6, 50 + 20 * 1.1**k, cy + 6] for k, cy in enumerate((20, 60, 100, 140, 180))]
        )
    )
    inst.scores = torch.full((5,), 0.9)
    logits = torch.zeros(5, len(names))
    t1 = names.index("T1")
    for k in range(5):  # the head mildly believes the chain starts one level lower
        logits[k, t1 + k + 1] = 1.0
    heads._label_levels(inst, logits.clone())
    assert inst.pred_levels.tolist() == list(range(t1 + 1, t1 + 6))
    heads.level_prior, heads.prior_weight, heads.level_names = prior, 1.0, names
    heads._label_levels(inst, logits.clone())
    assert inst.pred_levels.tolist() == list(range(t1, t1 + 5))
    # the head's evidence is what level_log_probs keeps, not the prior
    assert inst.level_log_probs[0].argmax() == t1 + 1

    path = tmp_path / "prior.json"
    prior.save(path)
    cfg2 = build_config(
        INSTANT,
        ["MODEL.ROI_HEADS.NAME", "LevelROIHeads", "SPINE.LEVEL_HEAD.PRIOR_FILE", str(path),
         "SPINE.LEVEL_HEAD.PRIOR_WEIGHT", "0.5"],  # fmt: skip
    )
    built = build_model(cfg2).roi_heads
    assert built.prior_weight == 0.5 and built.level_prior.levels == prior.levels
    with pytest.raises(SpineError, match="PRIOR_WEIGHT is -1.0; it must be >= 0"):
        build_config(INSTANT, ["SPINE.LEVEL_HEAD.PRIOR_WEIGHT", "-1.0"])
    with pytest.raises(
        SpineError, match="PRIOR_WEIGHT is 1.0 but SPINE.LEVEL_HEAD.PRIOR_FILE is empty"
    ):
        build_config(INSTANT, ["SPINE.LEVEL_HEAD.PRIOR_WEIGHT", "1.0"])
    with pytest.raises(SpineError, match="nope.json: level prior file not found"):
        build_config(INSTANT, ["SPINE.LEVEL_HEAD.PRIOR_WEIGHT", "1.0",
                               "SPINE.LEVEL_HEAD.PRIOR_FILE", str(tmp_path / "nope.json")])  # fmt: skip


def test_fit_level_prior_tool_writes_a_loadable_prior(synthetic_train, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from spine_d2.modeling import LevelPrior

    tool = Path(__file__).resolve().parents[2] / "tools" / "fit_level_prior.py"
    spec = importlib.util.spec_from_file_location("fit_level_prior", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "sub" / "prior.json"
    assert module.main(["--dataset", synthetic_train, "--out", str(out), "--min-count", "1"]) == 0
    prior = LevelPrior.load(out)
    assert prior.source == synthetic_train and len(prior.levels) > 0
    assert not [q for q in out.parent.iterdir() if ".tmp" in q.name]
    assert module.main(["--dataset", "no_such_split", "--out", str(tmp_path / "x.json")]) == 1
    assert "no_such_split: not a registered dataset" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def _weighted_losses(cfg, model, batch, **level_head):
    """The training losses of ``model``'s weights under SPINE.LEVEL_HEAD overrides, with the
    same sampled proposals in every call."""
    c = cfg.clone()
    c.defrost()
    for key, value in level_head.items():
        c.SPINE.LEVEL_HEAD[key] = value
    m = build_model(c)
    m.load_state_dict(model.state_dict())
    m.train()
    torch.manual_seed(0)
    with EventStorage():
        out = m(batch)
    return {k: v.item() for k, v in out.items()}


def test_instance_weights_scale_the_losses_of_their_levels_only(level_model, synthetic_train):
    from detectron2.data import DatasetCatalog

    cfg, model = level_model
    batch = [
        XrayDatasetMapper(cfg, is_train=True)(r) for r in DatasetCatalog.get(synthetic_train)[:2]
    ]
    assert all((b["instances"].gt_level_ids >= 0).all() for b in batch)

    def losses(weight_pairs):
        return _weighted_losses(cfg, model, batch, INSTANCE_WEIGHTS=weight_pairs)

    plain = losses([])
    # weights of 1 reproduce detectron2's own losses (the unweighted code path)
    ones = losses([[lv, 1.0] for lv in cfg.SPINE.LEVELS])
    for k in ("loss_cls", "loss_box_reg", "loss_mask"):
        assert ones[k] == pytest.approx(plain[k], rel=1e-5), k
    # every level at 2.5: box regression and masks (foreground only) scale exactly, the
    # classification loss only in its foreground part
    all_up = losses([[lv, 2.5] for lv in cfg.SPINE.LEVELS])
    assert all_up["loss_box_reg"] == pytest.approx(2.5 * plain["loss_box_reg"], rel=1e-5)
    assert all_up["loss_mask"] == pytest.approx(2.5 * plain["loss_mask"], rel=1e-5)
    assert plain["loss_cls"] < all_up["loss_cls"] < 2.5 * plain["loss_cls"]
    # a level absent from the batch changes nothing
    present = {cfg.SPINE.LEVELS[i] for b in batch for i in b["instances"].gt_level_ids.tolist()}
    absent = next(lv for lv in cfg.SPINE.LEVELS if lv not in present)
    assert losses([[absent, 5.0]])["loss_mask"] == pytest.approx(plain["loss_mask"], rel=1e-5)

    for bad, msg in (
        ([["X9", 2.0]], "level of SPINE.LEVELS"),
        ([["L5", 0.0]], "must be > 0"),
        ([["L5", "heavy"]], "weight of L5 must be > 0, not heavy"),
    ):
        c = cfg.clone()
        c.defrost()
        c.SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS = bad
        with pytest.raises(ValueError, match=msg):
            build_model(c)
    c = cfg.clone()
    c.defrost()
    c.SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS = [["L5", 2.0]]
    c.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "giou"
    with pytest.raises(ValueError, match="need MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE smooth_l1"):
        build_model(c)


def test_truncated_weight_scales_the_losses_of_truncated_vertebrae_only(
    level_model, synthetic_train
):
    from detectron2.data import DatasetCatalog

    cfg, model = level_model
    batch = [
        XrayDatasetMapper(cfg, is_train=True)(r) for r in DatasetCatalog.get(synthetic_train)[:2]
    ]

    def losses(truncated, weight, level_pairs=()):
        for b in batch:
            n = len(b["instances"])
            b["instances"].gt_truncated = torch.full((n,), truncated, dtype=torch.bool)
        pairs = [list(p) for p in level_pairs]
        return _weighted_losses(cfg, model, batch, TRUNCATED_WEIGHT=weight, INSTANCE_WEIGHTS=pairs)

    plain = losses(False, 1.0)
    # no truncated vertebra in the batch: a weight of 3 changes nothing
    none_cut = losses(False, 3.0)
    for k in ("loss_cls", "loss_box_reg", "loss_mask"):
        assert none_cut[k] == pytest.approx(plain[k], rel=1e-5), k
    # every vertebra truncated: box regression and masks scale exactly, classification only in
    # its foreground part
    all_cut = losses(True, 3.0)
    assert all_cut["loss_box_reg"] == pytest.approx(3.0 * plain["loss_box_reg"], rel=1e-5)
    assert all_cut["loss_mask"] == pytest.approx(3.0 * plain["loss_mask"], rel=1e-5)
    assert plain["loss_cls"] < all_cut["loss_cls"] < 3.0 * plain["loss_cls"]
    # the truncated weight multiplies the level's weight
    both = losses(True, 1.5, [(lv, 2.0) for lv in cfg.SPINE.LEVELS])
    assert both["loss_mask"] == pytest.approx(3.0 * plain["loss_mask"], rel=1e-5)

    for bad in (0.0, -1.0, "heavy"):
        c = cfg.clone()
        c.defrost()
        c.SPINE.LEVEL_HEAD.TRUNCATED_WEIGHT = bad
        with pytest.raises(ValueError, match=f"TRUNCATED_WEIGHT must be > 0, not {bad}"):
            build_model(c)


def test_a_scan_without_vertebrae_beside_one_with_them_trains_with_weights(
    level_model, synthetic_train
):
    """detectron2 leaves the proposals of an image without ground truth without gt fields; the
    level loss and the loss weights must read them as background, not fail."""
    import copy

    from detectron2.data import DatasetCatalog

    cfg, model = level_model
    records = copy.deepcopy(DatasetCatalog.get(synthetic_train)[:2])
    records[1]["annotations"] = []
    mapper = XrayDatasetMapper(cfg, is_train=True)
    batch = [mapper(r) for r in records]
    assert len(batch[1]["instances"]) == 0 and len(batch[0]["instances"]) > 0
    c = cfg.clone()
    c.defrost()
    c.SPINE.LEVEL_HEAD.TRUNCATED_WEIGHT = 2.0
    c.SPINE.LEVEL_HEAD.INSTANCE_WEIGHTS = [["T12", 2.0]]
    m = build_model(c)
    m.load_state_dict(model.state_dict())
    m.train()
    with EventStorage():
        out = m(batch)
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss_level"].item() > 0
