import numpy as np
import pytest
import torch

from services.core.sampling import SamplingParams, adjusted_probs


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


def test_seeded_generators_repeat_and_streams_differ():
    draft_a, verify_a = SamplingParams(temperature=1.0, seed=7).make_generators()
    draft_b, verify_b = SamplingParams(temperature=1.0, seed=7).make_generators()
    assert torch.equal(torch.rand(5, generator=draft_a), torch.rand(5, generator=draft_b))
    assert torch.equal(torch.rand(5, generator=verify_a), torch.rand(5, generator=verify_b))
    draft_c, verify_c = SamplingParams(temperature=1.0, seed=7).make_generators()
    assert not torch.equal(torch.rand(5, generator=draft_c), torch.rand(5, generator=verify_c))
