"""The synthetic visual task, image decoding, and chats with images in the chat format."""
from __future__ import annotations

import base64
import io
import json
import random

import numpy as np
import pytest

from data_pipeline.images import MAX_IMAGE_PIXELS, decode_image, decode_image_url, encode_png_data_url, to_pixels
from data_pipeline.synthetic import visual
from data_pipeline.synthetic.splits import bucket_of
from data_pipeline.vision_chat import IMAGE_MARKER, drop_images, render_with_images, split_images
from utils.errors import UserError


def cell_colours(img: np.ndarray) -> dict[int, tuple]:
    """What the picture shows: the colour of each non-empty cell, read from the pixels."""
    out = {}
    for cell in range(9):
        r, c = divmod(cell, 3)
        block = img[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].reshape(-1, 3)
        ink = [tuple(p) for p in block if tuple(p) != (255, 255, 255)]
        if ink:
            out[cell] = ink[0]
    return out


def test_answers_agree_with_the_pixels():
    rng = random.Random(0)
    names = {v: k for k, v in visual.COLOURS.items()}
    for _ in range(50):
        scene = visual.random_scene(rng)
        seen = cell_colours(visual.render(scene))
        assert {c: names[v] for c, v in seen.items()} == {s.cell: s.colour for s in scene}
        qa = dict(visual.questions(scene, rng))
        assert qa["How many shapes are there?"] == str(len(seen))
        for q, a in qa.items():
            if q.startswith("What colour"):
                pos = q.removeprefix("What colour is the shape at the ").rstrip("?")
                assert names[seen[visual.POSITIONS.index(pos)]] == a
            if "plus" in q:
                assert int(a) == len(seen) + int(q.rstrip("?").split()[-1])


def test_shapes_differ_and_splits_never_overlap():
    masks = [visual._mask(s) for s in visual.SHAPES]
    assert len({m.tobytes() for m in masks}) == len(masks)
    train = visual.make_examples(40, "train", "caption")
    held = visual.make_examples(40, "eval", "caption")
    key = lambda rows: {r["messages"][1]["content"] for r in rows}  # noqa: E731
    assert not key(train) & key(held)
    assert all(bucket_of(c) == "eval" for c in key(held)) and all(bucket_of(c) != "eval" for c in key(train))
    again = visual.make_examples(40, "train", "caption")
    assert [r["messages"] for r in again] == [r["messages"] for r in train]  # deterministic


