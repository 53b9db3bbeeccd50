import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from spine_d2.data.datasets import register_spine_coco
from spine_d2.data.synthetic import make_synthetic_spine_dataset
from spine_d2.engine.train import train_args as engine_train_args

INSTANT_CONFIG = "configs/quick_schedules/spine_mask_rcnn_R_18_FPN_instant_test.yaml"


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """A small synthetic COCO dataset on disk: (json_file, image_root)."""
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_spine_dataset(root, num_images=6, size=128, seed=1)


@pytest.fixture
def synthetic_train(synthetic_coco):
    """The synthetic dataset registered under the name the instant-test config trains on."""
    register_spine_coco("spine_synthetic_train", *synthetic_coco)
    yield "spine_synthetic_train"
    DatasetCatalog.remove("spine_synthetic_train")
    MetadataCatalog.remove("spine_synthetic_train")


@pytest.fixture
def train_args():
    """Factory of tools/train_net.py arguments for the instant-test config."""

    def make(output_dir, *opts, eval_only=False, resume=False):
        opts = ["OUTPUT_DIR", str(output_dir), *opts]
        return engine_train_args(INSTANT_CONFIG, opts, eval_only=eval_only, resume=resume)

    return make
