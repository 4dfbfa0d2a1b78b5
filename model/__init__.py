"""The shared model zoo: one Transformer, parts selected by ModelConfig."""
from model.cache import KVCache
from model.config import ModelConfig
from model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache"]