def test_decode_refuses_corrupt_oversized_and_remote_images():
    img = visual.render(visual.random_scene(random.Random(1)))
    url = encode_png_data_url(img)
    assert np.array_equal(decode_image_url(url), img)
    with pytest.raises(UserError, match="could not be decoded"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(UserError, match="does not fetch remote images"):
        decode_image_url("https://example.com/cat.png")
    with pytest.raises(UserError, match="not valid base64"):
        decode_image_url("data:image/png;base64,@@@")
    from PIL import Image

    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # tiny file, too many pixels
    with pytest.raises(UserError, match="pixels"):
        decode_image(buf.getvalue())
    px = to_pixels([img, np.zeros((48, 48, 3), np.uint8)], 24)
    assert px.shape == (2, 3, 24, 24) and px.min() >= -1 and px.max() <= 1
    assert float(px[0, :, 0, 0].mean()) == 1.0  # the white background


def test_decode_reads_images_as_a_viewer_shows_them():
    """Files as cameras and editors write them: an EXIF-rotated JPEG comes out upright, transparent
    pixels on white (as the task's background), grey and palette images as RGB, an animation's first frame."""
    from PIL import Image

    def encoded(img, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright = decode_image(encoded(wide, "JPEG", exif=exif, quality=95))
    assert upright.shape == (40, 20, 3)  # portrait now
    top, bottom = upright[5, 10].astype(int), upright[35, 10].astype(int)
    assert top[2] > 200 and top[0] < 60 and bottom[0] > 200 and bottom[2] < 60  # blue on top after the turn
    assert decode_image(encoded(wide, "JPEG", quality=95)).shape == (20, 40, 3)  # no tag: as stored

    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    clear.putpixel((1, 1), (0, 255, 0, 255))
    px = decode_image(encoded(clear, "PNG"))
    assert px[0, 0].tolist() == [255, 255, 255] and px[1, 1].tolist() == [0, 255, 0]
    grey = decode_image(encoded(Image.new("L", (6, 4), 90), "PNG"))
    assert grey.shape == (4, 6, 3) and (grey == 90).all()
    frames = [Image.new("P", (5, 5), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * 759)
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(gif.getvalue())[0, 0].tolist() == [200, 0, 0]


def test_damaged_metadata_never_escapes_as_anything_but_a_clear_error():
    """A JPEG whose EXIF block is damaged byte by byte (3,000 seeded mutations): each decodes (the pixels as
    stored) or is a UserError, never another exception (which the server would answer with a 500)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "maker"
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buf, format="JPEG", exif=exif)
    data = buf.getvalue()
    start, rng, outcomes = data.find(b"Exif"), random.Random(0), set()
    for _ in range(3000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            damaged[rng.randrange(start, start + 80)] = rng.randrange(256)
        try:
            decode_image(bytes(damaged))
            outcomes.add("decoded")
        except UserError:
            outcomes.add("refused")
    assert outcomes == {"decoded", "refused"}


def test_split_images_reads_both_layouts(tmp_path):
    img = visual.render(visual.random_scene(random.Random(2)))
    (tmp_path / "a.png").write_bytes(base64.b64decode(encode_png_data_url(img).split(",", 1)[1]))
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    msgs, imgs = split_images(parts, ["a.png"], tmp_path)
    assert msgs[0]["content"] == IMAGE_MARKER + "\nHow many?" and np.array_equal(imgs[0], img)
    markers = [{"role": "user", "content": "<image>\nHow many?"}]
    assert split_images(markers, ["a.png"], tmp_path)[0] == msgs
    url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": encode_png_data_url(img)}},
                                        {"type": "text", "text": "How many?"}]}]
    assert split_images(url, allow_files=False)[0] == msgs
    with pytest.raises(UserError, match="does not fetch"):
        split_images([{"role": "user", "content": [{"type": "image", "image": "a.png"}]}], base_dir=tmp_path,
                     allow_files=False)  # the server never reads files
    with pytest.raises(UserError, match="shorter than its image markers"):
        split_images(markers, [], tmp_path)
    with pytest.raises(UserError, match="have no <image> marker"):
        split_images([{"role": "user", "content": "hi"}], ["a.png"], tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        split_images(markers, ["missing.png"], tmp_path)
    assert drop_images(msgs)[0]["content"] == "How many?"


def test_render_places_the_image_tokens(tokenizer):
    msgs = [{"role": "user", "content": IMAGE_MARKER + "\nHow many shapes?"}, {"role": "assistant", "content": "3"}]
    ids, mask = render_with_images(tokenizer, msgs, 1, 4, 9)
    text_ids, text_mask = render_with_images(tokenizer, drop_images(msgs), 0, 4, 9)
    assert ids.count(4) == 9 and len(ids) == len(mask)
    start = ids.index(4)
    assert not any(mask[start : start + 9])
    assert ids[:start] == text_ids[:start]  # the template up to the user's content
    question = tokenizer.encode("\nHow many shapes?")
    assert ids[start + 9 : start + 9 + len(question)] == question
    assert sum(mask) == sum(text_mask)  # the assistant's tokens are the same
    with pytest.raises(UserError, match="no vision encoder"):
        render_with_images(tokenizer, msgs, 1, None, 0)
    with pytest.raises(UserError, match="2 image"):
        render_with_images(tokenizer, msgs, 2, 4, 9)


def test_make_visual_task_writes_the_local_layout(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "data_pipeline/download/make_visual_task.py"), "--data_dir",
                          str(tmp_path), "--n_train", "5", "--n_eval", "3", "--vocab_size", "300"],
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "visual/qa_eval.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and all((tmp_path / "visual" / r["images"][0]).is_file() for r in rows)
    assert (tmp_path / "visual/tokenizer/tokenizer.json").is_file()
