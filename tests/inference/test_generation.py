"""Llama.generate / text_completion / chat_completion / stream on tiny random-weight models:
against HF transformers' generate, against Meta's algorithm, and against each prompt alone."""

import pytest
import torch

from annotated_llama import Tokenizer
from annotated_llama.inference.generation import Llama
from annotated_llama.inference.streaming import IncrementalDecoder, StopStringHolder, decode_continuation

import fixtures
from fixtures import meta_generate




@pytest.fixture(scope="module")
def spm(spm_path):
    return Tokenizer(spm_path)


def tiny_model(seed=0, **overrides):
    return fixtures.tiny_model(seed, norm_noise=0.1, sharpen=4, **{"n_kv_heads": 2, **overrides})


@pytest.fixture(scope="module")
def llama(spm):
    return Llama(tiny_model(), spm)


def prompts_of_lengths(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 32000, (n - 1,), generator=g).tolist() for n in lengths]


# ---- parity with HF transformers ----------------------------------------------------------------------

def test_greedy_tokens_and_logprobs_match_hf_generate(llama):
    transformers = pytest.importorskip("transformers")
    from annotated_llama.weights.hf import meta_to_hf_state_dict
    args = llama.model.params
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_hf_config())).float().eval()
    hf.load_state_dict(meta_to_hf_state_dict(llama.model.state_dict(), args))
    prompt = prompts_of_lengths([11])[0]
    n = 40
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    hf_tokens = out.sequences[0, len(prompt):].tolist()
    hf_logprobs = [float(torch.log_softmax(step[0], -1)[t]) for step, t in zip(out.logits, hf_tokens)]
    assert len(hf_tokens) == n
    ours = llama.generate([prompt], n, temperature=0, logprobs=True, ignore_eos=True)
    meta = meta_generate(llama.model, llama.tokenizer, [prompt], n, temperature=0, logprobs=True, ignore_eos=True)
    for mode, (tokens, logprobs) in (("engine", ours), ("meta", meta[:2])):
        assert tokens[0] == hf_tokens, mode
        err = max(abs(a - b) for a, b in zip(logprobs[0], hf_logprobs))
        print(f"{mode}: 40 greedy tokens equal HF; max logprob error {err:.1e}")
        assert err < 1e-4, (mode, err)


# ---- ragged batches -----------------------------------------------------------------------------------

def test_ragged_batch_equals_each_prompt_alone_with_fewer_forward_calls(spm):
    llama = Llama(tiny_model(1), spm)
    prompts = prompts_of_lengths([3, 30, 7, 12, 5, 21, 9, 26])  # lengths differ 10x
    n = 16
    solo = [llama.generate([p], n, temperature=0, ignore_eos=True)[0][0] for p in prompts]
    before = llama.forward_calls
    batch = llama.generate(prompts, n, temperature=0, ignore_eos=True)[0]
    batched_calls = llama.forward_calls - before
    assert batch == solo
    meta, _, meta_calls = meta_generate(llama.model, llama.tokenizer, prompts, n, temperature=0, ignore_eos=True)
    assert meta == solo
    print(f"forward calls for 8 ragged prompts x {n} tokens: batched {batched_calls}, Meta {meta_calls}")
    assert batched_calls == n  # one prefill + n-1 decode steps
    assert meta_calls == (30 - 3) + n
    assert batched_calls < len(prompts) * n


def test_rows_that_stop_leave_the_batch(spm):
    llama = Llama(tiny_model(2), spm)
    prompts = prompts_of_lengths([4, 19, 8, 13], seed=3)
    full = llama.generate(prompts, 12, temperature=0, ignore_eos=True)[0]
    stop_tok = full[2][5]  # make a token row 2 emits mid-way a stop id
    llama.tokenizer = Tokenizer(spm.path)
    llama.tokenizer.stop_ids = {stop_tok}
    solo = [llama.generate([p], 12, temperature=0)[0][0] for p in prompts]
    assert len(solo[2]) <= 5 and solo[2] == full[2][:full[2].index(stop_tok)]
    assert llama.generate(prompts, 12, temperature=0)[0] == solo
    assert meta_generate(llama.model, llama.tokenizer, prompts, 12, temperature=0)[0] == solo


