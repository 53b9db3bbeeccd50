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
