from .setup import build_config, setup
from .train import main, train_args
from .trainer import SpineTrainer

__all__ = ["SpineTrainer", "build_config", "main", "setup", "train_args"]
