"""`response_format` through the official `openai` client: constrained decoding makes even the
random-weight demo model answer JSON that parses and validates against the schema it was given."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

# enums and bounded fields: every answer the grammar allows is short, so a model that picks tokens at
# random still closes the object well within max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "round": {"type": "boolean"},
    },
    "required": ["colour", "count", "round"],
    "additionalProperties": False,
}


def schema_format(schema=SCHEMA):
    return {"type": "json_schema", "json_schema": {"name": "shape", "schema": schema, "strict": True}}


def ask(client, text, **kw):
    kw = {"max_tokens": 60, "temperature": 0, **kw}
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": text}], **kw)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
def test_json_schema_answer_validates(client, sampling):
    r = ask(client, "Describe the shape as JSON.", response_format=schema_format(), **sampling)
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content  # the grammar closed the object
    jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_schema_streamed(client):
    chunks = list(ask(client, "Again, streamed.", response_format=schema_format(), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_without_response_format_the_demo_answers_no_json(client):
    # what makes the tests above able to fail: unconstrained, the random model's text is not JSON
    text = ask(client, "Describe the shape as JSON.", max_tokens=20).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(text)


def test_json_object_answer_parses(client, torch_demo, monkeypatch):
    # random weights never close an open-ended object; a bias towards '"' and '}' stands in for a model
    # that wants to finish, and the grammar decides which of them may come when
    tok = torch_demo.processor.tokenizer
    favoured = [tok.encode(s)[0] for s in ('"', "}", ":")]
    real = torch_demo.decode_rows

    def decode_rows(slots, tokens):
        logits = real(slots, tokens).copy()
        logits[:, favoured] += 100.0
        return logits

    monkeypatch.setattr(torch_demo, "decode_rows", decode_rows)
    r = ask(client, "Any JSON object.", response_format={"type": "json_object"}, max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    assert isinstance(json.loads(c.message.content), dict)


def test_json_object_unfinished_answer_is_a_grammar_prefix(client, server):
    r = ask(client, "Any JSON object.", response_format={"type": "json_object"}, max_tokens=12)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and text.startswith('{"')
    # every byte so far is one the JSON grammar accepts (the model's random picks were masked)
    engine = server[1]
    m = engine.grammars.matcher(engine.grammars.compile({"type": "json_object"}))
    for t in engine.tokenizer.encode(text):
        m.accept(t)


@pytest.mark.parametrize(
    "fmt, words",
    [
        (schema_format({"type": "nonsense"}), "nonsense"),
        (schema_format({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "nowhere"),
        ({"type": "json_schema"}, "needs a json_schema"),
        ({"type": "xml"}, "response_format"),
    ],
)
def test_invalid_schema_is_400_naming_response_format(server, fmt, words):
    r = httpx.post(
        server[0] + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "response_format": fmt},
        timeout=30,
    )
    assert r.status_code in (400, 422), r.text
    err = r.json()["error"]
    assert "response_format" in err["message"] + (err["param"] or "") and words in err["message"]
    assert "Traceback" not in r.text
