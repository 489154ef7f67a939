"""Constrained decoding: every output parses and validates, even from the 135M model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from lanner.engine import constrain
from lanner.engine.engine import Engine
from lanner.engine.model import Model
from lanner.errors import InvalidRequest
from lanner.server.app import create_app
from lanner.server.protocol import response_constraint
from serverkit import serving

# Five schemas (nested objects, enums, arrays, bounded numbers, required
# fields) shared with benchmarks/constrained.py.
CASES: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).parents[1] / "benchmarks" / "data" / "json_schemas.json").read_text())
SCHEMAS = {name: case["schema"] for name, case in CASES.items()}
PROMPTS = {name: case["prompt"] for name, case in CASES.items()}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return Engine(tmp_path_factory.mktemp("home")).load("smollm2")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_twenty_sampled_outputs_per_schema_all_validate(smollm2: Model, name: str) -> None:
    schema = SCHEMAS[name]
    constraint = constrain.json_schema(schema)
    messages = [{"role": "user", "content": PROMPTS[name] + " Answer in JSON."}]

    def one(seed: int) -> str:
        reply = smollm2.chat(messages, constraint=constraint, seed=seed, temperature=1.0,
                             max_tokens=300)
        return str(reply["content"])

    with ThreadPoolExecutor(8) as pool:  # the backend batches them together
        outputs = list(pool.map(one, range(20)))
    for text in outputs:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(outputs)) > 1  # sampled, not one canned answer


def test_unconstrained_output_is_not_json_for_contrast(smollm2: Model) -> None:
    text = smollm2.generate("Pick a colour and a mood.", seed=1, max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_transformers_backend_honours_constraints_too(tmp_path: Path) -> None:
    model = Engine(tmp_path).load("tinycoder", backend="transformers")
    schema = SCHEMAS["enum"]
    text = model.generate("x", raw=True, constraint=constrain.json_schema(schema),
                          seed=0, max_tokens=60)
    jsonschema.validate(json.loads(text), schema)


def test_regex_constraint_on_random_weights(tmp_path: Path) -> None:
    model = Engine(tmp_path).load("tinycoder")
    c = constrain.Constraint("regex", r"[0-9]{3}-[a-z]{2}")
    for seed in range(5):
        text = model.generate("x", raw=True, constraint=c, seed=seed, max_tokens=20)
        assert len(text) == 6 and text[3] == "-" and text[:3].isdigit(), text


@pytest.mark.parametrize(
    ("fmt", "field"),
    [
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
         "response_format.json_schema.schema"),
    ],
)
def test_bad_response_formats_name_the_field(fmt: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        response_constraint(fmt)
    assert info.value.param == field


def test_json_text_that_is_not_json_is_an_error() -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        constrain.json_schema("{nope", field="--schema")


def test_openai_client_gets_schema_valid_json(smollm2: Model, tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    engine.attach("smollm2", smollm2.backend)
    schema = SCHEMAS["bounded_numbers"]
    with serving(create_app(engine, ["smollm2"], embedder=None)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Give an age and a score."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": schema}},
            max_tokens=100, seed=4,
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
        obj = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say anything."}],
            response_format={"type": "json_object"}, max_tokens=200, seed=5,
        )
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
