"""apbv infer in the ecosystem: the OpenAI Batch dialect in and out, the Python API, Prometheus metrics.

The 2-rank runs compare the OpenAI file's answers with the same requests written by hand in the dotted
dialect (exact variant: the answers are the model's own), and the Python API's with the CLI's.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from rank_processes import CONFIG, ROOT, STARTUP, clean_env, collect, show, spawn

from megatron_apbv.jobs.answers import recover_answers
from megatron_apbv.jobs.openai_batch import openai_record, output_id
from megatron_apbv.jobs.requests import plan_requests, read_requests, requests_from_objects
from megatron_apbv.runtime.config import ConfigError

CHAT = "/v1/chat/completions"
TINY_VISION = ["vision.depth=1", "vision.hidden_size=16", "vision.num_heads=2", "vision.intermediate_size=32",
               "vision.fullatt_block_indexes=[0]"]


def _batch_line(custom_id, body):
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------------------------------- translation


def test_openai_lines_become_the_dotted_requests_and_what_cannot_be_honoured_is_an_error_naming_the_field(tmp_path):
    video = tmp_path / "clip one.mp4"
    rows = [
        _batch_line("a", {"model": "qwen", "max_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 3,
                          "mm_processor_kwargs": {"fps": 1.5},
                          "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": [
                                           {"type": "video_url", "video_url": {"url": "file://" + str(video).replace(" ", "%20")}},
                                           {"type": "text", "text": "What "}, {"type": "text", "text": "moves?"}]}]}),
        _batch_line("b", {"max_completion_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}),
        _batch_line("remote", {"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}]}]}),
        _batch_line("image", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///x.png"}}]}]}),
        _batch_line("two", {"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "/a.mp4"}}, {"type": "video_url", "video_url": {"url": "/b.mp4"}}]}]}),
        _batch_line("n2", {"n": 2, "messages": [{"role": "user", "content": "Hi"}]}),
        _batch_line("stop", {"stop": ["\n"], "messages": [{"role": "user", "content": "Hi"}]}),
        _batch_line("turns", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                           {"role": "user", "content": "Again"}]}),
    ]
    path = _write(tmp_path / "batch.jsonl", rows)
    requests = read_requests(path)  # auto: the first line is a batch request
    assert [r.id for r in requests] == [row["custom_id"] for row in rows]
    a, b = requests[0], requests[1]
    assert a.error is None and a.values == {
        "generate.max_new_tokens": 5, "generate.temperature": 0, "generate.top_p": 0.5, "seed": 3, "input.fps": 1.5,
        "input.system_prompt": "Be brief.", "input.question": "What moves?", "input.kind": "video",
        "input.video_path": str(video),
    }
    assert b.values == {"generate.max_new_tokens": 2, "input.question": "Hi"}
    errors = {r.id: r.error for r in requests[2:]}
    assert "line 3: body.messages[0].content[0].video_url.url='https://example.com/v.mp4': remote videos" in errors["remote"]
    assert "line 4: body.messages[0].content[0]: images are not supported" in errors["image"]
    assert "line 5: body.messages[0].content[1]: one video per request" in errors["two"]
    assert "line 6: body.n=2: not supported" in errors["n2"]
    assert "line 7: body.stop: not supported" in errors["stop"]
    assert "line 8: body.messages[1].role='assistant'" in errors["turns"]
    planned = plan_requests(requests[2:], CONFIG, [])
    assert [p.error for p in planned] == list(errors.values()) and all(p.resolve()[0] is None for p in planned)
    # the same objects through the Python API's entry, and the dotted dialect chosen explicitly
    assert [r.values for r in requests_from_objects(rows[:2])] == [a.values, b.values]
    with pytest.raises(ConfigError, match=r"requests\[0\]: id: every request needs"):
        requests_from_objects(rows[:1], "dotted")


@pytest.mark.parametrize("bad, message", [
    ({"custom_id": "", "url": CHAT, "body": {}}, "line 2: custom_id: every request needs a non-empty string"),
    ({"custom_id": "x", "method": "GET", "url": CHAT, "body": {}}, "line 2: method: only \"POST\""),
    ({"custom_id": "x", "url": "/v1/embeddings", "body": {}}, "line 2: url: apbv infer answers '/v1/chat/completions'"),
    ({"custom_id": "x", "url": CHAT, "body": []}, "line 2: body: must be an object"),
    ({"custom_id": "a", "url": CHAT, "body": {}}, "line 2: custom_id: duplicate id 'a' (first on line 1)"),
])
def test_a_line_that_is_no_batch_request_is_a_file_error_naming_line_and_field(tmp_path, bad, message):
    first = _batch_line("a", {"messages": [{"role": "user", "content": "Hi"}]})
    path = _write(tmp_path / "batch.jsonl", [first, bad])
    with pytest.raises(ConfigError) as err:
        read_requests(path, "openai")
    assert message in str(err.value) and str(path) in str(err.value)


def test_output_lines_have_the_batch_output_shape_and_resume_by_custom_id(tmp_path):
    answer = {"id": "a", "prompt_tokens": 7, "generated_ids": [1, 2, 3], "generated_text": "xyz",
              "finish_reason": "length"}
    line = openai_record(answer, "tiny", created=5)
    assert line == {
        "id": output_id("a"), "custom_id": "a", "error": None,
        "response": {"status_code": 200, "request_id": "req_" + output_id("a")[10:], "body": {
            "id": "chatcmpl-" + output_id("a")[10:], "object": "chat.completion", "created": 5, "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "xyz"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}},
    }
    failed = openai_record({"id": "b", "error": "body.n=2: not supported"}, "tiny")
    assert failed == {"id": output_id("b"), "custom_id": "b", "response": None,
                      "error": {"code": "invalid_request", "message": "body.n=2: not supported"}}
    out = _write(tmp_path / "answers.jsonl", [line, failed])
    assert recover_answers(out) == {"a", "b"}


# ---------------------------------------------------------------------------------------------- 2 CPU ranks


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A byte-level tokenizer folder and a 2 s video (16 frames at 8 fps)."""
    from test_chat_prompt import byte_tokenizer

    from megatron_apbv.models.video import synthetic_video, write_video

    folder = tmp_path_factory.mktemp("interop")
    byte_tokenizer().save_pretrained(folder / "tokenizer")
    # mpeg4: the same bytes every time (libx264 through PyAV encodes the same frames differently from run to run,
    # and the tiny random model's answers, which the lmms-eval test needs non-empty, follow the pixels)
    write_video(folder / "clip.mp4", synthetic_video(16, 56, 56, seed=5), fps=8, codec="mpeg4")
    return folder


