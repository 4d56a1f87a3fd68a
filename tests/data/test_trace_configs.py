"""The TRACE configs: the 8 tasks in TRACE's order with TRACE's training settings, and their task paths read by the
TRACE JSON reader from a folder laid out as the configs' comments say (a fake release in a temporary folder)."""

import json
from pathlib import Path

import pytest

from clsvd_jax import config as C
from clsvd_jax.data import build_prompt, load_tasks, parse_task_specs

REPO = Path(__file__).resolve().parents[2]
TRACE_ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]


@pytest.mark.parametrize("name", ["llama2_7b_chat", "llama31_8b"])
def test_trace_config_reads_a_trace_release(name, tmp_path):
  for i, task in enumerate(TRACE_ORDER):
    folder = tmp_path / "TRACE" / task
    folder.mkdir(parents=True)
    for split, n in (("train", 3), ("eval", 2), ("test", 2)):
      recs = [{"prompt": f"{task} {split} {j}\nAnswer:", "answer": f"{i}-{j}"} for j in range(n)]
      (folder / f"{split}.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
  cfg = C.load_config(REPO / "configs" / "trace" / f"{name}.yaml", [f"data_dir={tmp_path}"])
  assert [t["name"] for t in cfg.tasks] == TRACE_ORDER
  assert cfg.optimizer.lr == pytest.approx(1e-5) and cfg.optimizer.weight_decay == 0.0
  assert cfg.optimizer.schedule == "cosine" and cfg.training.seed == 1234
  assert cfg.training.batch_size == 128 and cfg.training.max_length == 1536
  assert cfg.training.max_target_length == 512 and cfg.method == "osft"
  datas = load_tasks(parse_task_specs(cfg.tasks), base_dir=cfg.data_dir)
  assert [d.task.name for d in datas] == TRACE_ORDER
  for d in datas:
    assert len(d.train) == 3 and len(d.eval) == 2 and d.task.splits == {"train": "train", "eval": "test"}
    # The prompt is the record's prompt itself (TRACE prompts carry their instruction).
    assert build_prompt(d.task, d.eval[1]) == f"{d.task.name} test 1\nAnswer:"
