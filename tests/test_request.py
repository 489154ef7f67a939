"""Request validation: bad values are errors that name the field, never clamped."""

from __future__ import annotations

import pytest

from lanner.engine.model import make_request
from lanner.engine.types import Request
from lanner.errors import InvalidRequest


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", 1.2),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("seed", -1),
        ("top_logprobs", 21),
        ("logprobs", "yes"),
        ("stop", ("",)),
    ],
)
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        Request(prompt=[1, 2], **{field: value})  # type: ignore[arg-type]
    assert info.value.param == field
    assert str(info.value).startswith(f"{field}:")


def test_good_values_are_kept_exactly() -> None:
    r = Request(prompt="hi", temperature=0, top_p=1.0, top_k=0, seed=7, stop=["\n"])
    assert (r.temperature, r.top_p, r.top_k, r.seed, r.stop) == (0, 1.0, 0, 7, ("\n",))
    assert r.greedy
    assert r.sampling()["seed"] == 7


def test_empty_token_prompt_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="prompt"):
        Request(prompt=[])


def test_unknown_keyword_option_is_named() -> None:
    with pytest.raises(InvalidRequest) as info:
        make_request([1], {"temprature": 0.5})
    assert info.value.param == "temprature"


def test_single_stop_string_option_becomes_a_tuple() -> None:
    assert make_request([1], {"stop": "END"}).stop == ("END",)