def _job_overrides(media):
    return ["apbv.variant=exact", "model.init_std=0.3", "model.vocab_size=300", f"model.tokenizer={media / 'tokenizer'}",
            "parallel.timeout_seconds=60", *TINY_VISION]


def _requests_both_ways(media):
    video = media / "clip.mp4"
    user = [{"type": "video_url", "video_url": {"url": f"file://{video}"}}, {"type": "text", "text": "What moves?"}]
    batch = [
        _batch_line("v", {"max_tokens": 5, "seed": 3, "mm_processor_kwargs": {"fps": 2},
                          "messages": [{"role": "system", "content": "Watch."}, {"role": "user", "content": user}]}),
        _batch_line("remote", {"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "http://host/v.mp4"}}]}]}),
        _batch_line("t", {"max_tokens": 4, "messages": [{"role": "user", "content": "Say something."}]}),
        _batch_line("s", {"max_tokens": 3, "temperature": 0.8, "top_p": 0.9, "seed": 11, "messages": [
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(video)}},
                                         {"type": "text", "text": "Colours?"}]}]}),
    ]
    # the same requests as a user writes them in the dotted dialect (no remote video there)
    dotted = [
        {"id": "v", "generate.max_new_tokens": 5, "seed": 3, "input.fps": 2, "input.system_prompt": "Watch.",
         "input.kind": "video", "input.video_path": str(video), "input.question": "What moves?"},
        {"id": "t", "generate.max_new_tokens": 4, "input.question": "Say something."},
        {"id": "s", "generate.max_new_tokens": 3, "generate.temperature": 0.8, "generate.top_p": 0.9, "seed": 11,
         "input.kind": "video", "input.video_path": str(video), "input.question": "Colours?"},
    ]
    return batch, dotted


