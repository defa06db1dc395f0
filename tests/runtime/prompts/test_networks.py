"""extract_networks: A1111's `<lora:...>` tags out of the prompt, with their weights."""

import logging

import pytest

from sdrt.runtime.errors import InputError
from sdrt.runtime.prompts import NetworkTag, extract_networks


@pytest.mark.parametrize(("tag", "expected"), [
    ("<lora:cat>", NetworkTag("lora", "cat", 1.0, 1.0)),
    ("<lora:cat:0.8>", NetworkTag("lora", "cat", 0.8, 0.8)),
    ("<lora:cat:0.8:0.3>", NetworkTag("lora", "cat", 0.8, 0.3)),
    ("<lora:cat:te=0.2:unet=-0.5>", NetworkTag("lora", "cat", 0.2, -0.5)),
    ("<lora:cat:0.7:unet=0.1>", NetworkTag("lora", "cat", 0.7, 0.1)),
    ("<lora:cat:0.6:dyn=8>", NetworkTag("lora", "cat", 0.6, 0.6)),
    ("<lyco:dog:0.5>", NetworkTag("lyco", "dog", 0.5, 0.5)),
])
def test_tags(tag, expected):
    text, tags = extract_networks(f"a photo {tag}of a cat")
    assert text == "a photo of a cat" and tags == [expected]


def test_several_tags_in_order_and_other_kinds_removed_and_logged(caplog):
    with caplog.at_level(logging.WARNING):
        text, tags = extract_networks("<lora:a:0.5> x <hypernet:h:1> y <lora:b>")
    assert text == " x  y " and [t.name for t in tags] == ["a", "b"]
    assert "hypernet" in caplog.text


@pytest.mark.parametrize(("tag", "message"), [
    ("<lora:cat:heavy>", "weight 'heavy' is not a number"),
    ("<lora:cat:nan>", "weight 'nan' is not a number"),
    ("<lora:cat:te=inf>", "weight 'inf' is not a number"),
    ("<lora:te=1>", "names no network"),
])
def test_bad_tags_are_one_line(tag, message):
    with pytest.raises(InputError, match=message):
        extract_networks(tag)