def test_echo_and_logprobs_agree_with_metas_loop(llama):
    prompts = prompts_of_lengths([6, 14], seed=4)
    a_tok, a_lp = llama.generate(prompts, 8, temperature=0, logprobs=True, echo=True, ignore_eos=True)
    b_tok, b_lp, _ = meta_generate(llama.model, llama.tokenizer, prompts, 8, temperature=0, logprobs=True, echo=True,
                                   ignore_eos=True)
    assert a_tok == b_tok and a_tok[0][:6] == prompts[0] and len(a_tok[1]) == 14 + 8
    for x, y in zip(a_lp, b_lp):
        assert len(x) == len(y) and max(abs(u - v) for u, v in zip(x, y)) < 1e-4


def test_chunked_prefill_gives_the_same_tokens(spm):
    llama = Llama(tiny_model(3), spm)
    prompts = prompts_of_lengths([40, 9, 23], seed=8)
    one = llama.generate(prompts, 6, temperature=0, logprobs=True, echo=True, ignore_eos=True)
    llama.engine.prefill_chunk = 16
    prefills, calls = llama.engine.prefills, llama.forward_calls
    chunked = llama.generate(prompts, 6, temperature=0, logprobs=True, echo=True, ignore_eos=True)
    # 40 prompt positions in chunks of 16, the shorter prompts' rows decoding in between
    assert llama.engine.prefills - prefills == 3 and llama.forward_calls - calls == 3 + 7
    assert chunked[0] == one[0]
    assert max(abs(a - b) for x, y in zip(one[1], chunked[1]) for a, b in zip(x, y)) < 1e-4


def test_max_gen_len_defaults_to_the_rest_of_the_context(llama):
    prompt = prompts_of_lengths([120], seed=5)[0]
    tokens, _ = llama.generate([prompt], None, temperature=0, ignore_eos=True)
    assert len(tokens[0]) == 128 - 120


def test_max_batch_size_splits_large_batches(spm):
    llama = Llama(tiny_model(), spm, max_batch_size=2)
    prompts = prompts_of_lengths([3, 9, 5, 7, 4], seed=6)
    assert llama.generate(prompts, 5, temperature=0, ignore_eos=True)[0] == \
        [llama.generate([p], 5, temperature=0, ignore_eos=True)[0][0] for p in prompts]


# ---- sampling, seeds, streaming, stop strings ----------------------------------------------------------------

def test_seeded_sampling_is_reproducible(llama):
    prompts = prompts_of_lengths([5, 9], seed=7)
    a = llama.generate(prompts, 20, temperature=1.0, top_p=0.95, top_k=50, seed=123, ignore_eos=True)[0]
    b = llama.generate(prompts, 20, temperature=1.0, top_p=0.95, top_k=50, seed=123, ignore_eos=True)[0]
    c = llama.generate(prompts, 20, temperature=1.0, top_p=0.95, top_k=50, seed=124, ignore_eos=True)[0]
    assert a == b and a != c
    # the build seed makes the sequence of calls reproducible, as Meta's torch.manual_seed does
    x, y = Llama(llama.model, llama.tokenizer, seed=9), Llama(llama.model, llama.tokenizer, seed=9)
    assert [x.generate(prompts, 10, 1.0, ignore_eos=True)[0] for _ in range(2)] == \
        [y.generate(prompts, 10, 1.0, ignore_eos=True)[0] for _ in range(2)]
    # temperature -> 0 converges to greedy
    assert llama.generate(prompts, 12, temperature=1e-5, seed=5, ignore_eos=True)[0] == \
        llama.generate(prompts, 12, temperature=0, ignore_eos=True)[0]
    # row 0 with seed s is what the prompt gives alone with seed s
    assert llama.generate(prompts[:1], 20, 1.0, 0.95, top_k=50, seed=123, ignore_eos=True)[0][0] == a[0]


def test_stream_concatenates_to_text_completion(llama):
    kw = dict(temperature=0.9, top_p=0.9, max_gen_len=40, seed=11, ignore_eos=True)
    pieces = list(llama.stream("Once upon a time", **kw))
    (done,) = llama.text_completion(["Once upon a time"], **kw)
    assert len(pieces) > 5 and "".join(pieces) == done["generation"]
    ids = llama.tokenizer.encode("Once upon a time", True, False)
    toks = llama.generate([ids], 40, 0.9, 0.9, seed=11, ignore_eos=True)[0][0]
    assert done["generation"] == decode_continuation(llama.tokenizer, ids, toks)


