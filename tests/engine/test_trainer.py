"""SpineTrainer end to end on a synthetic dataset: train, checkpoint, resume, eval-only."""

import contextlib
import json
import logging
import math

import pytest
from detectron2.data import DatasetCatalog

from spine_d2.engine import main


def _no_nan(name):
    raise AssertionError(f"eval_results.json is not strict JSON: {name}")


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.json").read_text().splitlines()]


def test_train_resume_and_eval_only(synthetic_train, train_args, tmp_path):
    out = tmp_path / "run"
    main(train_args(out))
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    rows = _metrics(out)
    train_rows = [r for r in rows if "total_loss" in r]
    assert train_rows and all(math.isfinite(r["total_loss"]) for r in train_rows)
    assert max(r["iteration"] for r in train_rows) == 19  # 20 iterations: 0..19
    for key in ("loss_mask", "loss_rpn_cls", "loss_box_reg"):
        assert key in train_rows[-1]

    # --resume continues from the last checkpoint (iteration 20), not from 0, to the new MAX_ITER
    n_before = len(rows)
    main(train_args(out, "SOLVER.MAX_ITER", "24", resume=True))
    new_iters = [r["iteration"] for r in _metrics(out)[n_before:] if "total_loss" in r]
    assert new_iters and min(new_iters) >= 20 and max(new_iters) == 23

    main(train_args(out, "MODEL.WEIGHTS", str(out / "model_final.pth"), eval_only=True))
    res = json.loads((out / "inference" / "eval_results.json").read_text())
    assert set(res) == {"bbox", "segm", "vertebra"}
    assert 0.0 <= res["vertebra"]["recall"] <= 1.0
    assert res["segm"]["AP"] is None or 0.0 <= res["segm"]["AP"] <= 100.0
    json.loads((out / "inference" / "eval_results.json").read_text(), parse_constant=_no_nan)
    assert res["vertebra"]["num_gt"] == sum(
        len(d["annotations"]) for d in DatasetCatalog.get(synthetic_train)
    )


def test_adamw_and_cpu_bf16_autocast_training(synthetic_train, train_args, tmp_path):
    import torch

    from spine_d2.engine.setup import setup
    from spine_d2.engine.trainer import CPUAutocastTrainer, SpineTrainer

    opts = ("SPINE.OPTIMIZER", "ADAMW", "SOLVER.BASE_LR", "0.0002", "SOLVER.AMP.ENABLED", "True")
    cfg = setup(train_args(tmp_path / "amp", *opts, "SOLVER.MAX_ITER", "4"))
    trainer = SpineTrainer(cfg)
    assert isinstance(trainer._trainer, CPUAutocastTrainer)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert all(v.dtype != torch.bfloat16 for v in after.values())  # weights stay fp32
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rows = _metrics(tmp_path / "amp")
    assert all(math.isfinite(r["total_loss"]) for r in rows if "total_loss" in r)


def test_unknown_optimizer_is_refused(synthetic_train, train_args, tmp_path):
    import pytest

    from spine_d2.engine.setup import setup
    from spine_d2.engine.trainer import SpineTrainer

    cfg = setup(train_args(tmp_path / "bad", "SPINE.OPTIMIZER", "LION"))
    with pytest.raises(ValueError, match="SPINE.OPTIMIZER must be SGD or ADAMW"):
        SpineTrainer(cfg)


