"""The generation API served for real, on both APIs: stops, logprobs, penalties and n
over gRPC, and the official `openai` client against the OpenAI-compatible HTTP API of
the same app, on a local multi-node cluster with the bundled pair."""

from dataclasses import replace

import grpc
import numpy as np
import openai
import pytest

from serving_cluster import serving_cluster
from services.core.gamma import GammaSchedule
from services.core.sampling import sample_seed, Penalties, SamplingParams, StopRule
from services.gateway.client import make_request
from services.models.loading import bundled_paths
from services.models.pair import load_pair, make_engine

PROMPT = "def parse_args(argv):"


@pytest.fixture(scope="module")
def server():
    with serving_cluster({"max_sessions": 16}) as (client, _):
        yield client


@pytest.fixture(scope="module")
def pair():
    return load_pair(bundled_paths(), with_draft=False)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=120)


def stream(client, request):
    chunks = list(client.generate(request, timeout=120))
    return [t for c in chunks for t in c.token_ids], chunks


def reference(pair, n: int, params: SamplingParams = SamplingParams()) -> list[int]:
    ids = pair.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    eos = pair.tokenizer.eos_token_id
    params = params if params.stop else replace(params, stop=StopRule((eos,)))
    return make_engine(pair, "none", GammaSchedule(initial=0)).generate(ids, n, params).token_ids


def test_a_stop_string_split_across_tokens_ends_the_output_at_its_token(server, pair):
    ref = reference(pair, 48)
    text = pair.tokenizer.decode(ref)
    # A stop spanning a token boundary late in the output (it may land mid-round).
    cut = [len(pair.tokenizer.decode(ref[:k])) for k in range(1, len(ref) + 1)]
    k = next(k for k in range(10, len(ref)) if cut[k] - cut[k - 1] >= 2 and text[cut[k - 1] - 2 : cut[k - 1] + 2].strip())
    stop = text[cut[k - 1] - 2 : cut[k - 1] + 2]
    first = text.index(stop)
    want = next(j for j in range(1, len(ref) + 1) if len(pair.tokenizer.decode(ref[:j])) >= first + len(stop))
    for method in ("draft", "ngram", "none"):
        tokens, chunks = stream(server, make_request(PROMPT, 48, method=method, gamma=6, stop=("zzzz-never", stop)))
        assert tokens == ref[:want], method
        assert "".join(c.text for c in chunks) == text[:first]
        stats = chunks[-1].stats
        assert (stats.finish_reason, stats.stop_sequence, stats.HasField("stop_token_id")) == ("stop", stop, False)


def test_a_stop_in_the_prompt_does_not_count(server, pair):
    ref = reference(pair, 16)
    assert "parse" not in pair.tokenizer.decode(ref)
    tokens, chunks = stream(server, make_request(PROMPT, 16, gamma=4, stop=("parse",)))
    assert tokens == ref and chunks[-1].stats.finish_reason == "length"


def test_a_stop_token_inside_a_block_ends_the_output_with_it(server, pair):
    ref = reference(pair, 40)
    stop = next(t for i, t in enumerate(ref) if i >= 5 and t not in ref[:i])
    tokens, chunks = stream(server, make_request(PROMPT, 40, gamma=8, stop_token_ids=(stop,)))
    assert tokens == ref[: ref.index(stop) + 1]
    assert chunks[-1].stats.finish_reason == "stop" and chunks[-1].stats.stop_token_id == stop


def test_logprobs_and_penalties_are_the_same_speculative_or_not(server, pair):
    params = SamplingParams(penalties=Penalties(repetition=1.3, presence=0.2, logit_bias=((5, 2.0),)))
    want = reference(pair, 32, params)
    got = {}
    for method in ("draft", "ngram", "none"):
        tokens, chunks = stream(server, make_request(PROMPT, 32, params, method=method, gamma=6, logprobs=3))
        lps = [lp for c in chunks for lp in c.logprobs]
        tops = [list(t.token_ids) for c in chunks for t in c.top_logprobs]
        assert tokens == want, method
        assert len(lps) == len(tops) == 32 and all(top[0] == t for top, t in zip(tops, tokens))  # greedy: the top one
        got[method] = lps
    np.testing.assert_allclose(got["draft"], got["none"], atol=1e-5)
    np.testing.assert_allclose(got["ngram"], got["none"], atol=1e-5)


