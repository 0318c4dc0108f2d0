"""Byte tokenizer, chat rendering, and the transformers export (same ids through AutoTokenizer)."""

import json

import pytest

from hybrid_rl.model.config import PRESETS
from hybrid_rl.model.tokenizer import (
    CHAT_TEMPLATE, ByteTokenizer, HFChatTokenizer, checkpoint_tokenizer, generation_prefix, load_tokenizer, render_chat,
    render_message,
)
from hybrid_rl.model.tokenizer import _mask_by_prefix

TOK = ByteTokenizer()
TEXTS = ["", "hello world", "héllo  wörld\n\t", "日本語 🙂 emoji", "\x00\x01 bytes", "a" * 300, " leading space"]
CONVERSATION = [
    {"role": "system", "content": "You are a careful agent."},
    {"role": "user", "content": "Guess a number between 1 and 10."},
    {"role": "assistant", "content": "5"},
    {"role": "tool", "content": '{"result": "higher"}'},
    {"role": "assistant", "content": "8 — final ✓"},
]


def test_ids_and_vocab_fit_every_preset():
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.end_id) == (0, 1, 2, 7)
    assert [TOK.role_id(r) for r in ("system", "user", "assistant", "tool")] == [3, 4, 5, 6]
    assert TOK.vocab_size == 272 and TOK.encode("A") == [16 + 65]
    assert all(PRESETS.get(p)["vocab_size"] >= TOK.vocab_size for p in PRESETS.names())


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_roundtrip(text):
    ids = TOK.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and all(16 <= i < 272 for i in ids)
    assert TOK.decode(ids) == text


def test_decode_is_robust():
    e_acute = TOK.encode("é")  # two bytes
    assert TOK.decode(e_acute[:1]) == "\ufffd"  # truncated utf-8 -> replacement char, no exception
    assert TOK.decode([1, *TOK.encode("hi"), 7, 9, 5000]) == "hi"  # specials, reserved, out of range: dropped
    assert TOK.decode([1, *TOK.encode("hi"), 7], skip_special=False) == "<bos>hi<|end|>"


def test_special_strings_in_text_stay_bytes():
    assert TOK.end_id not in TOK.encode("<|end|>") and TOK.decode(TOK.encode("<|end|>")) == "<|end|>"


def test_render_message_and_prefix():
    assert render_message("user", "hi") == [4, 16 + ord("h"), 16 + ord("i"), 7]
    assert generation_prefix() == [5]


def test_render_chat_mask_covers_assistant_content_and_end_only():
    ids, mask = render_chat(CONVERSATION)
    assert len(ids) == len(mask) and ids[0] == TOK.bos_id
    masked = [i for i, m in zip(ids, mask) if m]
    want = TOK.encode("5") + [7] + TOK.encode("8 — final ✓") + [7]
    assert masked == want
    assert all(m == 0 for i, m in zip(ids, mask) if i == TOK.role_id("assistant"))


def test_whole_conversation_equals_turn_by_turn_rollout():
    """What the rollout loop builds: bos + observations, then generation prefix + generated tokens."""
    ids, is_action = [TOK.bos_id], [0]
    for m in CONVERSATION:
        if m["role"] == "assistant":
            prefix = generation_prefix()
            generated = TOK.encode(m["content"]) + [TOK.end_id]  # the sampler stops at <|end|>
            ids += prefix + generated
            is_action += [0] * len(prefix) + [1] * len(generated)
        else:
            piece = render_message(m["role"], m["content"])
            ids += piece
            is_action += [0] * len(piece)
    assert (ids, is_action) == render_chat(CONVERSATION)
    no_bos = render_chat(CONVERSATION, add_bos=False)
    assert no_bos == (ids[1:], is_action[1:])


@pytest.mark.parametrize("bad", [{"role": "bot", "content": "x"}, {"role": "User", "content": "x"}])
def test_bad_role_is_named(bad):
    with pytest.raises(ValueError, match=repr(bad["role"]).replace("'", ".")):
        render_chat([bad])
    with pytest.raises(ValueError, match="valid roles"):
        render_message(bad["role"], "x")


def test_bad_message_shape():
    with pytest.raises(ValueError, match="message 1"):
        render_chat([{"role": "user", "content": "a"}, {"role": "user"}])
    with pytest.raises(ValueError, match="content must be a str"):
        render_chat([{"role": "user", "content": 3}])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    TOK.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_autotokenizer_same_ids(hf_tok):
    assert len(hf_tok) == TOK.vocab_size
    assert hf_tok.convert_tokens_to_ids(["<pad>", "<bos>", "<eos>", "<|user|>", "<|end|>"]) == [0, 1, 2, 4, 7]
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == TOK.encode(text)
        assert hf_tok.decode(TOK.encode(text)) == text


