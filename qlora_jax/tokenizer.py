"""Tokenizers of a Hugging Face model directory: ``tokenizer.json`` (HF ``tokenizers``) or
``tokenizer.model`` (SentencePiece, converted to ``tokenizers`` as transformers converts it),
with BOS/EOS/pad and the chat template from ``tokenizer_config.json``.

Chat templates are Jinja, rendered in a sandbox the way transformers renders them
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``tojson``).
"""

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
import numpy as np

from .jsonio import read_json_object


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def _stop_ids(directory: Path, eos_id: int | None) -> frozenset[int]:
    """Every end-of-sequence id: the tokenizer's EOS and the ``eos_token_id`` (an int or a list, as LLaMA-3's
    ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``) of ``generation_config.json`` and ``config.json``."""
    ids = {eos_id} if eos_id is not None else set()
    for name in ("generation_config.json", "config.json"):
        listed = _read_json(directory / name).get("eos_token_id")
        for token_id in listed if isinstance(listed, list) else [listed]:
            if isinstance(token_id, int) and not isinstance(token_id, bool):
                ids.add(token_id)
    return frozenset(ids)


def _chat_template(directory: Path, config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _sentencepiece_tokenizer(path: Path, config: dict):
    """A ``tokenizers`` Tokenizer equal to transformers' ``LlamaTokenizer`` built from a SentencePiece BPE model.

    As transformers 5 converts ``tokenizer.model``: the pieces as a byte-fallback BPE vocab,
    merges generated from it (every split of a piece into two pieces, ranked by the piece's
    id), a Metaspace pre-tokenizer (the ``▁`` prefix on the first section only, or on every
    section when ``legacy: true``; none with ``add_prefix_space: false``), control and
    unknown pieces as special tokens, so ``<s>`` in text is the BOS id, not the characters
    ``<``, ``s``, ``>``. LLaMA-family SentencePiece models are BPE. Written here because the
    converter lives in transformers (not a run-time dependency) and ``tokenizers`` has none for
    SentencePiece BPE models; ``tests/test_tokenizer.py`` holds it to transformers' ids.
    """
    import sentencepiece
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    sp = sentencepiece.SentencePieceProcessor()
    try:
        loaded = sp.Load(str(path))
    except (OSError, RuntimeError):
        loaded = False
    if not loaded:
        raise ValueError(f"{path}: not a SentencePiece model")
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    merges = sorted(((piece[:k], piece[k:], index) for piece, index in vocab.items() for k in range(1, len(piece))
                     if piece[:k] in vocab and piece[k:] in vocab),
                    key=lambda m: (m[2], vocab[m[0]], vocab[m[1]]))
    tokenizer = HFTokenizer(BPE(vocab=vocab, merges=[(left, right) for left, right, _ in merges], fuse_unk=True,
                                byte_fallback=True))
    prefix = config.get("add_prefix_space", True) is not False
    scheme = ("always" if config.get("legacy", False) else "first") if prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    specials = [sp.IdToPiece(i) for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i)]
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True) for piece in specials])
    return tokenizer


def _added_tokens(tokenizer, config: dict) -> None:
    """Register ``added_tokens_decoder`` entries of ``tokenizer_config.json`` the model's tokenizer lacks."""
    from tokenizers import AddedToken

    for entry in (config.get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) \
                and tokenizer.token_to_id(entry["content"]) is None:
            token = AddedToken(entry["content"], special=bool(entry.get("special", True)), normalized=False)
            (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])


def _bos_eos_processor(tokenizer, bos: str | None, eos: str | None):
    """transformers' post-processor for ``add_bos_token``/``add_eos_token``: ``[bos] A [eos]``."""
    from tokenizers import processors

    ends = [token for token in (bos, eos) if token is not None]
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    return processors.TemplateProcessing(single=single,
                                         special_tokens=[(token, tokenizer.token_to_id(token)) for token in ends])


class Tokenizer:
    """Text <-> token ids, special token ids, and chat formatting for one model."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as HFTokenizer

        config = _read_json(directory / "tokenizer_config.json")
        special = _read_json(directory / "special_tokens_map.json")

        def special_token(name):
            return _token_text(config.get(name)) or _token_text(special.get(name))

        self.bos_token, self.eos_token = special_token("bos_token"), special_token("eos_token")
        self.pad_token = special_token("pad_token")
        if (directory / "tokenizer.json").is_file():
            try:
                self._hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as err:  # tokenizers raises a bare Exception for malformed files
                raise ValueError(f"{directory / 'tokenizer.json'}: cannot be read by tokenizers ({err})") from None
        elif (directory / "tokenizer.model").is_file():
            self._hf = _sentencepiece_tokenizer(directory / "tokenizer.model", config)
            self.bos_token = self.bos_token or "<s>"
            self.eos_token = self.eos_token or "</s>"
            add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
            self._hf.post_processor = _bos_eos_processor(self._hf, self.bos_token if add_bos else None,
                                                         self.eos_token if add_eos else None)
        else:
            raise FileNotFoundError(f"{directory} has no tokenizer.json or tokenizer.model")
        _added_tokens(self._hf, config)
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.token_to_id(self.eos_token) if self.eos_token else None
        pad_id = self.token_to_id(self.pad_token) if self.pad_token else None
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.chat_template = _chat_template(directory, config)
        self.stop_ids = _stop_ids(directory, self.eos_id)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS as the tokenizer defines. Special tokens
        written in the text (``<s>``, ``<|im_start|>``) are their ids."""
        return self._hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids of ``text`` (no special tokens added) and their character spans ``i64[N, 2]``."""
        encoding = self._hf.encode(text, add_special_tokens=False)
        return encoding.ids, np.asarray(encoding.offsets, np.int64).reshape(-1, 2)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render ``[{"role": ..., "content": ...}, ...]`` with the model's chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a local Hugging Face model directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    return Tokenizer(directory)