def test_stop_string_split_across_tokens_is_caught(llama):
    prompt = "The story"
    ids = llama.tokenizer.encode(prompt, True, False)
    toks = llama.generate([ids], 30, temperature=0, ignore_eos=True)[0][0]
    full = decode_continuation(llama.tokenizer, ids, toks)
    # a stop string made of the end of one token's text and the start of the next one's
    for k in range(3, len(toks) - 1):
        left = decode_continuation(llama.tokenizer, ids, toks[:k])
        stop = full[len(left) - 2:len(left) + 2]
        if len(left) >= 2 and full.find(stop) == len(left) - 2 and stop.strip() == stop and len(stop) == 4:
            break
    else:
        pytest.fail("no token boundary to test")
    expected = full[:full.index(stop)]
    before = llama.forward_calls
    (out,) = llama.text_completion([prompt], temperature=0, max_gen_len=30, stop=[stop], ignore_eos=True)
    assert out["generation"] == expected and llama.forward_calls - before < 30  # stopped early
    pieces = list(llama.stream(prompt, temperature=0, max_gen_len=30, stop=[stop, "never appears"],
                               ignore_eos=True))
    assert "".join(pieces) == expected
    assert all(stop not in p for p in pieces)


def test_incremental_decoder_never_splits_characters(spm, llama3_tokenizer):
    for tok in (spm, llama3_tokenizer):
        context = tok.encode("Say:", bos=True, eos=False)
        ids = tok.encode(" héllo 😀 wörld 日本語 ok", bos=False, eos=False)
        dec = IncrementalDecoder(tok, context)
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == decode_continuation(tok, context, ids)
        assert "".join(pieces).strip() == "héllo 😀 wörld 日本語 ok"
        assert not any("\ufffd" in p for p in pieces)


def test_stop_string_holder():
    h = StopStringHolder(["### Instruction"])
    out = [h.push(x) for x in ["Hel", "lo #", "## Inst", "ruction:", " more"]]
    assert out == ["Hel", "lo ", "", "", ""] and h.stopped and h.flush() == ""
    h = StopStringHolder(["###"])
    assert [h.push("a#"), h.push("#b"), h.flush()] == ["a", "##b", ""]
    h = StopStringHolder(["x##", "##"])
    assert h.push("ab#") == "ab" and h.push("#c") == "" and h.stopped
    h = StopStringHolder(["END"])
    assert h.push("the EN") == "the " and h.flush() == "EN"


def test_chat_completion_is_metas(llama):
    # meta-llama/llama generation.py chat_completion, retyped: the system prompt folded into the
    # first user turn between <<SYS>> markers, "[INST] ... [/INST]", greedy tokens decoded
    B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    dialogs = [[{"role": "user", "content": "Hi"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]]
    out = llama.chat_completion(dialogs, temperature=0, max_gen_len=6)
    for dialog, result in zip(dialogs, out):
        user = dialog[-1]["content"]
        if dialog[0]["role"] == "system":
            user = B_SYS + dialog[0]["content"] + E_SYS + user
        ids = llama.tokenizer.encode(f"{B_INST} {user.strip()} {E_INST}", bos=True, eos=False)
        tokens = meta_generate(llama.model, llama.tokenizer, [ids], 6, temperature=0)[0][0]
        assert result == {"generation": {"role": "assistant", "content": llama.tokenizer.decode(tokens)}}
    out = llama.text_completion(["a", "b c"], temperature=0, max_gen_len=4, logprobs=True)
    assert all(len(r["tokens"]) == len(r["logprobs"]) <= 4 for r in out)


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate([list(range(1, 200))], 5), "context"),
    (lambda m: m.generate([[1, 5]], 5, top_p=0.0), "top_p"),
    (lambda m: m.generate([[1, 5]], 5, top_p=1.01), "top_p"),
    (lambda m: m.generate([[1, 5]], 5, temperature=-0.5), "temperature"),
    (lambda m: m.generate([[1, 5]], 0), "max_gen_len"),
    (lambda m: m.generate([], 5), "empty batch"),
    (lambda m: m.text_completion([], max_gen_len=5), "empty batch"),
    (lambda m: m.chat_completion([[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]]),
     "alternate"),
    (lambda m: m.text_completion(["a"], stop=[""]), "stop"),
])
def test_bad_input_raises_value_error(llama, call, message):
    with pytest.raises(ValueError, match=message):
        call(llama)


def test_generate_with_text_says_it_takes_token_ids():
    llm = Llama.build(backend="eager")
    for bad in ("hello", ["hello"], [["h", "i"]]):
        with pytest.raises(TypeError, match="token ids"):
            llm.generate(bad, max_gen_len=2)
    ids = llm.tokenizer.encode("hello", bos=True, eos=False)
    assert llm.generate([torch.tensor(ids)], max_gen_len=2, temperature=0)[0] == \
        llm.generate([ids], max_gen_len=2, temperature=0)[0]
