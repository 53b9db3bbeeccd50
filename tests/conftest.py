import pytest

from spine_d2.data.synthetic import make_synthetic_spine_dataset


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """A small synthetic COCO dataset on disk: (json_file, image_root)."""
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_spine_dataset(root, num_images=6, size=128, seed=1)
