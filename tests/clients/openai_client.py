"""The official `openai` Python client against `kollava serve` (run by crates/cli/tests/cli.rs).

usage: openai_client.py BASE_URL IMAGE QUESTION EXPECTED

Checks that the client lists the model, gets EXPECTED for QUESTION about IMAGE (sent as a
base64 data URL, as the OpenAI vision API does) both whole and streamed, that `logprobs`
and `top_logprobs` come back in the client's types (whole and streamed), that `n` gives
the choices separate seeded requests give, that `response_format` (a schema the client
derives from a pydantic model, and `json_object`) gives JSON that the client parses and
`jsonschema` validates, and that a bad request surfaces as the client's own error type.
Prints `ok` last.
"""
import base64
import json
import sys
from typing import Literal

import jsonschema
import openai
import pydantic

base_url, image, question, expected = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key="unused")

models = client.models.list()
model = models.data[0].id

with open(image, "rb") as f:
    url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
messages = [{
    "role": "user",
    "content": [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": url}},
    ],
}]

whole = client.chat.completions.create(model=model, messages=messages, temperature=0)
text = whole.choices[0].message.content
assert text == expected, f"whole: {text!r} != {expected!r}"
assert whole.usage.completion_tokens > 0

stream = client.chat.completions.create(model=model, messages=messages, temperature=0, stream=True)
parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
assert "".join(parts) == expected, f"streamed: {''.join(parts)!r} != {expected!r}"
assert len([p for p in parts if p]) > 1, "streamed in several pieces"

# logprobs / top_logprobs, whole and streamed (kollava sends them with the closing chunk).
lp = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                    logprobs=True, top_logprobs=2)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens, (len(content), lp.usage)
assert all(len(t.top_logprobs) == 2 and t.logprob == t.top_logprobs[0].logprob for t in content)
assert all(t.logprob <= 0 and t.bytes for t in content)
streamed = [c.choices[0].logprobs.content for c in client.chat.completions.create(
    model=model, messages=messages, temperature=0, logprobs=True, top_logprobs=2, stream=True)
    if c.choices and c.choices[0].logprobs]
assert [t.logprob for part in streamed for t in part] == [t.logprob for t in content]

# n choices: choice i is what seed + i gives alone.
several = client.chat.completions.create(model=model, messages=messages, temperature=1.0,
                                         seed=3, n=2, max_tokens=8)
assert [c.index for c in several.choices] == [0, 1]
for c in several.choices:
    alone = client.chat.completions.create(model=model, messages=messages, temperature=1.0,
                                           seed=3 + c.index, max_tokens=8)
    assert c.message.content == alone.choices[0].message.content, c.index

# Structured output: the client turns a pydantic model into a strict json_schema format
# and parses the answer back into the model; jsonschema checks it against that schema.
class Shape(pydantic.BaseModel):
    이름: str = pydantic.Field(max_length=12)
    색깔: Literal["빨강", "파랑", "초록", "노랑"]
    개수: int = pydantic.Field(ge=0, le=20)


class Picture(pydantic.BaseModel):
    shapes: list[Shape] = pydantic.Field(max_length=3)
    설명: str = pydantic.Field(max_length=40)


for temperature, seed in [(0, 0), (1.0, 1), (1.0, 2)]:
    parsed = client.chat.completions.parse(model=model, messages=messages, response_format=Picture,
                                           temperature=temperature, seed=seed, max_tokens=400)
    choice = parsed.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Picture), choice.message
    schema = openai.lib._pydantic.to_strict_json_schema(Picture)
    jsonschema.validate(json.loads(choice.message.content), schema)

obj = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=200,
                                     response_format={"type": "json_object"})
if obj.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(obj.choices[0].message.content), dict), obj.choices[0]
else:
    assert obj.choices[0].message.content.startswith("{"), obj.choices[0]

try:
    client.chat.completions.create(model=model, messages=messages, response_format={
        "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
except openai.BadRequestError:
    pass
else:
    raise AssertionError("an invalid schema should be a 400")

try:
    client.chat.completions.create(model=model, messages=[], temperature=0)
except openai.BadRequestError:
    pass
else:
    raise AssertionError("an empty conversation should be a 400")

print("ok")
