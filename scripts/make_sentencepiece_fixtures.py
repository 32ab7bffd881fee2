"""Write ``tests/fixtures/llama_spm/``: LLaMA-2's SentencePiece tokenizer and transformers' answers on it.

    pip download --no-deps --no-binary=:all: llama-cpp-python==0.3.36   # the sdist, 77 MB
    pip install -e ".[oracle]" protobuf
    python scripts/make_sentencepiece_fixtures.py llama_cpp_python-0.3.36.tar.gz

The sdist vendors llama.cpp's vocab-only GGUFs. ``tokenizer.model`` is rebuilt from
``ggml-vocab-phi-3.gguf``: Phi-3 (MIT licence) ships LLaMA-2's 32,000 pieces unchanged,
so the file we commit is MIT-licensed, and the script checks that every piece, score
and type equals LLaMA-2's own (``ggml-vocab-llama-spm.gguf``) and that it encodes
llama.cpp's tokenizer test strings to the ids their ``.out`` file records.

Then transformers (``LlamaTokenizer``, the oracle) encodes Alpaca-format prompts,
chat turns and MMLU prompts; ``expected.json`` keeps its ids. A tiny random LLaMA with
this vocabulary (``model/``, bf16, 1 layer, tied embeddings) is scored by transformers
(f32 compute) on MMLU-format questions: ``expected.json`` keeps its letter logits and
predicted letters.
"""

import argparse
import json
import tarfile
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llama_spm"
MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
PIECES = 32000
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
TEXTS = [
    ALPACA.format(instruction="Name three primary colors."), "Red, yellow and blue.",
    ALPACA.format(instruction="Translate 'Äpfel' to English.") + "Apples.",
    "<s>[INST] Hello there! [/INST] Hi, how can I help? </s><s>[INST] Tell me a joke. [/INST]",
    "Answer: A", "Answer:", " A", "A", "\n\nQuestion: 2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:",
]
LLAMA2_CHAT = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
               "message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
               "{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CHAT = [{"role": "user", "content": " Hello there! "}, {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke."}]
MMLU = [
    ("Which planet is known as the red planet?", ["Venus", "Mars", "Jupiter", "Saturn"], "B"),
    ("What is 3 times 4?", ["7", "12", "34", "1"], "B"),
    ("Which gas do plants absorb?", ["Oxygen", "Nitrogen", "Carbon dioxide", "Helium"], "C"),
    ("Water boils at sea level at", ["50 C", "100 C", "150 C", "0 C"], "B"),
    ("The opposite of hot is", ["cold", "warm", "red", "tall"], "A"),
    ("How many legs has a spider?", ["six", "four", "ten", "eight"], "D"),
]


def _vocab(archive: tarfile.TarFile, name: str, tmp: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    archive.extract(MODELS + name, tmp, filter="data")
    reader = gguf.GGUFReader(tmp / MODELS / name)
    field = reader.fields
    return (list(field["tokenizer.ggml.tokens"].contents()), np.asarray(field["tokenizer.ggml.scores"].contents()),
            np.asarray(field["tokenizer.ggml.token_type"].contents()))


def build_tokenizer_model(phi3, llama) -> bytes:
    """LLaMA-2's ``tokenizer.model`` from Phi-3's first 32,000 pieces, checked against LLaMA-2's own vocab."""
    pieces, scores, types = (np.asarray(v[:PIECES]) if i else list(v[:PIECES]) for i, v in enumerate(phi3))
    scores, types = scores.copy(), types.copy()
    scores[:3], types[:3] = 0.0, (2, 3, 3)  # <unk> UNKNOWN, <s> </s> CONTROL, as LLaMA-2 stores them
    assert pieces == llama[0] and np.array_equal(scores, llama[1]) and np.array_equal(types, llama[2]), \
        "Phi-3's first 32,000 pieces differ from LLaMA-2's"
    proto = model_pb2.ModelProto()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=float(score), type=int(kind))
    trainer = proto.trainer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = model_pb2.TrainerSpec.BPE, PIECES, True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    trainer.split_digits, trainer.allow_whitespace_only_pieces = True, True
    normalizer = proto.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix = "identity", True
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    return proto.SerializeToString()


