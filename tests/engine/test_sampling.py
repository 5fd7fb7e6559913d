import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckptconv.engine import GREEDY, Sampler, parse_sampler, sample
from ckptconv.errors import EngineError


@pytest.mark.parametrize(
    "text, temperature, want",
    [
        ("greedy", None, Sampler("greedy")),
        ("temperature", 0.5, Sampler("temperature", temperature=0.5)),
        ("topk:40", None, Sampler("topk", k=40)),
        ("TopP:0.9", 0.7, Sampler("topp", temperature=0.7, p=0.9)),
    ],
)
def test_parse_sampler(text, temperature, want):
    got = parse_sampler(text, temperature)
    assert got == want
    assert parse_sampler(got.describe(), temperature) == got


@pytest.mark.parametrize(
    "text, temperature, match",
    [
        ("beam", None, "malformed sampler"),
        ("topk", None, "malformed sampler"),
        ("topk:x", None, "not a number"),
        ("topk:0", None, "k >= 1"),
        ("topp:1.5", None, "0 < p <= 1"),
        ("temperature", 0.0, "positive"),
        ("greedy", 0.5, "no effect"),
    ],
)
def test_parse_sampler_errors(text, temperature, match):
    with pytest.raises(EngineError, match=match):
        parse_sampler(text, temperature)


def _rows(n=512):
    # every row the same distribution over 8 tokens, most likely first
    logits = jnp.log(jnp.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005]))
    return jnp.broadcast_to(logits, (n, 8))


def test_greedy_is_argmax():
    logits = jnp.array([[0.0, 3.0, 1.0], [5.0, -1.0, 2.0]])
    assert sample(logits, GREEDY, jax.random.key(0)).tolist() == [1, 0]


@pytest.mark.parametrize(
    "sampler, allowed",
    [
        (Sampler("temperature"), set(range(8))),
        (Sampler("topk", k=3), {0, 1, 2}),
        (Sampler("topp", p=0.6), {0, 1}),  # 0.4 < 0.6 <= 0.65: two tokens
        (Sampler("topp", p=0.1), {0}),  # the most likely token is always kept
    ],
)
def test_samplers_draw_from_their_support(sampler, allowed):
    tokens = np.asarray(sample(_rows(), sampler, jax.random.key(1)))
    assert set(tokens.tolist()) == allowed


def test_same_key_same_tokens_other_key_differs():
    sampler = Sampler("topk", k=6, temperature=2.0)
    a = sample(_rows(64), sampler, jax.random.key(7))
    b = sample(_rows(64), sampler, jax.random.key(7))
    c = sample(_rows(64), sampler, jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_rows_draw_ignores_the_other_rows():
    sampler = Sampler("temperature")
    rows = _rows(4)
    alone = sample(rows[:1], sampler, jax.random.key(3))
    together = sample(rows.at[1:].set(0.0), sampler, jax.random.key(3))
    assert int(alone[0]) == int(together[0])