def _infer(world, requests, output, *options):
    procs = spawn(world, lambda rank: ["infer", CONFIG, "--requests", str(requests), "--output", str(output),
                                       *options])
    results = collect(procs, STARTUP + 120)
    assert all(rc == 0 for rc, _, _ in results), show(results)
    return results


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


API_SCRIPT = """
import json, sys
from megatron_apbv.jobs.request_engine import RequestEngine
args = json.loads(sys.argv[1])
engine = RequestEngine.load(args["config"], args["overrides"], vision=True)
dotted = engine.generate(args["dotted"])
openai = engine.generate(args["batch"], output_format="openai")
import torch.distributed as dist
if dist.get_rank() == 0:
    print(json.dumps({"dotted": dotted, "openai": openai}))
engine.close()
"""


def test_openai_round_trip_equals_the_dotted_run_and_the_python_api_equals_the_cli(tmp_path, media):
    batch, dotted = _requests_both_ways(media)
    job = _job_overrides(media)
    _infer(2, _write(tmp_path / "dotted.jsonl", dotted), tmp_path / "dotted_answers.jsonl", *job)
    _infer(2, _write(tmp_path / "batch.jsonl", batch), tmp_path / "batch_answers.jsonl", "--output-format", "openai",
           *job)
    reference = {r["id"]: r for r in _lines(tmp_path / "dotted_answers.jsonl")}
    assert set(reference) == {"v", "t", "s"} and not any("error" in r for r in reference.values())
    assert len({tuple(r["generated_ids"]) for r in reference.values()}) == 3  # distinct answers: a real check
    out = {r["custom_id"]: r for r in _lines(tmp_path / "batch_answers.jsonl")}
    assert set(out) == {"v", "remote", "t", "s"}
    assert out["remote"]["response"] is None and "remote videos (http://)" in out["remote"]["error"]["message"]
    for rid, ref in reference.items():
        body = out[rid]["response"]["body"]
        assert out[rid]["error"] is None and out[rid]["id"] == output_id(rid)
        assert body["choices"][0]["message"]["content"] == ref["generated_text"]
        assert body["choices"][0]["finish_reason"] == ref["finish_reason"]
        assert body["usage"] == {"prompt_tokens": ref["prompt_tokens"], "completion_tokens": len(ref["generated_ids"]),
                                 "total_tokens": ref["prompt_tokens"] + len(ref["generated_ids"])}

    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    arg = json.dumps({"config": CONFIG, "overrides": job, "dotted": dotted, "batch": batch})
    from distributed_utils import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), arg], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env=clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=str(port), PYTHONPATH=str(ROOT)))
             for r in range(2)]
    results = collect(procs, STARTUP + 120)
    assert all(rc == 0 for rc, _, _ in results), show(results)
    api = json.loads(results[0][1].strip().splitlines()[-1])
    assert [r["id"] for r in api["dotted"]] == ["v", "t", "s"]
    for record in api["dotted"]:
        ref = dict(reference[record["id"]])
        # the time differs, and only the answer file's records carry the job's fingerprint
        assert {k: v for k, v in record.items() if k != "seconds"} == {
            k: v for k, v in ref.items() if k not in ("seconds", "fingerprint")}

    def strip(line):  # the time of the answer, and where an error was found (a list item, a file line), differ
        line = {k: v for k, v in line.items() if k != "fingerprint"}
        if line["error"] is not None:
            return {**line, "error": {**line["error"], "message": line["error"]["message"].split(": ", 1)[1]}}
        body = {k: v for k, v in line["response"]["body"].items() if k != "created"}
        return {**line, "response": {**line["response"], "body": body}}

    assert [strip(line) for line in api["openai"]] == [strip(out[row["custom_id"]]) for row in batch]


