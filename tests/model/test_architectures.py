"""model/architectures.py: every named architecture validates, maps to the HuggingFace family
it names, and a published size has its published parameter count."""
import pytest
import torch

from model import Transformer, architectures
from model.hf_interop import family_of
from utils.errors import UserError

PUBLISHED = [name for name in architectures.names() if architectures.architecture(name).published_params is not None]


@pytest.mark.parametrize("name", architectures.names())
def test_entry_validates_and_maps_to_its_family(name):
    cfg = architectures.get(name)  # ModelConfig.__post_init__ validates, raising UserError
    assert family_of(cfg) == architectures.architecture(name).hf_family


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_size_has_published_parameter_count(name):
    with torch.device("meta"):  # shapes only, no memory
        n = Transformer(architectures.get(name)).num_params()
    published = architectures.architecture(name).published_params
    assert abs(n - published) / published < 0.001, f"{name}: {n / 1e9:.3f}B vs published {published / 1e9:.3f}B"


def test_unknown_name_names_the_closest():
    with pytest.raises(UserError, match="Did you mean 'llama/llama3_nano'"):
        architectures.get("llama/lama3_nano")


def test_get_returns_a_copy():
    architectures.get("deepseek/v3_671b").rope_scaling["factor"] = 1.0
    assert architectures.get("deepseek/v3_671b").rope_scaling["factor"] == 40.0
