import numpy as np
import pytest
import torch

from services.core.sampling import SamplingParams, SamplingRows, adjusted_probs, adjusted_probs_rows, keyed_generator


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent numpy statement of temperature -> top-k -> top-p."""
    if temperature == 0:
        out = np.zeros_like(logits)
        out[np.argmax(logits)] = 1
        return out
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.ones_like(z, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    probs = np.exp(z - z.max()) * keep
    probs /= probs.sum()
    if top_p < 1:
        mass_before = 0.0
        for idx in order:
            if not keep[idx]:
                continue
            if mass_before >= top_p:
                keep[idx] = False
            mass_before += probs[idx]
        probs = np.exp(z - z.max()) * keep
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.5, 7, 0.6), (1.3, 1, 1.0)],
)
def test_adjusted_probs_match_reference(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(32, generator=gen, dtype=torch.float64) * 3
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        got = adjusted_probs(logits, params).double().numpy()
        want = reference_probs(logits.numpy(), temperature, top_k, top_p)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_adjusted_probs_batched_rows_are_independent():
    logits = torch.randn(4, 3, 50)
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
    batched = adjusted_probs(logits, params)
    for i in range(4):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], adjusted_probs(logits[i, j], params))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_keyed_streams_repeat_and_keys_differ():
    a, b = keyed_generator(7, "verify:3"), keyed_generator(7, "verify:3")
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    c, d = keyed_generator(7, "verify:4"), keyed_generator(7, "draft@3")
    assert not torch.equal(torch.rand(5, generator=c), torch.rand(5, generator=d))


def test_a_tiny_temperature_is_almost_greedy_not_nan():
    logits = torch.randn(3, 151_936)
    probs = adjusted_probs(logits, SamplingParams(temperature=1e-38))
    assert torch.isfinite(probs).all()
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.allclose(probs.max(-1).values, torch.ones(3))


def test_rows_with_their_own_params_match_the_reference():
    """One batch, a different temperature/top-k/top-p per row (top-k and top-p-only rows
    take different paths inside); each row equals the numpy reference."""
    configs = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8), (0.5, 7, 0.6), (1.3, 1, 1.0)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in configs]
    logits = torch.randn(len(configs), 4, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    for subset in (params, params[:3]):  # with and without a top-p-only row (full sort)
        got = adjusted_probs_rows(logits[: len(subset)], SamplingRows.of(subset, 32, "cpu")).double().numpy()
        for b, (t, k, p) in enumerate(configs[: len(subset)]):
            for j in range(4):
                np.testing.assert_allclose(got[b, j], reference_probs(logits[b, j].numpy(), t, k, p), atol=1e-6)


def test_consuming_the_logits_gives_the_same_bits_and_sparing_them_changes_nothing():
    """Acceptance computes p over the logits in place (``consume``); anyone else gets a
    copy. Both give the same bits, whatever the row: greedy, tiny temperature, top-k,
    top-p, plain."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, 1000, generator=gen) * 4
    params = [SamplingParams(), SamplingParams(temperature=1e-30, seed=1), SamplingParams(temperature=0.7, top_k=20, seed=2),
              SamplingParams(temperature=1.3, top_p=0.8, seed=3), SamplingParams(temperature=1.0, seed=4)]
    rows = SamplingRows.of(params, 1000, "cpu")
    before = logits.clone()
    spared = adjusted_probs_rows(logits, rows)
    assert torch.equal(logits, before)
    consumed = adjusted_probs_rows(logits, rows, consume=True)
    assert consumed.data_ptr() == logits.data_ptr() and torch.equal(consumed, spared)
    assert torch.equal(spared[0], torch.nn.functional.one_hot(before[0].argmax(-1), 1000).float())
    assert torch.equal(spared[1], adjusted_probs(before[1], params[1]))  # the argmax's, no NaN
    assert torch.equal(spared[1].argmax(-1), before[1].argmax(-1)) and not spared[1].isnan().any()
    for b in range(2, 5):
        p = params[b]
        want = np.stack([reference_probs(row.double().numpy(), p.temperature, p.top_k, p.top_p) for row in before[b]])
        np.testing.assert_allclose(spared[b].numpy(), want, atol=1e-6)