# ---------------------------------------------------------------------------------------------- metrics


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            base, _, labels = name.partition("{")
            if labels:  # label order is the exporter's: key them sorted
                name = base + "{" + ",".join(sorted(labels.rstrip("}").split(","))) + "}"
            values[name] = float(value)
    return values


def test_metrics_endpoint_scraped_while_the_job_is_paused_mid_way(tmp_path):
    pytest.importorskip("prometheus_client")  # the [metrics] extra (in [test])
    rows = [{"id": f"r{i}", "input.video_frames": 1 + i % 5, "generate.max_new_tokens": 6} for i in range(40)]
    rows[3] = {"id": "bad", "input.video_frames": -1}
    requests = _write(tmp_path / "requests.jsonl", rows)
    output = tmp_path / "answers.jsonl"
    procs = spawn(2, lambda rank: ["infer", CONFIG, "--requests", str(requests), "--output", str(output),
                                   "--metrics-port", "0", "--pipeline", "serial", "parallel.timeout_seconds=120"])
    try:
        port, err_seen = None, ""
        end = time.monotonic() + STARTUP
        while port is None and time.monotonic() < end:  # rank 0 names its port on stderr
            line = procs[0].stderr.readline()
            err_seen += line
            found = re.search(r"Prometheus metrics on port (\d+)", line)
            port = int(found.group(1)) if found else None
            assert line or procs[0].poll() is None, err_seen
        assert port is not None, err_seen
        while time.monotonic() < end and (not output.exists() or len(output.read_text().splitlines()) < 5):
            time.sleep(0.01)
        os.kill(procs[1].pid, signal.SIGSTOP)  # rank 0 now waits in its next collective: the counts stand still
        try:
            previous, metrics = None, _scrape(port)
            while metrics != previous:
                time.sleep(0.3)
                previous, metrics = metrics, _scrape(port)
            records = _lines(output)
        finally:
            os.kill(procs[1].pid, signal.SIGCONT)
    except BaseException:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        raise
    results = collect(procs, 120)
    assert all(rc == 0 for rc, _, _ in results), show(results)
    # off a terminal rank 0's progress is plain lines (one per jobs.progress_seconds, and the last one)
    assert re.search(r"^apbv infer: 40/40 done, errors 1 \| [0-9.]+ req/s \| [0-9.]+ tok/s \| ETA 0s",
                     results[0][2], re.M), results[0][2][-2000:]
    assert "done, errors" not in results[1][2]
    answered = [r for r in records if "error" not in r]
    assert 5 <= len(records) < 40  # scraped in the middle of the job
    assert metrics["apbv_requests_total"] == len(answered)
    assert metrics["apbv_request_errors_total"] == len(records) - len(answered) == 1
    assert metrics["apbv_generated_tokens_total"] == sum(len(r["generated_ids"]) for r in answered)
    assert metrics["apbv_requests_pending"] == 40 - len(records)
    for stage in ("vision", "prefill", "decode"):
        count = metrics[f'apbv_stage_seconds_count{{stage="{stage}"}}']
        assert count == metrics[f'apbv_stage_seconds_bucket{{le="+Inf",stage="{stage}"}}'] == len(answered)
        assert metrics[f'apbv_stage_seconds_sum{{stage="{stage}"}}'] == pytest.approx(
            sum(r["seconds"][stage] for r in answered), abs=1e-4 * len(answered))
    final = _lines(output)
    assert len(final) == 40
