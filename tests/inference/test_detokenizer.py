"""IncrementalDetokenizer: text streamed token by token equals one decode of all ids, even when
byte-level tokens split multi-byte UTF-8 characters; a stop string cuts the text and is never
half-sent."""
from inference.detokenizer import IncrementalDetokenizer

TEXT = "naïve café → 世界 🎉 ok"


class ByteTokenizer:
    """Byte-level BPE in miniature: each id is a run of bytes, decoding joins them and replaces an
    incomplete UTF-8 sequence with U+FFFD (as the HF ByteLevel decoder does)."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def chunked(text: str, sizes=(1, 2, 3)) -> ByteTokenizer:
    """``text``'s UTF-8 bytes cut into runs of 1, 2, 3, 1, ... bytes: runs start and end inside characters."""
    data, pieces, i = text.encode(), [], 0
    while i < len(data):
        n = sizes[len(pieces) % len(sizes)]
        pieces.append(data[i : i + n])
        i += n
    return ByteTokenizer(pieces)


def stream(tok, n_ids: int, stop: list[str]) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ids 0..n_ids-1 one at a time as the engine does; returns the streamed pieces."""
    detok, pieces, ids = IncrementalDetokenizer(tok, stop), [], []
    for i in range(n_ids):
        ids.append(i)
        if detok.update(ids) is not None:  # stop string: finished
            pieces.append(detok.new_text(True))
            return pieces, detok
        pieces.append(detok.new_text(False))
    detok.flush(ids)  # length limit: finished
    pieces.append(detok.new_text(True))
    return pieces, detok


def test_tokens_really_split_characters():
    tok = chunked(TEXT)
    partial = [tok.decode(list(range(n))) for n in range(1, len(tok.pieces))]
    assert sum(p.endswith("\ufffd") for p in partial) >= 4  # so the tests below mean something


def test_streamed_text_equals_full_decode():
    tok = chunked(TEXT)
    pieces, detok = stream(tok, len(tok.pieces), stop=[])
    assert "".join(pieces) == detok.text == TEXT == tok.decode(list(range(len(tok.pieces))))
    assert not any("\ufffd" in p for p in pieces)
    assert sum(p != "" for p in pieces) > 5  # text flowed while generating, not only at the end


def test_stop_string_cuts_the_text_and_is_never_half_sent():
    text = "ab 世 x 世 y 世界 zz"  # two false starts of the multi-byte stop string before the real one
    tok = chunked(text, sizes=(2, 1))
    pieces, detok = stream(tok, len(tok.pieces), stop=["世界"])
    want = "ab 世 x 世 y "
    assert detok.text == "".join(pieces) == want
    for n in range(len(pieces)):  # what a client had seen at every step is a prefix of the answer
        assert want.startswith("".join(pieces[:n]))


def test_earliest_of_several_stop_strings_wins():
    tok = ByteTokenizer([b"one; two, three"])  # both stop strings arrive in one piece of text
    pieces, detok = stream(tok, 1, stop=[", t", "; "])
    assert detok.text == "".join(pieces) == "one"


def test_flush_keeps_a_trailing_incomplete_character():
    tok = ByteTokenizer([b"ok ", "界".encode()[:2]])  # the sequence ends inside a 3-byte character
    pieces, detok = stream(tok, 2, stop=[])
    assert "".join(pieces) == detok.text == "ok \ufffd" == tok.decode([0, 1])
    assert pieces[:2] == ["ok ", ""]  # the half character was held until the end
