"""Tokenizers against transformers: LLaMA-2's SentencePiece ``tokenizer.model`` token for token.

``tests/fixtures/llama_spm/`` (``scripts/make_sentencepiece_fixtures.py``): LLaMA-2's vocabulary
as a ``tokenizer.model`` (from Phi-3's MIT release, checked piece for piece against LLaMA-2's
and against llama.cpp's tokenizer test cases), transformers' ids for Alpaca prompts, chat turns
and MMLU prompts, and a tiny random LLaMA on that vocabulary with transformers' MMLU logits.
"""

import csv
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.config import DataConfig
from qlora_jax.data import Encoder
from qlora_jax.evaluate import _last_logits, _padded, answer_letter_ids, mmlu
from qlora_jax.loading import load_model
from qlora_jax.tokenizer import load_tokenizer

SPM = Path(__file__).resolve().parent / "fixtures" / "llama_spm"
EXPECTED = json.loads((SPM / "expected.json").read_text())


@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(SPM)


def test_sentencepiece_llama_encodes_and_decodes_as_transformers(llama2):
    assert (llama2.bos_id, llama2.eos_id) == (EXPECTED["special"]["bos_id"], EXPECTED["special"]["eos_id"]) == (1, 2)
    for case in EXPECTED["encode"]:
        assert llama2.encode(case["text"]) == case["ids"], case["text"]
        assert llama2.encode(case["text"], add_special_tokens=False) == case["ids_no_special"], case["text"]
        assert llama2.decode(case["ids"]) == case["decoded"], case["text"]


def test_bos_and_eos_in_text_are_ids_not_characters(llama2):
    ids = llama2.encode("<s>[INST] Hi [/INST] Hello </s>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1
    assert llama2.encode("<s>", add_special_tokens=False) == [1]


def test_alpaca_examples_get_bos_and_eos_ids_as_qlora_with_transformers(llama2):
    case = EXPECTED["qlora_alpaca"]
    example = Encoder(llama2, DataConfig(format="alpaca", path="x.jsonl", source_max_len=512,
                                                 target_max_len=512)).source_target(
        case["source"], case["target"])
    n = len(case["source_ids"])
    assert example.input_ids.tolist() == case["source_ids"] + case["target_ids"]
    assert example.input_ids[0] == 1 and example.input_ids[-1] == 2
    assert example.labels.tolist() == [-100] * n + case["target_ids"]


def test_chat_template_that_trims_content_encodes_as_transformers(llama2):
    """LLaMA-2's template strips each message; a message with outer whitespace still trains on its reply."""
    chat = EXPECTED["chat"]
    assert chat["messages"][0]["content"] != chat["messages"][0]["content"].strip()
    assert llama2.apply_chat_template(chat["messages"]) == chat["text"]
    example = Encoder(llama2, DataConfig(format="chat", path="x.jsonl", max_len=512)).chat(chat["messages"])
    assert example.input_ids.tolist() == chat["ids"]
    trained = [int(i) for i, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert llama2.decode(trained) == "Hi, how can I help? " and trained[-2:] == [29871, 2]  # "▁", "</s>"


def test_reply_with_outer_whitespace_under_a_trimming_template(llama2):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello!\n"}]
    example = Encoder(llama2, DataConfig(format="chat", path="x.jsonl", max_len=512)).chat(messages)
    assert llama2.decode([int(i) for i, label in zip(example.input_ids, example.labels, strict=True)
                          if label != -100]).strip() == "Hello!"


def test_mmlu_letters_are_their_own_tokens_and_distinct(llama2, tiny_chat_model):
    mmlu_case = EXPECTED["mmlu"]
    assert answer_letter_ids(llama2) == mmlu_case["letter_ids"] == [319, 350, 315, 360]  # ▁A ▁B ▁C ▁D
    smollm2 = load_tokenizer(tiny_chat_model)
    ids = answer_letter_ids(smollm2)
    assert [smollm2.decode([i]) for i in ids] == [" A", " B", " C", " D"]


class _Letters:
    """A tokenizer whose ``encode`` of ``Answer: <letter>`` is given (the failure modes of real vocabularies)."""

    def __init__(self, letter_ids):
        self.letter_ids = letter_ids

    def encode(self, text, add_special_tokens=True):
        return [7, 8] + (self.letter_ids[text[-1]] if text != "Answer:" else [])


def test_mmlu_refuses_letters_that_are_not_one_distinct_token():
    with pytest.raises(ValueError, match=r"answer letter 'A' after 'Answer:' as one token \(\[3, 4\]\)"):
        answer_letter_ids(_Letters({"A": [3, 4], "B": [5], "C": [6], "D": [9]}))
    with pytest.raises(ValueError, match=r"the answer letters A-D share tokens \[3, 3, 6, 9\]"):
        answer_letter_ids(_Letters({"A": [3], "B": [3], "C": [6], "D": [9]}))


def test_mmlu_accuracy_matches_transformers_logits(tmp_path):
    """The tiny LLaMA on LLaMA-2's vocabulary: our letter logits and predictions are transformers'."""
    case = EXPECTED["mmlu"]
    model = load_model(SPM / "model", quant="none", compute_dtype=jnp.float32)
    tokenizer = load_tokenizer(SPM / "model")
    for prompt, expected_logits in zip(case["prompts"], case["transformers_letter_logits"], strict=True):
        ids, mask, _ = _padded(tokenizer.encode(prompt))
        ours = np.asarray(_last_logits(model, ids, mask))[case["letter_ids"]]
        np.testing.assert_allclose(ours, expected_logits, atol=1e-4)  # bf16 weights, both sides f32 compute
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
    with open(tmp_path / "test" / "trivia_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([question, *options, answer] for question, options, answer in case["questions"])
    (tmp_path / "dev" / "trivia_dev.csv").write_text("")
    result = mmlu(model, tokenizer, tmp_path, k=0)
    answers = [answer for _, _, answer in case["questions"]]
    expected = np.mean([p == a for p, a in zip(case["transformers_predictions"], answers, strict=True)])
    assert result["subjects"]["trivia"]["accuracy"] == pytest.approx(expected)
    assert 0 < expected < 1
