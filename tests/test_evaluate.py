"""Evaluation: sliding-window perplexity, target-only perplexity, MMLU-style multiple choice."""

import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_config

from qlora_jax.data import IGNORE
from qlora_jax.evaluate import CHOICES, main, mmlu_prompt, score_tokens, text_scores
from qlora_jax.loading import load_model
from qlora_jax.metrics import read_metrics
from qlora_jax.train import train


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return load_model(tiny_chat_model, quant="nf4", compute_dtype=jnp.float32)


def test_sliding_windows_score_every_token_once(tiny):
    ids = list(np.random.default_rng(0).integers(0, 49152, 150))
    whole_total, whole_count = score_tokens(tiny, np.asarray(ids, np.int32), np.asarray(ids, np.int32))
    total, count = text_scores(tiny, ids, max_len=200, stride=100)  # one window
    assert (count, whole_count) == (149, 149) and total == pytest.approx(whole_total, rel=1e-6)
    total, count = text_scores(tiny, ids, max_len=64, stride=32)  # five overlapping windows
    assert count == 149
    manual_total = 0.0
    for begin, first_new in [(0, 1), (32, 64), (64, 96), (96, 128)]:
        window = np.asarray(ids[begin:begin + 64], np.int32)
        labels = window.copy()
        labels[: first_new - begin] = IGNORE
        manual_total += score_tokens(tiny, window, labels)[0]
    assert total == pytest.approx(manual_total, rel=1e-6)


def test_perplexity_cli_json(tiny_chat_model, tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Line {i}: the quick brown fox jumps."}) for i in range(5)))
    assert main(["--model", str(tiny_chat_model), "--data", str(data), "--json", "--max-len", "64",
                 "--stride", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sequences"] == 5 and result["tokens"] > 40
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert 1000 < result["perplexity"] < 200000  # a random tiny model over a 49152-token vocabulary


def test_chat_perplexity_counts_only_targets(tiny_chat_model, chat_file, capsys):
    assert main(["--model", str(tiny_chat_model), "--data", str(chat_file), "--format", "chat", "--json",
                 "--max-len", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sequences"] == 40
    assert result["tokens"] < 40 * 20  # assistant replies only, not the chat template and questions


def _write_mmlu(directory, subject, rows):
    for split in ("dev", "test"):
        (directory / split).mkdir(parents=True, exist_ok=True)
        with open(directory / split / f"{subject}_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows[split])


def test_mmlu_scores_by_answer_letter_logits(tiny, tiny_chat_model, tmp_path, capsys):
    rows = {"dev": [["1+1?", "2", "3", "4", "5", "A"], ["2+2?", "1", "4", "3", "2", "B"]],
            "test": [[f"{a}+{a}?", str(2 * a), str(a), str(a + 1), str(3 * a), "A"] for a in range(1, 5)]}
    _write_mmlu(tmp_path, "elementary_math", rows)
    _write_mmlu(tmp_path, "astronomy", {"dev": rows["dev"], "test": rows["test"][:2]})
    assert main(["--model", str(tiny_chat_model), "--mmlu", str(tmp_path), "--k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["subjects"]) == {"elementary_math", "astronomy"}
    assert result["subjects"]["elementary_math"]["questions"] == 4
    prompt = mmlu_prompt("elementary_math", [("1+1?", ["2", "3", "4", "5"], "A")], "3+3?", ["6", "3", "4", "9"])
    assert prompt == ("The following are multiple choice questions (with answers) about elementary math.\n\n"
                      "1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n3+3?\nA. 6\nB. 3\nC. 4\nD. 9\nAnswer:")
    # the reported accuracy is what the letters' logits say
    from qlora_jax.evaluate import _last_logits, _padded, mmlu
    from qlora_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_chat_model)
    letters = [tokenizer.encode(f" {c}", add_special_tokens=False)[0] for c in CHOICES]
    shots = [(q, o, a) for q, *o, a in rows["dev"]]
    correct = 0
    for q, *options, answer in rows["test"]:
        ids, mask, _ = _padded(tokenizer.encode(mmlu_prompt("elementary_math", shots, q, options)))
        correct += CHOICES[int(np.argmax(np.asarray(_last_logits(tiny, ids, mask))[letters]))] == answer
    assert result["subjects"]["elementary_math"]["accuracy"] == correct / 4
    assert mmlu(tiny, tokenizer, tmp_path, 2)["mean_accuracy"] == result["mean_accuracy"]


def test_mmlu_errors(tiny_chat_model, tmp_path, capsys):
    assert main(["--model", str(tiny_chat_model), "--mmlu", str(tmp_path)]) == 2
    assert "test has no <subject>_test.csv files" in capsys.readouterr().err
    _write_mmlu(tmp_path, "x", {"dev": [["q", "a", "b", "c", "d", "E"]], "test": [["q", "a", "b", "c", "d", "A"]]})
    assert main(["--model", str(tiny_chat_model), "--mmlu", str(tmp_path), "--k", "1"]) == 2
    assert "x_dev.csv:1: expected question, A, B, C, D, answer (A-D)" in capsys.readouterr().err


def test_mmlu_runs_during_training(tiny_chat_model, chat_file, tmp_path):
    tests = [["2+2?", "4", "3", "2", "1", "A"], ["3+3?", "1", "6", "2", "3", "B"]]
    _write_mmlu(tmp_path / "mmlu", "math", {"dev": [["1+1?", "2", "3", "4", "5", "A"]], "test": tests})
    config = train_config(tiny_chat_model, chat_file, tmp_path / "run",
                          **{"train.mmlu_dir": str(tmp_path / "mmlu"), "train.mmlu_every": 2, "train.mmlu_k": 1})
    train(config, log=lambda *_: None)
    records = [r for r in read_metrics(tmp_path / "run") if "mmlu_accuracy" in r]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["mmlu_accuracy"] in (0.0, 0.5, 1.0) for r in records)