def test_the_seed_a_run_logs_repeats_it(synthetic_train, train_args, tmp_path):
    """detectron2 draws a seed per run (SEED -1) and logs it; SEED <that seed> trains the same
    weights again, tensor for tensor (bf16 autocast and AdamW as the CPU recipe trains)."""
    import re

    import torch

    opts = ("SOLVER.MAX_ITER", "6", "TEST.EVAL_PERIOD", "0", "SOLVER.AMP.ENABLED", "True",
            "SPINE.OPTIMIZER", "ADAMW", "SOLVER.BASE_LR", "0.0002")  # fmt: skip
    main(train_args(tmp_path / "a", *opts))
    seed = re.search(
        r"Using a generated random seed (\d+)", (tmp_path / "a" / "log.txt").read_text()
    )
    main(train_args(tmp_path / "b", *opts, "SEED", seed.group(1)))
    main(train_args(tmp_path / "c", *opts, "SEED", str(int(seed.group(1)) + 1)))
    a, b, c = (
        torch.load(tmp_path / run / "model_final.pth", weights_only=False)["model"] for run in "abc"
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@contextlib.contextmanager
def _loop_records():
    """What detectron2's train loop logs (its logger does not propagate to caplog's)."""
    records, handler = [], logging.Handler()
    handler.emit = records.append
    loop = logging.getLogger("detectron2.engine.train_loop")
    loop.addHandler(handler)
    try:
        yield records
    finally:
        loop.removeHandler(handler)


def test_other_errors_in_training_keep_detectron2s_traceback(
    synthetic_train, train_args, tmp_path, monkeypatch
):
    import torch

    def broken_save(*a, **k):
        raise RuntimeError("not a full disk")

    monkeypatch.setattr(torch, "save", broken_save)
    opts = ("SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "0")
    with _loop_records() as logged, pytest.raises(RuntimeError, match="not a full disk"):
        main(train_args(tmp_path / "run", *opts))
    assert [r.getMessage() for r in logged if r.exc_info] == ["Exception during training:"]


def test_a_full_disk_mid_training_is_one_line_and_leaves_whole_checkpoints(
    synthetic_train, train_args, tmp_path, monkeypatch
):
    """The periodic checkpointer saves through a temporary name: the disk filling up while
    model_0000003.pth is written leaves model_0000001.pth whole and named by last_checkpoint,
    no half file under any name, and one line naming the file; --resume then ends the run."""
    import errno

    import torch

    from spine_d2.errors import OutputError

    out = tmp_path / "run"
    opts = ("SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0")
    real_save, saves = torch.save, []

    def save_then_fill_up(obj, f, *a, **k):
        saves.append(getattr(f, "name", f))
        if len(saves) == 2:  # as torch.save fails: its zip writer's RuntimeError on top
            f.write(b"half a checkpoint")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fill_up)
    with _loop_records() as logged, pytest.raises(OutputError) as e:
        main(train_args(out, *opts))
    assert not [r for r in logged if r.exc_info]  # the one line, not detectron2's traceback too
    assert str(e.value) == (
        f"{out / 'model_0000003.pth'}: cannot write it (No space left on device): the "
        "checkpoints written before it are whole and last_checkpoint names the newest; make "
        "room (or copy OUTPUT_DIR elsewhere) and run again with --resume"
    )
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(out / "model_0000001.pth", weights_only=False)["iteration"] == 1

    monkeypatch.setattr(torch, "save", real_save)
    main(train_args(out, *opts, resume=True))
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 3


_AGAIN = "make room (or set another OUTPUT_DIR) and run again"
_RESUME = (
    "its checkpoints are whole and last_checkpoint names the newest; make room (or copy "
    "OUTPUT_DIR elsewhere) and run again with --resume"
)


@pytest.mark.parametrize(
    "stops_at, eval_only, advice",
    [
        ("config.yaml", True, _AGAIN),
        ("coco_instances_results.json", True, _AGAIN),
        ("metrics.json", False, _RESUME),
    ],
)
def test_a_full_disk_under_detectron2s_writers_names_the_output_folder(
    synthetic_train, train_args, tmp_path, monkeypatch, stops_at, eval_only, advice
):
    """detectron2 dumps the config, COCOEvaluator its results and the trainer its metrics
    itself; the OSError of a full disk there names no file, so the line names OUTPUT_DIR."""
    import errno
    import io

    from detectron2.evaluation import coco_evaluation

    from spine_d2.errors import OutputError

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "eval"
    real_open = coco_evaluation.PathManager.open  # detectron2's one PathManager

    def open_full(path, mode="r", *a, **k):
        if mode[0] in "wa" and str(path).startswith(str(out)) and str(path).endswith(stops_at):
            return FullDisk()
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(coco_evaluation.PathManager, "open", open_full)
    opts = () if eval_only else ("SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0")
    with _loop_records() as logged, pytest.raises(OutputError) as e:
        main(train_args(out, *opts, eval_only=eval_only))
    assert not [r for r in logged if r.exc_info]
    assert str(e.value) == f"{out}: cannot write it (No space left on device): {advice}"
