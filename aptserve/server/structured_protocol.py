"""The request fields of structured output: OpenAI's `response_format` and vLLM's `structured_outputs`, mapped to
one StructuredOutput (a request may give one constraint)."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aptserve.errors import InvalidRequestError
from aptserve.structured_output import StructuredOutput


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True, populate_by_name=True)


class JsonSchemaFormat(_Model):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Model):
    """vLLM's `structured_outputs` (give one of them)."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def structured_output_of(response_format: ResponseFormat | None,
                         structured_outputs: StructuredOutputsParams | None) -> StructuredOutput | None:
    found = []
    if response_format is not None and response_format.type == "json_object":
        found.append(StructuredOutput("json_object"))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.json_schema is None:
            raise InvalidRequestError("response_format of type json_schema needs json_schema.schema")
        found.append(StructuredOutput("json", json.dumps(response_format.json_schema.json_schema)))
    if structured_outputs is not None:
        given = structured_outputs
        if given.json_schema is not None:
            schema = given.json_schema
            found.append(StructuredOutput("json", schema if isinstance(schema, str) else json.dumps(schema)))
        if given.regex is not None:
            found.append(StructuredOutput("regex", given.regex))
        if given.choice is not None:
            found.append(StructuredOutput.choice(given.choice))
        if given.grammar is not None:
            found.append(StructuredOutput("grammar", given.grammar))
        if given.json_object:
            found.append(StructuredOutput("json_object"))
    if len(found) > 1:
        raise InvalidRequestError("give one structured output constraint: response_format or one of "
                                  "structured_outputs' json, regex, choice, grammar, json_object")
    return found[0] if found else None
