"""The byte tokenizer, the chat template, and rendering that rollout and SFT share.

Ids (vocab 272, fits every preset; ``micro`` has vocab 320):

    0 <pad>   1 <bos>   2 <eos>   3 <|system|>   4 <|user|>   5 <|assistant|>   6 <|tool|>   7 <|end|>
    8..15     reserved specials (<|reserved_8|> ... <|reserved_15|>), never produced by encode()
    16 + b    byte b (0..255) of the UTF-8 text

Rendering (the one chat format of the project):

    conversation = [<bos>] + for each message: [<|role|>] + utf8(content) + [<|end|>]

A generated assistant turn starts after ``generation_prefix()`` = ``[<|assistant|>]`` and stops at
``<|end|>`` (the stop token). So rendering a whole conversation equals the concatenation of
``[<bos>]`` and per-message renders, which is what the rollout loop builds turn by turn:
``render_chat`` and the rollout therefore produce *identical* token ids, and the assistant mask
(content bytes and the closing ``<|end|>``, not the role token) is exactly the set of generated tokens.

``encode(text)`` treats text as bytes only: a literal ``"<|end|>"`` typed in a message is seven
byte tokens, never the special id, so model output and environment text cannot inject specials.

``save_pretrained(dir)`` writes a transformers tokenizer (``tokenizer.json`` = BPE without merges
over a ByteLevel pre-tokenizer/decoder, specials as added tokens, plus a Jinja ``chat_template``) that
``AutoTokenizer.from_pretrained`` loads with the same ids. One difference is inherent to transformers:
it parses special-token strings inside text (``"<|end|>"`` becomes id 7), ours does not.

``HFChatTokenizer`` wraps a real checkpoint's own tokenizer behind the same interface; see its
docstring for what it can and cannot guarantee.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
NUM_SPECIAL_IDS = 16  # room for specials; byte b has id NUM_SPECIAL_IDS + b
ALL_SPECIAL_TOKENS = SPECIAL_TOKENS + [f"<|reserved_{i}|>" for i in range(len(SPECIAL_TOKENS), NUM_SPECIAL_IDS)]

# Jinja chat template equivalent to ``render_chat`` (+ ``generation_prefix`` with add_generation_prompt).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; valid roles: system, user, assistant, tool') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' }}{{ message['content'] }}{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; valid roles are {', '.join(ROLES)}")


class ByteTokenizer:
    """UTF-8 bytes plus chat specials. Stateless; cheap to build anywhere (workers, tests)."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    end_id = 7  # <|end|>: closes every message; the stop token of a generated turn
    role_ids = {"system": 3, "user": 4, "assistant": 5, "tool": 6}
    byte_offset = NUM_SPECIAL_IDS
    vocab_size = NUM_SPECIAL_IDS + 256
    special_tokens = tuple(ALL_SPECIAL_TOKENS)

    # transformers-style aliases so code written for either reads the same
    pad_token_id, bos_token_id, eos_token_id = pad_id, bos_id, eos_id
    bos_prefix = (bos_id,)  # ids before the first message of a conversation
    end_suffix = ()  # ids a rendered assistant turn has after its end token (none here)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.end_id, self.eos_id)

    def encode(self, text: str) -> list[int]:
        return [self.byte_offset + b for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Bytes back to text; invalid UTF-8 becomes U+FFFD. Specials are dropped, or shown by name."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if self.byte_offset <= i < self.vocab_size:
                buf.append(i - self.byte_offset)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            if not skip_special:
                out.append(ALL_SPECIAL_TOKENS[i] if 0 <= i < NUM_SPECIAL_IDS else f"<|id_{i}|>")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def role_id(self, role: str) -> int:
        check_role(role)
        return self.role_ids[role]

    def render_message(self, role: str, content: str) -> list[int]:
        return [self.role_id(role)] + self.encode(content) + [self.end_id]

    def generation_prefix(self) -> list[int]:
        return [self.role_ids["assistant"]]

    def render_chat(self, messages: Sequence[dict], add_bos: bool = True) -> tuple[list[int], list[int]]:
        return _render_concat(self, messages, list(self.bos_prefix) if add_bos else [])

    # ------------------------------------------------------------------ transformers export
    def to_hf(self):
        """A ``PreTrainedTokenizerFast`` with the same ids and our chat template."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=_build_tokenizers_backend(),
            bos_token="<bos>", eos_token="<|end|>", pad_token="<pad>",
            chat_template=CHAT_TEMPLATE,
            model_max_length=1 << 30,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json (with ``chat_template``) and special_tokens_map.json.

        ``eos_token`` is ``<|end|>`` on the transformers side so that ``generate`` stops at the end of
        a turn, as our rollout does; ``<eos>`` (id 2) stays an added token.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _build_tokenizers_backend().save(str(directory / "tokenizer.json"))
        added = {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(ALL_SPECIAL_TOKENS)
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<bos>", "eos_token": "<|end|>", "pad_token": "<pad>",
            "added_tokens_decoder": added,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
            "hybrid_rl_tokenizer": "byte",
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special_map = {"bos_token": "<bos>", "eos_token": "<|end|>", "pad_token": "<pad>"}
        (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _build_tokenizers_backend():
    """A ``tokenizers.Tokenizer``: ByteLevel alphabet char of byte b -> id 16 + b, BPE without merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(ALL_SPECIAL_TOKENS)}
    vocab.update({alphabet[b]: NUM_SPECIAL_IDS + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no merges exist, so word splitting changes nothing but costs time
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ALL_SPECIAL_TOKENS])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map, the alphabet of the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ---------------------------------------------------------------------- rendering (shared)


