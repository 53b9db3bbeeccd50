from .setup import build_config, setup
from .trainer import SpineTrainer
from .train import main

__all__ = ["SpineTrainer", "build_config", "main", "setup"]