def test_n_samples_are_independent_and_reproducible(server):
    request = make_request(PROMPT, 16, SamplingParams(temperature=1.0, seed=11), gamma=4, n=3)
    first = server.generate_unary(request, timeout=120)
    again = server.generate_unary(request, timeout=120)
    texts = [s.text for s in first.samples]
    assert [s.index for s in first.samples] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [s.text for s in again.samples] and first.text == texts[0]
    _, chunks = stream(server, request)
    streamed = {i: "".join(c.text for c in chunks if c.index == i) for i in range(3)}
    assert list(streamed.values()) == texts
    # Sample i is the request alone with sample i's seed: what `outrider generate --n` sends.
    for i in (1, 2):
        alone = make_request(PROMPT, 16, SamplingParams(temperature=1.0, seed=sample_seed(11, i)), gamma=4)
        assert server.generate_unary(alone, timeout=120).text == texts[i]
    # The others start from the lead's prompt blocks (64 tokens each) in the prefix cache.
    long = make_request(PROMPT + " x = 1\n" * 40, 8, SamplingParams(temperature=1.0, seed=3), gamma=4, n=3)
    cached = [s.stats.cached_prefix_tokens for s in server.generate_unary(long, timeout=120).samples]
    assert cached[1] >= 64 and cached[2] >= 64


BAD = [
    ("logprobs over 20", make_request(PROMPT, 8, logprobs=21), "logprobs"),
    ("too many stops", make_request(PROMPT, 8, stop=tuple(str(i) for i in range(17))), "stop sequences"),
    ("presence penalty out of range", make_request(PROMPT, 8, SamplingParams(penalties=Penalties(presence=2.0))), None),
    ("stop token outside the vocabulary", make_request(PROMPT, 8, stop_token_ids=(10**7,)), "outside the vocabulary"),
    ("n over the limit", make_request(PROMPT, 8, n=99), "n must be"),
    ("min_tokens over max_new_tokens", make_request(PROMPT, 8, min_tokens=9), "min_tokens"),
]


@pytest.mark.parametrize("name,request_,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_generation_options_are_invalid_argument(server, name, request_, reason):
    if reason is None:  # a value the client-side dataclass refuses: set it on the message
        request_.sampling.presence_penalty, reason = 2.5, "presence_penalty"
    with pytest.raises(grpc.RpcError) as err:
        stream(server, request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details()


SPEC = {"speculation": {"method": "draft", "gamma": 6}}


def test_openai_completions_equal_the_grpc_api(server, oai):
    assert [m.id for m in oai.models.list().data] == ["outrider"]
    grpc_text = server.generate_unary(make_request(PROMPT, 24, gamma=6), timeout=120).text
    reply = oai.completions.create(model="outrider", prompt=PROMPT, max_tokens=24, temperature=0, extra_body=SPEC)
    assert reply.choices[0].text == grpc_text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 24 and reply.usage.prompt_tokens > 0
    parts = oai.completions.create(model="outrider", prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                   stream_options={"include_usage": True}, extra_body=SPEC)
    events = list(parts)
    assert "".join(e.choices[0].text for e in events if e.choices) == grpc_text
    assert events[-1].usage.completion_tokens == 24


def test_openai_chat_streams_and_not(oai, pair):
    messages = [{"role": "user", "content": "write a function that parses arguments"}]
    reply = oai.chat.completions.create(model="outrider", messages=messages, max_tokens=20, temperature=0)
    streamed = oai.chat.completions.create(model="outrider", messages=messages, max_tokens=20, temperature=0, stream=True)
    text = "".join(e.choices[0].delta.content or "" for e in streamed if e.choices)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == text != ""
    prompt = pair.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert reply.usage.prompt_tokens == len(pair.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_openai_stop_logprobs_n_and_seed(oai):
    plain = oai.completions.create(model="outrider", prompt=PROMPT, max_tokens=32, temperature=0).choices[0].text
    stop = plain[10:13]
    stopped = oai.completions.create(model="outrider", prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop],
                                     logprobs=2)
    choice = stopped.choices[0]
    assert choice.text == plain[: plain.index(stop)] and choice.finish_reason == "stop"
    assert len(choice.logprobs.token_logprobs) == stopped.usage.completion_tokens
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    sampled = [oai.completions.create(model="outrider", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=5, n=2)
               for _ in range(2)]
    texts = [[c.text for c in reply.choices] for reply in sampled]
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]
    chat = oai.chat.completions.create(model="outrider", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


def test_openai_errors_are_openai_format_and_the_app_keeps_serving(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="outrider", prompt="", max_tokens=8)
    assert "prompt is empty" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="outrider", prompt=PROMPT, max_tokens=8, top_p=0)
    assert "top_p" in err.value.message
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="outrider", prompt=PROMPT, max_tokens=8, stream=True, logprobs=50)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=8)
    ok = oai.completions.create(model="outrider", prompt=PROMPT, max_tokens=8, temperature=0)
    assert ok.usage.completion_tokens == 8
