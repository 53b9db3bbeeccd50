"""Argument checks of the benchmarks: bad input stops with one argparse line, before any model
or dataset is loaded."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_levels  # noqa: E402
import bench_masks  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--thresholds", "0.5,1.2"], "thresholds must be in (0, 1): '0.5,1.2'"),
        (["--thresholds", "0.5,x"], "not a comma-separated list of numbers: '0.5,x'"),
        (["--dataset", "spine_nope"], "--dataset spine_nope is not registered"),
    ],
)
def test_bench_masks_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_masks.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_thresholds_and_weights_parse_in_order():
    assert bench_masks._thresholds("0.3,0.5,0.7") == [0.3, 0.5, 0.7]
    assert bench_levels._weights("0,2.5") == [0.0, 2.5]
    with pytest.raises(Exception, match="weights must be >= 0"):
        bench_levels._weights("1,-1")


def test_end_drops_remove_the_top_and_the_bottom_detection_and_reindex_pairs():
    import numpy as np

    # three detections listed out of top-to-bottom order: y centres 50, 10, 90
    boxes = np.array([[0, 40, 10, 60], [0, 0, 10, 20], [0, 80, 10, 100]], dtype=np.float32)
    log_probs = np.log(np.eye(3) * 0.9 + 0.05)
    pairs = [(1, 0), (0, 1), (2, 2)]  # (gt index, detection index)
    items = [(boxes, 100, log_probs, pairs, ["T1", "T2", "T3"])]
    out = bench_levels.with_end_drops(items)
    assert len(out) == 3 and out[0][3] == pairs
    no_top, no_bottom = out[1], out[2]
    assert no_top[0].tolist() == boxes[[0, 2]].tolist() and no_top[3] == [(1, 0), (2, 1)]
    assert no_top[2].tolist() == log_probs[[0, 2]].tolist()
    assert no_bottom[0].tolist() == boxes[[0, 1]].tolist() and no_bottom[3] == [(1, 0), (0, 1)]
    # two detections or fewer: nothing to drop without emptying the chain
    assert len(bench_levels.with_end_drops([(boxes[:2], 100, log_probs[:2], [], [])])) == 1


def test_level_cache_round_trips_and_refuses_other_weights_or_a_bad_file(tmp_path):
    import numpy as np

    items = [(np.zeros((2, 4)), 100, np.zeros((2, 3)), [(0, 1)], ["T1", "T2"])]
    path = tmp_path / "sub" / "levels.pkl"
    source = ("c.yaml", "w.pth", "spine_aasce_val")
    assert bench_levels.load_cache(path, source) is None
    bench_levels.save_cache(path, source, items)
    assert [p.name for p in path.parent.iterdir()] == ["levels.pkl"]  # no temporary file left
    got = bench_levels.load_cache(path, source)
    assert got[0][3] == [(0, 1)] and got[0][4] == ["T1", "T2"]
    with pytest.raises(SystemExit, match="with c.yaml / w.pth / spine_aasce_val, not c.yaml / v"):
        bench_levels.load_cache(path, ("c.yaml", "v.pth", "spine_aasce_val"))
    path.write_bytes(b"not a pickle")
    with pytest.raises(SystemExit, match="levels.pkl: not a bench_levels cache"):
        bench_levels.load_cache(path, source)


def test_bench_levels_refuses_a_decoder_it_cannot_replay():
    from spine_d2.engine.setup import build_config

    config = "configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_end_classifier_cpu.yaml"
    with pytest.raises(SystemExit, match="END_CLASSIFIER.FILE / BRANCH_WEIGHT are not replayed"):
        bench_levels.check_replayable(config, build_config(config).SPINE.LEVEL_HEAD)
    stage5 = "configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_stage5_cpu.yaml"
    bench_levels.check_replayable(stage5, build_config(stage5).SPINE.LEVEL_HEAD)  # no error


def test_bench_levels_checks_the_weights_against_their_manifest(tmp_path):
    """The benchmarks and the fitting tools load weights through SpineCheckpointer too: a file
    that is not its manifest's is refused before anything is unpickled."""
    import json

    import torch

    from spine_d2.engine.setup import build_config
    from spine_d2.errors import CheckpointError

    weights = tmp_path / "w.pth"
    torch.save({"model": {}}, weights)
    (tmp_path / "w.json").write_text(json.dumps({"sha256": "0" * 64}))
    cfg = build_config("configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml")
    with pytest.raises(CheckpointError, match=r"w.pth: sha256 .* does not match"):
        bench_levels.collect(cfg, str(weights), "no_such_split", 0.5)
