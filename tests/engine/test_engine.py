import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckptconv.engine import GREEDY, Engine, ResultTokens, Sampler, decode, prefill_buckets
from ckptconv.errors import EngineError
from ckptconv.models import linen
from ckptconv.sharding import make_mesh

# jax.monitoring event names (jax/_src/dispatch.py): a backend compile, a jaxpr trace.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


def _prompt(rng, n, vocab):
    return rng.integers(1, vocab, size=n).astype(np.int32)


@pytest.fixture(scope="module")
def full_forward(tiny_config):
    """Logits of a full (train-mode) Linen forward pass over padded sequences, jitted once."""
    model = linen.Transformer(tiny_config)
    fn = jax.jit(lambda p, t, pos: model.apply({"params": p}, t, pos))
    length = 32

    def run(params, sequences):
        tokens = np.zeros((len(sequences), length), np.int32)
        for row, seq in enumerate(sequences):
            tokens[row, : len(seq)] = seq
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
        return np.asarray(fn(params, tokens, positions))

    return run


def test_prefill_buckets():
    assert prefill_buckets(16) == (8, 16)
    assert prefill_buckets(64) == (8, 16, 32, 64)
    assert prefill_buckets(48) == (8, 16, 32, 48)
    assert prefill_buckets(4) == (4,)


def test_result_tokens_slots():
    r = ResultTokens(np.array([[7, 1, 1], [3, 0, 0], [9, 1, 4]], np.int32))
    slot = r.get_result_at_slot(2)
    assert slot.tokens.tolist() == [[9]]
    assert slot.valid.tolist() == [[1]]
    assert slot.lengths.tolist() == [4]
    assert isinstance(r.convert_to_numpy().data, np.ndarray)


@pytest.mark.parametrize(
    "mesh_spec", [None, "data=2,tensor=4", "data=8,tensor=1"], ids=["1dev", "2x4", "8x1"]
)
def test_continuous_batching_matches_full_forward(
    mesh_spec, tiny_config, tiny_params, engine1, full_forward
):
    if mesh_spec is None:
        engine = engine1
    else:
        engine = Engine(tiny_config, mesh=make_mesh(mesh_spec), max_concurrent_decodes=4)
    params = engine.load_params(tiny_params)
    want_shardings = jax.tree.leaves(engine.param_shardings)
    assert [a.sharding for a in jax.tree.leaves(params)] == want_shardings
    if mesh_spec == "data=2,tensor=4":
        # heads, mlp and vocab split 4 ways; 2 KV heads cannot be: replicated, and reported
        assert any(not s.is_fully_replicated for s in want_shardings)
        assert {f.size for f in engine.fallbacks} == {2}

    rng = np.random.default_rng(0)
    vocab = tiny_config.vocab_size
    prompts = {0: _prompt(rng, 3, vocab), 1: _prompt(rng, 9, vocab), 2: _prompt(rng, 5, vocab)}
    prompts[3] = _prompt(rng, 14, vocab)
    sequences, lengths = {}, {}
    state = engine.init_decode_state()

    def start(slot, prompt):
        nonlocal state
        padded, n = engine.pad_tokens(prompt)
        prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=n)
        state = engine.insert(prefix, state, slot)
        first = first.get_result_at_slot(0)
        assert first.valid.tolist() == [[1]] and first.lengths.tolist() == [1]
        sequences[slot] = list(prompt) + [int(first.tokens[0, 0])]
        lengths[slot] = n

    def check(active):
        # each slot's last logits = full forward over its sequence up to the token fed last
        want = full_forward(tiny_params, [sequences[s][:-1] for s in range(4)])
        got = np.asarray(state.logits)
        for s in active:
            at = len(sequences[s]) - 2
            np.testing.assert_allclose(got[s], want[s, at], atol=1e-5, rtol=0)
            assert int(np.argmax(want[s, at])) == sequences[s][-1]

    for slot, prompt in prompts.items():
        start(slot, prompt)
    check(range(4))
    for step in range(8):
        active = [0, 2, 3] if step == 4 else range(4)
        if step == 4:
            state = engine.free_slot(state, 1)
        if step == 5:
            start(1, _prompt(rng, 6, vocab))  # refill while the others keep decoding
        state, result = engine.generate(params, state)
        result = result.convert_to_numpy()
        for s in range(4):
            slot = result.get_result_at_slot(s)
            assert slot.valid.tolist() == [[int(s in active)]]
            if s in active:
                sequences[s].append(int(slot.tokens[0, 0]))
                assert slot.lengths.tolist() == [len(sequences[s]) - lengths[s]]
        check(active)
    positions = np.asarray(state.positions)
    assert positions.tolist() == [len(sequences[s]) - 1 for s in range(4)]
    cache_shardings = [a.sharding for a in jax.tree.leaves(state.cache)]
    assert cache_shardings == jax.tree.leaves(engine._state_shardings.cache)


