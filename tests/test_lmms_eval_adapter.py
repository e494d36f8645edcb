"""lmms-eval through the APB-V engine: ``python -m lmms_eval --model apbv`` on 2 CPU ranks, a local video task
built here (no download), lmms-eval's own prompts and exact-match scoring.

The model id comes from the package's ``lmms_eval.models`` entry point: the test puts a dist-info with
setup.py's entry point on the path, as an installed megatron-apbv[eval] has. The expected score is
independent of lmms-eval: ``apbv infer`` answers the same questions; half the documents' targets are
those answers, half are not, so the score is 0.5 exactly when lmms-eval got our answers in the right place.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_utils import free_port
from rank_processes import CONFIG, ROOT, STARTUP, clean_env, collect, show, spawn
from test_jobs_interop import TINY_VISION, media  # noqa: F401 (the fixture)

pytest.importorskip("lmms_eval.evaluator")  # the [eval] extra

TASK_YAML = """task: apbv_toy_video
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: !function toy_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """def doc_to_visual(doc):
    return [doc["video"]] if doc["video"] else []


def doc_to_text(doc):
    return "Q: " + doc["question"]
"""


def _entry_point_dist(folder: Path) -> Path:
    """A dist-info that declares setup.py's lmms_eval.models entry point (what pip install writes)."""
    setup = (ROOT / "setup.py").read_text()
    entry = re.search(r'"lmms_eval\.models": \["([^"]+)"\]', setup).group(1)
    dist = folder / "megatron_apbv_entry-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: megatron-apbv-entry\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\n{entry}\n")
    return folder


def test_lmms_eval_scores_a_local_video_task_with_the_apbv_model(tmp_path, media):  # noqa: F811
    video = str(media / "clip.mp4")
    docs = [{"question": "What moves?", "video": video}, {"question": "Say hi.", "video": ""},
            {"question": "Which colour?", "video": video}, {"question": "Count.", "video": ""}]
    overrides = ["apbv.variant=exact", "model.init_std=0.3", "model.vocab_size=300",
                 f"model.tokenizer={media / 'tokenizer'}", "parallel.timeout_seconds=60", *TINY_VISION]
    # the reference: apbv infer's answers to the questions lmms-eval will ask (its doc_to_text, 4 new tokens)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"id": str(i), "input.question": "Q: " + d["question"],
                                            "generate.max_new_tokens": 4,
                                            **({"input.kind": "video", "input.video_path": d["video"]}
                                               if d["video"] else {})}) + "\n" for i, d in enumerate(docs)))
    answers = tmp_path / "answers.jsonl"
    results = collect(spawn(2, lambda r: ["infer", CONFIG, "--requests", str(requests), "--output", str(answers),
                                          *overrides]), STARTUP + 120)
    assert all(rc == 0 for rc, _, _ in results), show(results)
    texts = {r["id"]: r["generated_text"].split("\n\n", 1)[0] for r in map(json.loads, answers.read_text().splitlines())}
    assert all(texts.values())
    for i, doc in enumerate(docs):
        doc["answer"] = texts[str(i)] if i < 2 else texts[str(i)] + " (not the answer)"
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "docs.json").write_text(json.dumps(docs))
    (task_dir / "toy.yaml").write_text(TASK_YAML.format(docs=task_dir / "docs.json"))
    (task_dir / "toy_utils.py").write_text(TASK_UTILS)

    site = _entry_point_dist(tmp_path / "site")
    model_args = f"config={CONFIG},overrides={';'.join(overrides)}"
    env_path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    out = tmp_path / "results"
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lmms_eval", "--model", "apbv", "--model_args", model_args, "--tasks", "apbv_toy_video",
         "--include_path", str(task_dir), "--batch_size", "1", "--output_path", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      PYTHONPATH=env_path, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
        for r in range(2)]
    results = collect(procs, STARTUP + 180)
    assert all(rc == 0 for rc, _, _ in results), show(results)
    files = list(out.rglob("*results*.json"))
    assert files, show(results)
    scores = json.loads(files[0].read_text())["results"]["apbv_toy_video"]
    assert scores["exact_match,none"] == pytest.approx(0.5)
