"""ZOIExportHook: when it runs, and the export it writes after an eval-only run."""

import json

import pytest
from detectron2.data import DatasetCatalog

from spine_d2.engine import main
from spine_d2.engine.hooks import ZOIExportHook
from spine_d2.zoi import check_manifest_line


def test_eval_only_with_export_after_eval_writes_the_export(synthetic_train, train_args, tmp_path):
    out = tmp_path / "run"
    args = train_args(
        out,
        "ZOI.EXPORT_AFTER_EVAL",
        "True",
        "ZOI.SCORE_THRESH",
        "0.0",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",
        "TEST.DETECTIONS_PER_IMAGE",
        "4",
        "ZOI.NUM_WORKERS",
        "0",
        eval_only=True,
    )
    main(args)  # random init (MODEL.WEIGHTS is empty): the export path is what is tested
    export = out / "zoi" / synthetic_train
    lines = [json.loads(l) for l in (export / "manifest.jsonl").read_text().splitlines()]
    records = DatasetCatalog.get(synthetic_train)
    assert len(lines) == len(records)
    for line in lines:
        check_manifest_line(line)
        assert len(line["zois"]) == 4
        assert all((export / z["file"]).is_file() for z in line["zois"])
    summary = json.loads((export / "summary.json").read_text())
    assert summary["scans_ok"] == len(records) and summary["scans_failed"] == 0
    assert (out / "inference" / "eval_results.json").is_file()


class _FakeTrainer:
    def __init__(self, max_iter):
        self.iter, self.max_iter, self.storage = 0, max_iter, None


@pytest.mark.parametrize("period,expected", [(0, [9]), (4, [3, 7, 9])])
def test_hook_exports_after_the_final_evaluation_and_every_period(period, expected):
    calls = []
    hook = ZOIExportHook(period, lambda: calls.append(hook.trainer.iter) or {})
    hook.trainer = _FakeTrainer(10)
    for it in range(10):
        hook.trainer.iter = it
        hook.after_step()
    hook.after_train()
    assert calls == expected
