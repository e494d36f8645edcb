"""input.kind: text: a long document between the system turn and the question, split across ranks like the video."""

import pytest
import torch
from distributed_utils import prefill_logits_worker, run_on_ranks

from megatron_apbv.models.inputs import build_prompt
from megatron_apbv.runtime.config import ConfigError
from megatron_apbv.models.resolve import load_config

pytest.importorskip("transformers")
from test_chat_prompt import byte_tokenizer  # noqa: E402

DOCUMENT = "The vault code is 4821. " + "Grass is green and the sky is blue. " * 6
QUESTION = "What is the vault code?"


@pytest.fixture
def tokenizer_dir(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def _overrides(tokenizer_dir, *extra):
    return [f"model.tokenizer={tokenizer_dir}", "model.vocab_size=300", "input.kind=text",
            f"input.question={QUESTION}", "apbv.anchor=8", *extra]


def test_document_ids_sit_between_system_and_question(tokenizer_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT, encoding="utf-8")
    tok = byte_tokenizer()
    for source in (f"input.context={DOCUMENT}", f"input.context_path={doc}"):
        cfg = load_config(None, _overrides(tokenizer_dir, source))
        ids = build_prompt(cfg).input_ids[0].tolist()
        text = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n" + DOCUMENT + "\n\n"
                + QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert cfg.input.context_tokens == len(tok(DOCUMENT)["input_ids"])
        assert cfg.prompt_len == cfg.input.system_tokens + cfg.input.context_tokens + cfg.query_len
        assert tok.decode(ids[cfg.input.system_tokens : cfg.prompt_len - cfg.query_len]) == DOCUMENT
        assert tok.decode(ids[-cfg.query_len:]).startswith("\n\n" + QUESTION)


def test_text_prompt_exact_mode_equals_dense_on_two_ranks(tokenizer_dir):
    record = run_on_ranks(2, prefill_logits_worker, None, _overrides(tokenizer_dir, f"input.context={DOCUMENT}",
                                                                    "apbv.variant=exact"))
    assert record["max_abs_logit_diff"] <= 1e-4, record
    assert record["top1_agree"], record


@pytest.mark.parametrize("extra, words", [
    ([], "exactly one of input.context"),
    (["input.context=abc", "input.context_path=/nonexistent"], "both are set"),
    (["input.context_path=/nonexistent/doc.txt"], "input.context_path='/nonexistent/doc.txt' is not a file"),
])
def test_text_kind_errors_name_the_field(tokenizer_dir, extra, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, _overrides(tokenizer_dir, *extra))


def test_context_needs_the_text_kind_and_a_question(tokenizer_dir):
    with pytest.raises(ConfigError, match="input.context is the document of input.kind=text"):
        load_config(None, [f"model.tokenizer={tokenizer_dir}", "model.vocab_size=300", "input.context=abc"])
    with pytest.raises(ConfigError, match="input.kind=text needs input.question"):
        load_config(None, [f"model.tokenizer={tokenizer_dir}", "model.vocab_size=300", "input.kind=text",
                           "input.context=abc"])


def test_oversized_or_binary_documents_are_refused(tokenizer_dir, tmp_path, monkeypatch):
    from megatron_apbv.models import chat_prompt

    binary = tmp_path / "doc.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(None, _overrides(tokenizer_dir, f"input.context_path={binary}"))
    monkeypatch.setattr(chat_prompt, "MAX_CONTEXT_BYTES", 16)
    big = tmp_path / "big.txt"
    big.write_text("x" * 17)
    with pytest.raises(ConfigError, match="over the 16 bytes allowed"):
        load_config(None, _overrides(tokenizer_dir, f"input.context_path={big}"))
    with pytest.raises(ConfigError, match="input.context holds 17 bytes"):
        load_config(None, _overrides(tokenizer_dir, "input.context=" + "y" * 17))


def test_a_request_document_replaces_the_jobs(tokenizer_dir, tmp_path):
    """apbv infer: a request's input.context_path replaces the job's input.context (and the other way round)."""
    from megatron_apbv.jobs.requests import Request, plan_requests

    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT, encoding="utf-8")
    job = _overrides(tokenizer_dir, "input.context=the job's own document")
    planned = plan_requests([Request("a", 1, {"input.context_path": str(doc)}),
                             Request("b", 2, {"input.context": "short", "input.question": "Which?"})], None, job)
    (a, a_error), (b, b_error) = (p.resolve() for p in planned)
    assert a_error is None and a.input.context is None and a.input.context_path == str(doc)
    assert a.input.context_tokens == len(byte_tokenizer()(DOCUMENT)["input_ids"])
    assert b_error is None and b.input.context == "short" and b.input.context_tokens == 5
