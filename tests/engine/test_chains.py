"""Multi-stage recipes hand over by path: stage k starts from stage k-1's model_final.pth. A typo
there fails hours into `make train-aasce` / `make train-pretrained`, so it is checked here."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from spine_d2.engine import build_config

TRAINING_TARGETS = ("train-aasce", "train-aasce-gpu", "study-aasce", "train-pretrained")
AASCE_CHAIN = [
    f"configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_stage{k}_cpu.yaml" for k in (1, 2, 3, 4, 5)
]
# The shorter recipe (AASCE_STAGES="1 short2") and the third stage tried on it
AASCE_SHORT_CHAIN = [AASCE_CHAIN[0]] + [
    f"configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_{s}_cpu.yaml" for s in ("short2", "short3")
]
# The stages make train-pretrained runs, as the Makefile lists them.
_STAGES = re.search(
    r"^PRETRAIN_STAGES := (.+)$", (Path(__file__).parents[2] / "Makefile").read_text(), re.M
).group(1)
PRETRAIN_CHAIN = [
    f"configs/pretrain/spine_mask_rcnn_R_18_FPN_drr_stage{k}_cpu.yaml" for k in _STAGES.split()
]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", TRAINING_TARGETS)
def test_make_training_targets_name_existing_configs(target):
    out = subprocess.run(
        ["make", "-n", target], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    # ${n} is the pretraining loop's shell variable: its stages are checked below.
    names = {m for m in re.findall(r"configs/[^\s;\"']+\.yaml", out) if "$" not in m}
    assert names, f"make -n {target} names no config"
    missing = sorted(n for n in names if not Path(n).is_file())
    assert not missing, f"make {target} names missing configs: {missing}"


@pytest.mark.parametrize(
    "chain",
    [AASCE_CHAIN, AASCE_SHORT_CHAIN, PRETRAIN_CHAIN],
    ids=["aasce", "aasce-short", "pretrain"],
)
def test_each_stage_starts_from_the_previous_stage(chain):
    cfgs = [build_config(c) for c in chain]
    for prev, cur, name in zip(cfgs, cfgs[1:], chain[1:]):
        assert cur.MODEL.WEIGHTS == f"{prev.OUTPUT_DIR}/model_final.pth", name
    assert len({c.OUTPUT_DIR for c in cfgs}) == len(cfgs)  # no stage overwrites another's


def test_real_data_recipes_start_from_the_shipped_checkpoint():
    for config in (AASCE_CHAIN[0], "configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_gpu.yaml"):
        weights = build_config(config).MODEL.WEIGHTS
        assert weights == "weights/spine_mask_rcnn_R_18_FPN_drr.pth" and Path(weights).is_file()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_aasce_runs_the_stages_it_is_given_in_order():
    for stages, chain in (("1 2 3 4 5", AASCE_CHAIN), ("1 short2 short3", AASCE_SHORT_CHAIN)):
        out = subprocess.run(
            ["make", "-n", "train-aasce", f"AASCE_STAGES={stages}"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        trained = re.findall(r"for cfg in ([^;]+); do", out)[-1].split()  # the training loop
        assert trained == chain, stages


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_aasce_refuses_an_unknown_stage_before_training():
    # -o: never (re)build the venv here; the check must fire before stage 1 trains for an hour
    run = subprocess.run(
        ["make", "-o", ".venv/.installed", "train-aasce", "AASCE_STAGES=1 short9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0
    assert "aasce_drr_stageshort9_cpu.yaml: no such config" in run.stdout
    assert "== configs" not in run.stdout  # no stage started
