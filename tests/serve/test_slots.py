"""The per-slot backend interface under continuous batching: prompts of different shapes join a KV
pool at different steps, decode together at different lengths, leave and are replaced, and each
one's greedy tokens and logits are those of the same prompt run alone."""

from __future__ import annotations

import numpy as np
import pytest
from prompts import CASES, make_inputs, rel_err

from slimm.backends.base import normalize_inputs
from slimm.errors import InputError

NEW = 6  # tokens per prompt
# (case, seed, step at which it arrives); five prompts through three slots: the fourth and fifth take
# slots the first ones freed, so a reused row's old entries must not leak into the new prompt
ARRIVALS = [("image", 1, 0), ("two_images", 2, 2), ("text", 3, 2), ("video", 4, 3), ("text", 5, 4)]


@pytest.fixture(scope="module", params=["torch", "onnx"])
def backend(request, demo_dir, exported):
    import slimm

    if request.param == "onnx":
        pytest.importorskip("onnxruntime")
        return slimm.load(exported("plain"), backend="onnx")
    return slimm.load(demo_dir("plain"), backend="torch")


def prompts(cfg):
    return [normalize_inputs(make_inputs(cfg, CASES[case], seed=seed), cfg) for case, seed, _ in ARRIVALS]


def alone(backend, inputs):
    kw = {"max_new_tokens": NEW, "eos_token_id": [], "return_dict_in_generate": True, "output_logits": True}
    out = backend.generate(**inputs, **kw)
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), [x[0] for x in out.logits]


def batched(backend, inputs: list[dict], n_slots: int = 3, cap: int | None = None):
    """Greedy decoding of every prompt through `n_slots` slots of `cap` positions (default: just
    enough); joins at its arrival step into the lowest free slot, leaves after NEW tokens."""
    cap = cap or max(x["input_ids"].shape[1] for x in inputs) + NEW
    backend.open_slots(n_slots, cap)
    running: dict[int, tuple[int, list, list]] = {}  # slot -> (prompt index, tokens, logits)
    waiting, done, step, sizes = list(range(len(inputs))), {}, 0, set()
    while waiting or running:
        assert step < 100
        for i in [i for i in waiting if ARRIVALS[i][2] <= step]:
            free = [s for s in range(n_slots) if s not in running]
            if not free:
                break
            logits = backend.prefill_slot(free[0], inputs[i])
            running[free[0]] = (i, [int(logits.argmax())], [logits])
            waiting.remove(i)
        for slot, (i, toks, logits) in list(running.items()):
            if len(toks) == NEW:
                done[i] = (toks, logits)
                backend.free_slot(slot)
                del running[slot]
        if running:
            slots = sorted(running)
            sizes.add(len(slots))
            out = backend.decode_slots(slots, np.array([running[s][1][-1] for s in slots]))
            for row, s in zip(out, slots, strict=True):
                running[s][1].append(int(row.argmax()))
                running[s][2].append(row)
        step += 1
    assert sizes >= {1, 2, 3}, sizes  # the schedule really decoded several slots together
    return [done[i] for i in range(len(inputs))]


@pytest.mark.parametrize("pool", ["tight", "serving"])
def test_slots_decode_like_each_prompt_alone(backend, pool):
    """`serving`: slots of the model's whole length (up to 2048), as a server's pool gives each slot
    the export's maximum sequence length; a step then reads only the first positions its rows use
    (past_length)."""
    from slimm.generate import position_limit

    inputs = prompts(backend.config)
    got = batched(backend, inputs, cap=min(2048, position_limit(backend)) if pool == "serving" else None)
    for (case, seed, _), x, (toks, logits) in zip(ARRIVALS, inputs, got, strict=True):
        ref_toks, ref_logits = alone(backend, x)
        assert toks == ref_toks, f"{backend.name} {case} seed {seed}"
        err = max(rel_err(a, b) for a, b in zip(logits, ref_logits, strict=True))
        assert err < 1e-4, f"{backend.name} {case}: logits relative error {err:.2e}"


def test_batch_api_still_runs_after_slots(backend):
    x = prompts(backend.config)[0]
    first = alone(backend, x)[0]
    backend.open_slots(2, 64)
    backend.prefill_slot(1, x)
    assert alone(backend, x)[0] == first


def test_bad_slot_use_is_refused(backend):
    x = prompts(backend.config)[2]
    backend.open_slots(2, 32)
    with pytest.raises(InputError, match=r"slot 2 does not exist; slots are 0..1"):
        backend.prefill_slot(2, x)
    with pytest.raises(InputError, match=r"slot\(s\) \[0\] hold no prompt"):
        backend.decode_slots([0], np.array([5]))
    backend.prefill_slot(0, x)
    with pytest.raises(InputError, match="must be distinct"):
        backend.decode_slots([0, 0], np.array([5, 5]))
    with pytest.raises(InputError, match="one token per slot"):
        backend.decode_slots([0], np.array([5, 6]))
    while backend.slots.lengths[0] < 32:
        backend.decode_slots([0], np.array([5]))
    with pytest.raises(InputError, match=r"slot\(s\) \[0\] is full \(32 positions\)"):
        backend.decode_slots([0], np.array([5]))
    backend.free_slot(0)
    with pytest.raises(InputError, match="hold no prompt"):
        backend.decode_slots([0], np.array([5]))
    with pytest.raises(InputError, match="a slot holds 4 positions"):
        backend.open_slots(1, 4)
        backend.prefill_slot(0, x)
    with pytest.raises(InputError, match="this model holds 1.."):
        backend.open_slots(1, 10**7)


def test_a_step_reads_the_positions_its_rows_use(exported):
    """past_length: the positions part F reads for rows holding `needed` entries, a power of two from
    64 that covers them, or the whole pool (a view, no copy) where that is at most twice as much."""
    import slimm

    pytest.importorskip("onnxruntime")
    backend = slimm.load(exported("plain"), backend="onnx")
    backend.open_slots(2, 256)
    got = {needed: backend.past_length(needed) for needed in (0, 1, 64, 65, 128, 129, 256)}
    assert got == {0: 64, 1: 64, 64: 64, 65: 128, 128: 128, 129: 256, 256: 256}
    backend.open_slots(2, 100)
    assert backend.past_length(0) == 100  # 64 is more than half of 100: the whole pool