def test_autotokenizer_chat_template_same_ids(hf_tok):
    assert hf_tok.chat_template == CHAT_TEMPLATE
    assert _ids(hf_tok.apply_chat_template(CONVERSATION, tokenize=True)) == render_chat(CONVERSATION)[0]
    prompt = CONVERSATION[:2]
    with_prompt = _ids(hf_tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
    assert with_prompt == render_chat(prompt)[0] + generation_prefix()
    with pytest.raises(Exception, match="unknown chat role bot"):
        hf_tok.apply_chat_template([{"role": "bot", "content": "x"}], tokenize=True)


def test_load_tokenizer(hf_dir, tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(checkpoint_tokenizer(tmp_path), ByteTokenizer)  # a checkpoint saved without one
    assert isinstance(checkpoint_tokenizer(hf_dir), ByteTokenizer)
    assert isinstance(load_tokenizer(hf_dir), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_checkpoint_without_tokenizer_files_is_byte_level_only_when_its_vocabulary_is(tmp_path):
    """A model saved by ``save_pretrained`` alone has no tokenizer files: a byte-sized vocabulary reads as bytes,
    a real tokenizer's (131072 ids) is refused, naming the fix, instead of training on bytes as its ids."""
    small, large = tmp_path / "small", tmp_path / "large"
    for d, vocab in ((small, 320), (large, 131072)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "nemotron_h", "vocab_size": vocab}))
    assert isinstance(checkpoint_tokenizer(small), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer \(no tokenizer_config.json\) and a vocabulary of 131072 "
                                                r"ids.*save_pretrained"):
        checkpoint_tokenizer(large)
    ByteTokenizer().save_pretrained(large)  # the fix the message names (here for a byte-trained model)
    assert isinstance(checkpoint_tokenizer(large), ByteTokenizer)


def test_hf_adapter_on_our_export(hf_tok):
    w = HFChatTokenizer(hf_tok)
    assert (w.end_id, w.bos_id, w.generation_prefix()) == (7, 1, [5])
    assert w.render_message("tool", "ok") == render_message("tool", "ok")
    assert w.render_chat(CONVERSATION) == render_chat(CONVERSATION)
    assert w.render_chat(CONVERSATION, add_bos=False) == render_chat(CONVERSATION, add_bos=False)
    assert w.decode(w.encode("héllo")) == "héllo"


def test_hf_adapter_chatml_style_template(hf_dir):
    """A template whose turns carry a newline after the role and after the end token; pieces still decompose,
    and the newline after an assistant's end token is ``end_suffix``: not generated, so not in the mask."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    hf.chat_template = (
        "{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' }}\n{{ m['content'] }}{{ '<|end|>' }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
    )
    w = HFChatTokenizer(hf)
    nl = TOK.encode("\n")
    assert w.generation_prefix() == [5] + nl and w.end_id == 7 and w.bos_prefix == [] and w.end_suffix == nl
    ids, mask = w.render_chat(CONVERSATION)
    assert ids == _ids(hf.apply_chat_template(CONVERSATION, tokenize=True))
    assert [i for i, m in zip(ids, mask) if m] == TOK.encode("5") + [7] + TOK.encode("8 — final ✓") + [7]
    assert _mask_by_prefix(w, CONVERSATION, add_bos=True) == (ids, mask)  # the non-strict mask agrees


def test_hf_adapter_template_without_end_token_in_assistant_turn(hf_dir):
    """A stop token the template never writes into an assistant turn: the error names it and the fix."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    with pytest.raises(ValueError, match="does not close an assistant message with '<eos>'.*pass end_token="):
        HFChatTokenizer(hf, end_token="<eos>")


def test_hf_adapter_rejects_non_decomposing_template(hf_dir):
    """A template that drops earlier assistant turns cannot be rendered turn by turn: strict mode says so."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    hf.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|' ~ m['role'] ~ '|>' }}{{ m['content'] }}{{ '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    w = HFChatTokenizer(hf)
    with pytest.raises(ValueError, match="message 3"):
        w.render_chat(CONVERSATION)
    ids, mask = w.render_chat(CONVERSATION, strict=False)
    assert ids == _ids(hf.apply_chat_template(CONVERSATION, tokenize=True))
    assert [i for i, m in zip(ids, mask) if m] == TOK.encode("8 — final ✓") + [7]


def test_a_checkpoint_tokenizer_that_cannot_render_chats_names_the_checkpoint_and_the_fix(tmp_path, monkeypatch):
    """`hybrid-rl sft|rl init_from=DIR` with a tokenizer without a chat template ended in a traceback naming
    neither the checkpoint nor a fix; now a CheckpointError (the CLI prints it as an error)."""
    from hybrid_rl.checkpoint import CheckpointError
    from hybrid_rl.model import tokenizer as tok_module

    (tmp_path / "tokenizer_config.json").write_text("{}")

    def no_template(directory):
        raise ValueError("TokenizersBackend has no chat_template; set tokenizer.chat_template or use ByteTokenizer")

    monkeypatch.setattr(tok_module, "load_tokenizer", no_template)
    with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path}: its tokenizer cannot render chats .*no chat_template"
                                              r".*save a tokenizer with a chat template beside the weights"):
        tok_module.checkpoint_tokenizer(tmp_path)