def _render_concat(tok, messages: Sequence[dict], head: list[int]) -> tuple[list[int], list[int]]:
    """head + per-message renders. Mask: 1 on what the policy generates of an assistant message (its
    content and end token: not the generation prefix before it, not ``end_suffix`` after it); 0 elsewhere."""
    n_prefix, n_suffix = len(tok.generation_prefix()), len(tok.end_suffix)
    ids, mask = list(head), [0] * len(head)
    for k, message in enumerate(messages):
        role, content = _unpack(message, k)
        piece = tok.render_message(role, content)
        ids += piece
        if role == "assistant":
            mask += [0] * n_prefix + [1] * (len(piece) - n_prefix - n_suffix) + [0] * n_suffix
        else:
            mask += [0] * len(piece)
    return ids, mask


def _unpack(message: Any, index: int) -> tuple[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r:.200}")
    content = message["content"]
    if not isinstance(content, str):
        raise ValueError(f"message {index} ({message['role']}): content must be a str, got {type(content).__name__}")
    check_role(message["role"])
    return message["role"], content


def render_message(role: str, content: str, tokenizer=None) -> list[int]:
    """``[<|role|>] + encode(content) + [<|end|>]`` (or the wrapped tokenizer's equivalent)."""
    return (tokenizer or _DEFAULT).render_message(role, content)


def generation_prefix(tokenizer=None) -> list[int]:
    return (tokenizer or _DEFAULT).generation_prefix()