def check_llama_cpp_cases(archive: tarfile.TarFile, model_file: Path, tmp: Path) -> int:
    for suffix in (".inp", ".out"):
        archive.extract(MODELS + "ggml-vocab-llama-spm.gguf" + suffix, tmp, filter="data")
    texts = (tmp / MODELS / "ggml-vocab-llama-spm.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")[:-1]
    ids = (tmp / MODELS / "ggml-vocab-llama-spm.gguf.out").read_text().splitlines()
    sp = SentencePieceProcessor(model_file=str(model_file))
    for text, expected in zip(texts, ids, strict=True):
        assert sp.encode(text) == [int(i) for i in expected.split()], text
    return len(texts)


def mmlu_prompt(question: str, options: list[str]) -> str:
    return ("The following are multiple choice questions (with answers) about trivia.\n\n" + question
            + "".join(f"\n{letter}. {option}" for letter, option in zip("ABCD", options, strict=True)) + "\nAnswer:")


def write_model(directory: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=PIECES, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # large weights, so the prediction depends on the question, not only on "Answer:"
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 1.0)
    model.save_pretrained(directory, safe_serialization=True)
    # the stored bf16 weights computed in f32, as the test computes them (reloaded: .to(bf16) rounded RoPE's buffer)
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="llama_cpp_python-0.3.36.tar.gz")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.sdist) as archive, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = build_tokenizer_model(_vocab(archive, "ggml-vocab-phi-3.gguf", tmp),
                                    _vocab(archive, "ggml-vocab-llama-spm.gguf", tmp))
        (OUT / "tokenizer.model").write_bytes(raw)
        cases = check_llama_cpp_cases(archive, OUT / "tokenizer.model", tmp)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "chat_template": LLAMA2_CHAT}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = LlamaTokenizer.from_pretrained(OUT)
    model_dir = OUT / "model"
    model = write_model(model_dir)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (model_dir / name).write_bytes((OUT / name).read_bytes())
    letters = [tokenizer("Answer: " + letter, add_special_tokens=False).input_ids[-1] for letter in "ABCD"]
    predictions, letter_logits = [], []
    with torch.no_grad():
        for question, options, _ in MMLU:
            ids = tokenizer(mmlu_prompt(question, options), return_tensors="pt").input_ids
            logits = model(input_ids=ids).logits[0, -1].float()
            letter_logits.append(logits[letters].tolist())
            predictions.append("ABCD"[int(torch.argmax(logits[letters]))])
    expected = {
        "llama_cpp_cases": cases,
        "encode": [{"text": t, "ids": tokenizer(t).input_ids,
                    "ids_no_special": tokenizer(t, add_special_tokens=False).input_ids,
                    "decoded": tokenizer.decode(tokenizer(t).input_ids, skip_special_tokens=True)} for t in TEXTS],
        "chat": {"messages": CHAT, "text": tokenizer.apply_chat_template(CHAT, tokenize=False),
                 "ids": list(tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False))},
        "qlora_alpaca": {"source": TEXTS[0], "target": TEXTS[1],  # QLoRA's collator: bos + source, target + eos
                         "source_ids": tokenizer(tokenizer.bos_token + TEXTS[0], add_special_tokens=False).input_ids,
                         "target_ids": tokenizer(TEXTS[1] + tokenizer.eos_token, add_special_tokens=False).input_ids},
        "special": {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id},
        "mmlu": {"questions": MMLU, "letter_ids": letters, "transformers_predictions": predictions,
                 "transformers_letter_logits": letter_logits,
                 "prompts": [mmlu_prompt(q, o) for q, o, _ in MMLU]},
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False))
    print(f"wrote {OUT}: {cases} llama.cpp cases match; letters {letters}; transformers predicts {predictions}")


if __name__ == "__main__":
    main()
