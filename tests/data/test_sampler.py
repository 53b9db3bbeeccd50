"""MixedDatasetSampler and SPINE.TRAIN_DATASET_WEIGHTS: shares, epochs, sharding, the loader."""

import itertools
import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from spine_d2.data.datasets import register_spine_coco
from spine_d2.data.sampler import MixedDatasetSampler, dataset_mix
from spine_d2.data.synthetic import make_synthetic_spine_dataset


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_shares_are_kept_whatever_the_sizes():
    # a 3-image dataset at 3/4 of the stream against a 100-image one: concatenation would give 3 %
    idx = _take(MixedDatasetSampler([3, 100], [0.75, 0.25], seed=0), 8000)
    small = sum(i < 3 for i in idx)
    assert abs(small / len(idx) - 0.75) < 0.02
    assert min(idx) == 0 and max(idx) == 102 and set(idx) == set(range(103))


def test_each_dataset_is_seen_once_before_any_image_twice():
    idx = _take(MixedDatasetSampler([5, 7], [0.5, 0.5], seed=3), 2000)
    for lo, size in ((0, 5), (5, 7)):
        own = [i - lo for i in idx if lo <= i < lo + size]
        full = len(own) // size * size
        for k in range(0, full, size):
            assert sorted(own[k : k + size]) == list(range(size))


def test_zero_share_dataset_is_never_drawn_and_seed_repeats():
    a = _take(MixedDatasetSampler([4, 6], [1.0, 0.0], seed=7), 500)
    assert set(a) == set(range(4))
    assert a == _take(MixedDatasetSampler([4, 6], [1.0, 0.0], seed=7), 500)
    assert _take(MixedDatasetSampler([4, 6], [0.5, 0.5], seed=7), 50) != _take(
        MixedDatasetSampler([4, 6], [0.5, 0.5], seed=8), 50
    )


def test_ranks_split_one_stream():
    one = _take(MixedDatasetSampler([4, 9], [0.3, 0.7], seed=5), 200)
    ranks = []
    for rank in (0, 1):
        s = MixedDatasetSampler([4, 9], [0.3, 0.7], seed=5)
        s._rank, s._world_size = rank, 2
        ranks.append(_take(s, 100))
    assert [i for pair in zip(*ranks) for i in pair] == one


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0], "1 weights for 2 DATASETS.TRAIN entries"),
        ([1.0, -1.0], "finite, >= 0"),
        ([0, 0], "not all 0"),
        ([1.0, float("nan")], "finite, >= 0"),
    ],
)
def test_bad_weights_are_one_line_errors(weights, match):
    with pytest.raises(ValueError, match=match):
        dataset_mix(["a", "b"], weights)
    assert dataset_mix(["a", "b"], [3, 1]) == [0.75, 0.25]


def test_empty_dataset_with_a_share_is_refused():
    with pytest.raises(ValueError, match="empty"):
        MixedDatasetSampler([0, 5], [0.5, 0.5], seed=0)


@pytest.fixture
def two_datasets(synthetic_coco, tmp_path):
    other = make_synthetic_spine_dataset(tmp_path / "b", num_images=2, size=128, seed=9)
    register_spine_coco("spine_synthetic_train", *synthetic_coco)
    register_spine_coco("spine_synthetic_b", *other)
    yield "spine_synthetic_train", "spine_synthetic_b", other
    for name in ("spine_synthetic_train", "spine_synthetic_b", "spine_synthetic_c"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_trainer_loader_mixes_at_the_weights(two_datasets, train_args, tmp_path):
    from spine_d2.engine.setup import setup
    from spine_d2.engine.trainer import SpineTrainer

    a, b, _ = two_datasets
    cfg = setup(
        train_args(
            tmp_path / "mix",
            "DATASETS.TRAIN",
            f"('{a}', '{b}')",
            "SPINE.TRAIN_DATASET_WEIGHTS",
            "[1.0, 3.0]",
            "DATALOADER.NUM_WORKERS",
            "0",
        )
    )
    b_files = {d["file_name"] for d in DatasetCatalog.get(b)}
    seen = [
        d["file_name"]
        for batch in itertools.islice(SpineTrainer.build_train_loader(cfg), 60)
        for d in batch
    ]
    share_b = sum(f in b_files for f in seen) / len(seen)
    # 2 of 8 images (a quarter) by concatenation; three quarters by the weights
    assert 0.6 < share_b < 0.9, share_b


def test_trainer_loader_refuses_mixed_class_names(two_datasets, train_args, tmp_path):
    from spine_d2.engine.setup import setup
    from spine_d2.engine.trainer import SpineTrainer

    a, _, (json_file, image_root) = two_datasets
    coco = json.loads(open(json_file).read())
    for c in coco["categories"]:
        c["name"] = "vertebral_body"
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(coco))
    register_spine_coco("spine_synthetic_c", str(renamed), image_root)
    cfg = setup(
        train_args(
            tmp_path / "bad",
            "DATASETS.TRAIN",
            f"('{a}', 'spine_synthetic_c')",
            "SPINE.TRAIN_DATASET_WEIGHTS",
            "[1.0, 1.0]",
        )
    )
    with pytest.raises(
        ValueError, match="different class names.*'spine_synthetic_c': \\['vertebral_body'\\]"
    ):
        SpineTrainer.build_train_loader(cfg)
