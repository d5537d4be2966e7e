"""Inputs LLaVA's processor takes: EXIF-rotated photos, image URLs, message objects, OpenAI `image_url` parts; and
conversations the templates would render wrong (two user turns in a row) are refused, naming the message."""

from __future__ import annotations

import dataclasses
import http.server
import io
import threading

import pytest
import torch
from PIL import Image, ImageOps

from aligngpt_hf.models.image_processing_utils_aligngpt import check_conversation, load_image


def rotated_jpeg(path=None) -> bytes:
    """A 40x20 picture (left red, right blue) stored sideways with EXIF orientation 6 (turn 90 degrees to view)."""
    picture = Image.new("RGB", (40, 20), (220, 20, 20))
    picture.paste((20, 20, 220), (20, 0, 40, 20))
    stored = picture.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 20x40
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    """A loopback HTTP server (127.0.0.1 only) serving one PNG and the rotated JPEG."""
    png = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 200, 30)).save(png, format="PNG")
    files = {"/green.png": png.getvalue(), "/rotated.jpg": rotated_jpeg()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


# ------------------------------------------------------------------------------------------------ EXIF


def test_exif_rotated_photo_is_upright_for_a_path_bytes_and_the_datasets_decoder(tmp_path, processor):
    import datasets

    rotated_jpeg(tmp_path / "photo.jpg")
    from_path = load_image(str(tmp_path / "photo.jpg"))
    assert from_path.size == (40, 20)  # upright: wide, as the camera meant it
    assert from_path.getpixel((5, 10))[0] > 150 and from_path.getpixel((35, 10))[2] > 150  # red left, blue right
    decoded = datasets.Dataset.from_dict({"image": [str(tmp_path / "photo.jpg")]}).cast_column(
        "image", datasets.Image())[0]["image"]  # what training through `datasets` sees
    assert list(load_image(decoded).getdata()) == list(from_path.getdata())
    with Image.open(tmp_path / "photo.jpg") as opened:  # a PIL image opened by the user, tag still set
        assert list(load_image(opened).getdata()) == list(from_path.getdata())
    assert list(load_image((tmp_path / "photo.jpg").read_bytes()).getdata()) == list(from_path.getdata())
    by_path = processor(images=str(tmp_path / "photo.jpg"), text="<image>", return_tensors="pt")["pixel_values"]
    by_hand = processor(images=ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg")).convert("RGB"),
                        text="<image>", return_tensors="pt")["pixel_values"]
    assert torch.equal(by_path, by_hand)


# ------------------------------------------------------------------------------------------------ URLs


def test_image_url_in_the_processor_is_fetched(server, processor):
    fetched = processor(images=f"{server}/green.png", text="<image>", return_tensors="pt")["pixel_values"]
    local = processor(images=Image.new("RGB", (24, 16), (10, 200, 30)), text="<image>", return_tensors="pt")
    assert torch.equal(fetched, local["pixel_values"])
    assert load_image(f"{server}/rotated.jpg").size == (40, 20)  # transformers' loader applies EXIF too


def test_unreachable_image_url_names_the_url(server):
    with pytest.raises(ValueError, match=rf"images: could not load the image URL {server}/missing\.png \("):
        load_image(f"{server}/missing.png", "images")


@pytest.mark.parametrize("part", ["hf", "openai"])
def test_chat_image_parts_with_urls_are_loaded(server, processor, part):
    url = f"{server}/green.png"
    image_part = {"type": "image", "url": url} if part == "hf" else {"type": "image_url", "image_url": {"url": url}}
    messages = [{"role": "user", "content": [image_part, {"type": "text", "text": "What colour?"}]}]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    local = processor(images=Image.new("RGB", (24, 16), (10, 200, 30)), text="<image>", return_tensors="pt")
    assert torch.equal(batch["pixel_values"], local["pixel_values"])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == processor.image_seq_length


# ------------------------------------------------------------------------------------------------ messages


@dataclasses.dataclass
class Message:
    role: str
    content: list
    tool_calls: list | None = None


@dataclasses.dataclass
class ImageURLBlock:
    image_url: dict
    type: str = "image_url"


def test_message_objects_render_like_the_equivalent_dicts(processor):
    """transformers' own `test_chat_template_message_objects`, and our template with the same messages as dicts."""
    dummy_template = (
        "{% for message in messages %}"
        "{{ message.role }}{% if message.tool_calls is defined %} (tool calls){% endif %}:"
        "{% for block in message.content %} {{ block.type }}={{ block.url or block.text }}{% endfor %}"
        "{% endfor %}"
    )
    messages = [Message("user", [ImageURLBlock({"url": "https://example.com/cat.png"}),
                                 {"type": "text", "text": "What is this?"}])]
    assert processor.apply_chat_template(messages, tokenize=False, chat_template=dummy_template) == (
        "user: image=https://example.com/cat.png text=What is this?")
    objects = [Message("user", [{"type": "image"}, {"type": "text", "text": "Hi?"}]), Message("assistant", "Yes.")]
    dicts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
             {"role": "assistant", "content": "Yes."}]
    assert processor.apply_chat_template(objects, tokenize=False) == processor.apply_chat_template(dicts,
                                                                                                   tokenize=False)


def test_two_user_turns_in_a_row_are_refused_naming_the_message(processor):
    messages = [{"role": "user", "content": "First q."}, {"role": "user", "content": "Second q."}]
    with pytest.raises(ValueError, match=r"^message 1 is a second `user` message in a row, which the chat template "
                                         r"would glue to the first; merge them"):
        processor.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match=r"^conversation 1, message 3 is a second `user` message in a row"):
        check_conversation([[{"role": "user", "content": "a"}],
                            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}, {"role": "user", "content": "d"}]])
