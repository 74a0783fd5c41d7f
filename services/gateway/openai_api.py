"""The OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models).

A translation layer and nothing more: each body becomes a GenerateRequest and goes
through GatewayService, the gRPC API's own path, so both APIs share one validation,
one set of limits and one generation. Speculation settings, which OpenAI's API has no
place for, ride in an extension field: ``extra_body={"speculation": {"method": "draft",
"gamma": 6}}``; so do vLLM's sampling extensions (top_k, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids). Knows nothing of Serve.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import InvalidRequest
from ..core.sampling import Penalties, SamplingParams
from ..rpc import outrider_pb2
from .client import make_request
from .service import GatewayService, Overloaded, ReplicaLost

MODEL_NAME = "outrider"


class OpenAIError(Exception):
    """An error in OpenAI's format, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


def error_for(error: Exception) -> OpenAIError:
    """The OpenAI error (and status) for what the gateway raised."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, InvalidRequest):
        return OpenAIError(400, str(error))
    if isinstance(error, Overloaded):
        return OpenAIError(429, str(error), "rate_limit_error")
    if isinstance(error, ReplicaLost):
        return OpenAIError(503, f"the stream lost its verifier replica and could not continue elsewhere: {error}",
                           "service_unavailable")
    return OpenAIError(500, f"internal error: {type(error).__name__}", "internal_error")


class SpeculationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["draft", "ngram", "suffix", "none", "medusa", "mtp", "eagle", "tree"] | None = None  # None: the server's
    gamma: int = Field(0, ge=0)
    adaptive: bool = False
    pipeline: bool | None = None
    tree: str = ""


class _Common(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored, as OpenAI clients send
    some this server has no use for (``user``, ``stream_options`` on non-streams)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # OpenAI's default
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    # vLLM's extensions
    top_k: int = Field(0, ge=-1)  # -1 or 0: off
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    speculation: SpeculationBody | None = None  # Outrider's: how to speculate (unset: the server's default)


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = ""


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


def _parse(cls: type[BaseModel], body: object) -> BaseModel:
    try:
        return cls.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise OpenAIError(400, f"{where}: {first['msg']}", param=where or None) from None


def _request(body: _Common, prompt: str | list[int], logprobs: int | None, max_tokens: int | None) -> outrider_pb2.GenerateRequest:
    """The GenerateRequest for a body: the same message a gRPC client would send (and a
    value out of range fails the same check, with the same reason)."""
    params = SamplingParams(
        temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p, seed=body.seed,
        penalties=Penalties(1.0 if body.repetition_penalty is None else body.repetition_penalty, body.presence_penalty,
                            body.frequency_penalty, tuple(sorted((body.logit_bias or {}).items()))),
    )
    spec = body.speculation or SpeculationBody()
    return make_request(
        prompt, max_tokens or 0, params, spec.method, spec.gamma, spec.adaptive, spec.pipeline, tree=spec.tree,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()), min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        logprobs=logprobs, n=body.n,
    )


class OpenAIFrontend:
    def __init__(self, service: GatewayService, model_name: str = MODEL_NAME):
        self.service = service
        self.tokenizer = service.tokenizer
        self.model_name = model_name

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "outrider"}]}

    def _check_model(self, body: _Common) -> None:
        if body.model != self.model_name:
            raise OpenAIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                              "not_found_error", "model")

    def completion_request(self, raw: object) -> tuple[outrider_pb2.GenerateRequest, CompletionBody]:
        body = _parse(CompletionBody, raw)
        self._check_model(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise OpenAIError(400, "one prompt per request (send a request per prompt, or use n)", param="prompt")
            prompt = prompt[0]
        if body.echo:
            raise OpenAIError(400, "echo is not supported", param="echo")
        return _request(body, prompt, body.logprobs, body.max_tokens), body

    def chat_request(self, raw: object) -> tuple[outrider_pb2.GenerateRequest, ChatBody]:
        body = _parse(ChatBody, raw)
        self._check_model(body)
        if not getattr(self.tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # a template's own checks (roles, alternation) end in its exception
            raise OpenAIError(400, f"the chat template refused these messages: {error}", param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return _request(body, prompt, logprobs, body.max_completion_tokens or body.max_tokens), body

    async def complete(self, req: outrider_pb2.GenerateRequest, chat: bool, client: str = "",
                       on_response=lambda response: None) -> dict:
        response = await self.service.generate_unary(req, client=client)
        on_response(response)
        samples = list(response.samples) or [outrider_pb2.Sample(
            index=0, token_ids=response.token_ids, text=response.text, stats=response.stats,
            logprobs=response.logprobs, top_logprobs=response.top_logprobs)]
        choices = []
        for sample in samples:
            choice = {"index": sample.index, "finish_reason": sample.stats.finish_reason or "length",
                      "logprobs": self._logprobs(sample, chat) if req.HasField("logprobs") else None}
            if chat:
                choice["message"] = {"role": "assistant", "content": sample.text}
            else:
                choice["text"] = sample.text
            choices.append(choice)
        completion = sum(len(s.token_ids) for s in samples)
        return {
            "id": _id(chat), "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": len(response.prompt_token_ids), "completion_tokens": completion,
                      "total_tokens": len(response.prompt_token_ids) + completion},
        }

    async def stream(self, req: outrider_pb2.GenerateRequest, chat: bool, include_usage: bool,
                     client: str = "", on_chunk=lambda chunk: None) -> AsyncIterator[str]:
        """Server-sent events: a chunk per round and sample, then ``data: [DONE]``. The
        first chunk comes from the first round, so that a request refused by validation
        or admission gets an HTTP error, not a stream (see ``first_then``)."""
        ident, created = _id(chat), int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        prompt_tokens, completion_tokens, started = 0, 0, set()
        async with aclosing(self.service.generate(req, client=client)) as chunks:
            async for chunk in chunks:
                on_chunk(chunk)
                choice: dict = {"index": chunk.index, "finish_reason": None}
                if chunk.HasField("stats"):
                    choice["finish_reason"] = chunk.stats.finish_reason or "length"
                    prompt_tokens = len(chunk.prompt_token_ids)
                completion_tokens += len(chunk.token_ids)
                if chat:
                    choice["delta"] = {"content": chunk.text}
                    if chunk.index not in started:
                        choice["delta"]["role"] = "assistant"
                        started.add(chunk.index)
                else:
                    choice["text"] = chunk.text
                choice["logprobs"] = self._logprobs(chunk, chat) if req.HasField("logprobs") and chunk.token_ids else None
                event = {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
                yield f"data: {json.dumps(event)}\n\n"
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            event = {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [], "usage": usage}
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    def _logprobs(self, sample, chat: bool) -> dict:
        """OpenAI's logprobs object for a sample's (or chunk's) tokens."""
        tokens = [self.tokenizer.decode([t]) for t in sample.token_ids]
        tops = [[(self.tokenizer.decode([i]), v) for i, v in zip(top.token_ids, top.logprobs)] for top in sample.top_logprobs]
        tops += [[] for _ in range(len(tokens) - len(tops))]
        if chat:
            return {"content": [
                {"token": token, "logprob": lp, "bytes": list(token.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
                for token, lp, top in zip(tokens, sample.logprobs, tops)]}
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {"tokens": tokens, "token_logprobs": list(sample.logprobs),
                "top_logprobs": [dict(top) for top in tops] if sample.top_logprobs else None, "text_offset": offsets}


async def first_then(events: AsyncIterator[str]) -> tuple[str, AsyncIterator[str]]:
    """The first event of a stream (raising what it raises: a refused request becomes an
    HTTP error before any byte is sent), and the whole stream from it."""
    first = await events.__anext__()

    async def rest() -> AsyncIterator[str]:
        yield first
        try:
            async for event in events:
                yield event
        except Exception as error:  # mid-stream: the status is sent, so say it in the stream
            yield f"data: {json.dumps(error_for(error).body())}\n\n"
        finally:
            await events.aclose()

    return first, rest()


def _text(content) -> str:
    """A message's text: a string, or OpenAI's list of parts (text parts only)."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise OpenAIError(400, f"message parts of type {part.get('type')!r} are not supported: text only",
                              param="messages")
        parts.append(part.get("text", ""))
    return "".join(parts)


def _id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
