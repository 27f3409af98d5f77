"""The request bodies the API accepts, checked by pydantic; every mistake names its field.

Fields OpenAI defines that we cannot honour (tools, logprobs, penalties, ...) are refused with a 400
naming them when set to anything but their neutral value, rather than silently ignored; fields we
do not know at all (`user`, `metadata`, vendor extensions) are ignored, as OpenAI's SDKs send them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from blockswarm.api.errors import APIError, bad_field

MAX_N = 16  # choices per request
MAX_STOPS = 4  # as OpenAI
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (the CLI's is 0, greedy)
# field -> the values that ask for nothing we lack
NEUTRAL = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}), "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _supported(self):
        for name, value in (self.model_extra or {}).items():
            if name in NEUTRAL and value not in NEUTRAL[name]:
                raise bad_field(name, f"{name} is not supported by this server; leave it out")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def parse(model: type[BaseModel], body: bytes):
    """The request, or a 400 that names the first bad field (`messages[0].role`)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {error['msg']}", code="invalid_json") from None
        if error["type"] == "model_type":
            raise APIError(400, "the body must be a JSON object", code="invalid_json") from None
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, APIError):
            raise cause from None
        param = _param(error["loc"])
        raise bad_field(param, f"{param}: {error['msg']}") from None


def _param(loc: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"; pydantic's union branches ("str") are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[TextPart]") or "[" in str(part) and "]" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out