def test_no_recompilation_after_warmup(engine1, params1, tiny_config):
    topk = Sampler("topk", k=5)
    engine1.warmup(params1, samplers=(GREEDY, topk))
    rng = np.random.default_rng(1)
    keys = [jax.random.key(i) for i in range(21)]

    def run(steps, lengths):
        state = engine1.init_decode_state()
        prompts = [engine1.pad_tokens(_prompt(rng, n, tiny_config.vocab_size)) for n in lengths]
        for slot, (padded, n) in enumerate(prompts[:4]):
            prefix, _ = engine1.prefill(params=params1, padded_tokens=padded, true_length=n)
            state = engine1.insert(prefix, state, slot)
        for step in range(steps):
            state, result = engine1.generate(params1, state, sampler=topk, rng=keys[step])
            if step == steps // 2:  # a new prompt in a bucket seen before
                state = engine1.free_slot(state, 2)
                padded, n = prompts[4]
                prefix, _ = engine1.prefill(
                    params=params1, padded_tokens=padded, true_length=n, sampler=topk, rng=keys[-1]
                )
                state = engine1.insert(prefix, state, 2)
            np.asarray(result.data)
        return state

    run(2, [3, 9, 16, 1, 12])  # warms the host-side glue too
    before = engine1.compile_counts()
    events = []

    def listen(event, duration, **kwargs):
        if event in (COMPILE_EVENT, TRACE_EVENT):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.jit(lambda x: x * 3)(np.float32(1))  # the listener does see a compilation
        assert COMPILE_EVENT in events and TRACE_EVENT in events
        events.clear()
        jax.block_until_ready(run(20, [5, 11, 2, 15, 7]).logits)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert events == []
    assert engine1.compile_counts() == before
    assert before["prefill"] >= 2 * len(engine1.prefill_buckets)  # per bucket and sampler


@pytest.mark.parametrize(
    "sampler",
    [Sampler("temperature", temperature=1.5), Sampler("topk", k=8), Sampler("topp", p=0.95)],
    ids=["temperature", "topk", "topp"],
)
def test_same_seed_same_tokens(engine1, params1, sampler):
    prompt = [5, 9, 13, 2]
    a = decode(engine1, params1, prompt, max_new_tokens=10, sampler=sampler, seed=1)
    b = decode(engine1, params1, prompt, max_new_tokens=10, sampler=sampler, seed=1)
    c = decode(engine1, params1, prompt, max_new_tokens=10, sampler=sampler, seed=2)
    assert a.generated_ids == b.generated_ids
    np.testing.assert_array_equal(a.logits, b.logits)
    assert a.generated_ids != c.generated_ids


def test_slot_without_room_turns_invalid(tiny_config, make_linen_params):
    config = tiny_config.replace(max_prefill_predict_length=8, max_target_length=11)
    engine = Engine(config, max_concurrent_decodes=1)
    assert engine.max_decode_steps == 3
    params = engine.load_params(make_linen_params(config, seed=3))
    prefix, _ = engine.prefill(params=params, padded_tokens=[1, 2, 3], true_length=3)
    state = engine.insert(prefix, engine.init_decode_state(), 0)
    valid, lengths = [], []
    for _ in range(5):
        donated = state
        state, result = engine.generate(params, state)
        assert all(a.is_deleted() for a in jax.tree.leaves(donated))
        slot = result.get_result_at_slot(0)
        valid.append(int(slot.valid[0, 0]))
        lengths.append(int(slot.lengths[0]))
    assert valid == [1, 1, 1, 0, 0]
    assert lengths == [2, 3, 4, 4, 4]
    assert int(state.positions[0]) == 6


def test_input_errors(engine1, params1):
    with pytest.raises(EngineError, match="exceeds max_prefill_predict_length=16"):
        engine1.pad_tokens(list(range(17)))
    with pytest.raises(EngineError, match=r"token id 64 is outside the vocabulary \[0, 64\)"):
        engine1.pad_tokens([1, 64])
    with pytest.raises(EngineError, match="empty"):
        engine1.pad_tokens([])
    with pytest.raises(EngineError, match="true_length 5 is outside"):
        engine1.prefill(params=params1, padded_tokens=np.zeros(4, np.int32), true_length=5)
    with pytest.raises(EngineError, match="needs an rng key"):
        engine1.prefill(
            params=params1, padded_tokens=[1, 2], true_length=2, sampler=Sampler("topk", k=2)
        )
    with pytest.raises(EngineError, match="existing_prefix"):
        engine1.prefill(params=params1, padded_tokens=[1], true_length=1, existing_prefix=object())
    state = engine1.init_decode_state()
    with pytest.raises(EngineError, match=r"slot 4 is outside \[0, 4\)"):
        engine1.free_slot(state, 4)
    with pytest.raises(EngineError, match="max-new-tokens 26"):
        decode(engine1, params1, [1, 2], max_new_tokens=26)
    with pytest.raises(EngineError, match="positive"):
        Engine(engine1.config, max_concurrent_decodes=0)
    assert jnp.asarray(state.active).tolist() == [False] * 4
