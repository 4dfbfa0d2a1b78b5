"""What the alignment tests share: one toy SFT checkpoint, saved once per session, and the
character tokenizer + chat template standing in for the trained BPE ones in the entry scripts.
(The root conftest already pins torch to one thread.)"""
import sys
import types

import pytest

from align import train_offline, train_online
from tests.align.toy_setup import STOP, CharTok, render_char_chat, tiny_policy
from utils.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory):
    """A saved tiny policy (seed 0, context 40). Shared safely: the scripts only read init_from and
    write under their own out_dir."""
    return save_checkpoint(tmp_path_factory.mktemp("toy") / "sft", tiny_policy(0, max_seq_len=40))


@pytest.fixture
def char_chat(monkeypatch):
    """The scripts (and the preference loader) see CharTok and the character chat template."""
    fake = types.ModuleType("chat_template")
    fake.render_chat = render_char_chat
    fake.chat_stop_ids = lambda tok: [STOP]
    monkeypatch.setitem(sys.modules, "data_pipeline.tokenizer.chat_template", fake)
    for module in (train_offline, train_online):
        monkeypatch.setattr(module, "load_tokenizer", lambda cfg: (CharTok(), None))