def render_chat(messages: Sequence[dict], tokenizer=None, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its assistant mask (1 = a token the policy produced)."""
    return (tokenizer or _DEFAULT).render_chat(messages, add_bos=add_bos)


_DEFAULT = ByteTokenizer()


# ---------------------------------------------------------------------- a real checkpoint's tokenizer


class HFChatTokenizer:
    """A transformers tokenizer behind the ``ByteTokenizer`` interface.

    Per-message pieces are derived from the tokenizer's own chat template by differencing:
    ``render_message(role, c)`` = tokens of ``template([m0, (role, c)])`` minus tokens of
    ``template([m0])`` for a fixed system message m0, and ``generation_prefix()`` = tokens of
    ``template(msgs, add_generation_prompt=True)`` minus those without it. ``render_chat`` renders
    the *whole* conversation with the template and checks that this equals bos + the per-message
    concatenation (the property rollout relies on); if it does not it raises, naming the first message
    where they differ.

    What the template writes before the first message (its bos token, if any) is ``bos_prefix``; what
    it writes after the end token of an assistant turn (ChatML's newline) is ``end_suffix``: the policy
    stops at the end token, so the engine appends ``end_suffix`` itself, as tokens it did not generate,
    and the assistant mask leaves it out.

    Limits: templates that rewrite earlier turns (e.g. drop reasoning from past assistant turns), that
    inject a default system prompt only when none is given, or that put the stop token outside the
    assistant turn do not decompose into per-turn pieces; use such a tokenizer for SFT only through
    ``render_chat(..., strict=False)``, which then gives the template's ids with a mask built by
    prefix differencing. Each per-turn piece is the tokenization of its own text, so a template whose
    message boundaries are not special tokens could merge across them (strict ``render_chat`` catches it).
    The template's rendering of a conversation and a rollout's ids differ only inside generated turns: the
    rollout keeps the ids it sampled, which need not be the canonical tokenization of their text
    (docs/INTERFACES.md, "Real tokenizers").
    """

    def __init__(self, hf_tokenizer, end_token: str | None = None):
        if getattr(hf_tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{type(hf_tokenizer).__name__} has no chat_template; set tokenizer.chat_template or use ByteTokenizer"
            )
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else hf_tokenizer.eos_token_id
        self.bos_id = hf_tokenizer.bos_token_id
        self.eos_id = hf_tokenizer.eos_token_id
        self.pad_token_id, self.bos_token_id, self.eos_token_id = self.pad_id, self.bos_id, self.eos_id
        self._anchor = [{"role": "system", "content": "x"}]
        self._anchor_ids = self._template(self._anchor)
        self._generation_prefix: list[int] | None = None
        # what the template emits before the first message: its bos token if it writes one
        bos = hf_tokenizer.bos_token_id
        self.bos_prefix = [bos] if bos is not None and self._anchor_ids[:1] == [bos] else []
        end = end_token if end_token is not None else self._guess_end_token()
        self.end_id = hf_tokenizer.convert_tokens_to_ids(end)
        self.end_suffix = self._end_suffix(end)

    def _end_suffix(self, end: str) -> list[int]:
        """The ids after the last end token of a rendered assistant message."""
        piece = self.render_message("assistant", "x")
        if self.end_id not in piece:
            raise ValueError(f"the chat template does not close an assistant message with {end!r}, so a generated "
                             "turn cannot stop at it; pass end_token= the token that ends an assistant turn")
        return piece[len(piece) - piece[::-1].index(self.end_id):]

    def _template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        out = self.hf.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(i) for i in out]

    def _guess_end_token(self) -> str:
        """The last special token of a rendered assistant message, else eos."""
        piece = self.render_message("assistant", "x")
        specials = set(self.hf.all_special_ids)
        for i in reversed(piece):
            if i in specials:
                return self.hf.convert_ids_to_tokens(i)
        return self.hf.eos_token

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(i for i in (self.end_id, self.eos_id) if i is not None))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def render_message(self, role: str, content: str) -> list[int]:
        check_role(role)
        full = self._template(self._anchor + [{"role": role, "content": content}])
        if full[: len(self._anchor_ids)] != self._anchor_ids:
            raise ValueError("the chat template rewrites earlier messages; per-message rendering is not possible")
        return full[len(self._anchor_ids):]

    def generation_prefix(self) -> list[int]:
        if self._generation_prefix is None:
            msgs = self._anchor + [{"role": "user", "content": "x"}]
            without, with_prompt = self._template(msgs), self._template(msgs, add_generation_prompt=True)
            self._generation_prefix = with_prompt[len(without):]
        return list(self._generation_prefix)

    def render_chat(self, messages: Sequence[dict], add_bos: bool = True, strict: bool = True):
        head = self.bos_prefix if add_bos else []
        ids, mask = _render_concat(self, messages, head)
        full = self._template(messages)
        if not add_bos:
            full = full[len(self.bos_prefix):]
        if full == ids:
            return ids, mask
        if not strict:
            return _mask_by_prefix(self, messages, add_bos)
        k = next(k for k in range(len(messages)) if self._template(messages[: k + 1])
                 != self.bos_prefix + _render_concat(self, messages[: k + 1], [])[0])
        raise ValueError(
            f"the chat template of {type(self.hf).__name__} does not render message {k} as its per-turn piece, "
            "so rollout (turn by turn) and SFT (whole conversation) would see different ids; "
            "pass strict=False for SFT-only use, or use ByteTokenizer"
        )


def _mask_by_prefix(tok: HFChatTokenizer, messages: Sequence[dict], add_bos: bool) -> tuple[list[int], list[int]]:
    """The template's own ids; mask = tokens added by each assistant message after the generation prompt,
    up to its ``end_suffix``."""
    ids = tok._template(messages)
    mask = [0] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = tok._template(messages[: k + 1])
        if ids[: len(upto)] != upto:
            continue  # the template rewrites this turn once later turns follow: it is not in the ids
        start = len(tok._template(messages[:k], add_generation_prompt=True)) if k else len(tok.bos_prefix)
        stop = len(upto) - len(tok.end_suffix)  # the suffix after the end token is not generated
        mask[start:stop] = [1] * (stop - start)
    cut = 0 if add_bos else len(tok.bos_prefix)
    return ids[cut:], mask[cut:]


BYTE_VOCAB_LIMIT = 4096  # a checkpoint without tokenizer files and a vocabulary up to this is byte-level


def checkpoint_tokenizer(directory: str | os.PathLike | None):
    """The tokenizer saved beside a checkpoint (``load_tokenizer``); ``ByteTokenizer`` for None.

    A checkpoint without tokenizer files (``transformers``' ``model.save_pretrained`` alone) gets the byte
    tokenizer only when its vocabulary is byte-sized (``config.json``'s ``vocab_size`` up to
    ``BYTE_VOCAB_LIMIT``, like every small preset's); a larger one was trained with a tokenizer of its own,
    and reading its ids as bytes would train and play on garbage, so it is refused with the fix."""
    if not directory:
        return ByteTokenizer()
    directory = Path(directory)
    if (directory / "tokenizer_config.json").is_file():
        try:
            return load_tokenizer(directory)
        except ValueError as err:  # no chat template, or one that cannot end an assistant turn
            if isinstance(err, json.JSONDecodeError):  # a torn tokenizer file: its own error
                raise
            from hybrid_rl.checkpoint import CheckpointError

            raise CheckpointError(f"checkpoint {directory}: its tokenizer cannot render chats ({err}); save a tokenizer "
                                  "with a chat template beside the weights (tokenizer.chat_template = ...; "
                                  f"tokenizer.save_pretrained('{directory}'))") from None
    try:
        vocab = json.loads((directory / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        vocab = None
    if isinstance(vocab, int) and vocab > BYTE_VOCAB_LIMIT:
        raise FileNotFoundError(
            f"checkpoint {directory} has no tokenizer (no tokenizer_config.json) and a vocabulary of {vocab} ids, "
            f"too large for the built-in byte tokenizer ({ByteTokenizer.vocab_size} ids): it was trained with a "
            "tokenizer of its own. Save that tokenizer beside the weights, e.g. "
            f"AutoTokenizer.from_pretrained(SOURCE).save_pretrained({str(directory)!r}); for a model trained on "
            f"bytes, ByteTokenizer().save_pretrained({str(directory)!r}).")
    return ByteTokenizer()


def load_tokenizer(directory: str | os.PathLike | None = None):
    """``ByteTokenizer`` for None or a directory we saved; else the directory's own HF tokenizer, wrapped."""
    if directory is None:
        return ByteTokenizer()
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"no tokenizer_config.json in {directory}; pass a checkpoint directory that has a tokenizer, "
            "or None for the built-in byte tokenizer"
        )
    if json.loads(config_path.read_text()).get("hybrid_rl_tokenizer") == "byte":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFChatTokenizer(AutoTokenizer.from_pretrained(str(directory)))
