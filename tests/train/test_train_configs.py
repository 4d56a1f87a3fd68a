"""Every shipped config validates; the literature's task orders; the CPU config reads the shared sample."""

from pathlib import Path

import pytest

from clsvd_jax import config as C
from clsvd_jax.data import parse_task_specs

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared" / "data"
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))

ORDERS = {
  1: ["dbpedia", "amazon", "yelp", "agnews"],
  2: ["dbpedia", "amazon", "agnews", "yelp"],
  3: ["yelp", "amazon", "agnews", "dbpedia"],
}


def test_configs_exist():
  names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
  assert {"demo.yaml", "cpu_small.yaml", "llama/llama2_7b_order1.yaml", "llama/llama31_8b_order1.yaml"} <= names
  assert {f"t5_large/order{i}.yaml" for i in range(1, 7)} <= names
  assert {"trace/llama2_7b_chat.yaml", "trace/llama31_8b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
  cfg = C.load_config(path)
  specs = parse_task_specs(cfg.tasks)
  assert len(specs) in (4, 8, 15)  # CL_Benchmark orders, TRACE, the long order
  assert cfg.method in ("osft", "seqft", "mtl")


@pytest.mark.parametrize("order", range(1, 7))
def test_t5_large_orders(order):
  cfg = C.load_config(REPO / "configs" / "t5_large" / f"order{order}.yaml", ["data_dir=/data/x"])
  names = [t["name"] for t in cfg.tasks]
  if order in ORDERS:
    assert names == ORDERS[order]
  else:
    assert len(names) == 15 and len(set(names)) == 15
    assert {"MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "SST-2", "MultiRC", "yahoo"} <= set(names)
  assert cfg.data_dir == "/data/x"
  assert cfg.optimizer.lr == pytest.approx(1e-5) and cfg.training.batch_size == 8


@pytest.mark.skipif(not (SHARED / "cl_benchmark").is_dir(), reason="../shared/data (the benchmark sample) is absent")
def test_cpu_config_reads_the_shared_sample():
  from clsvd_jax.train import runner

  cfg = C.load_config(REPO / "configs" / "cpu_small.yaml", ["tasks.0.max_train=8", "tasks.0.max_eval=4"])
  p = runner.prepare(cfg)
  assert p.names == ORDERS[1]
  assert len(p.train_splits[0]) == 8 and len(p.eval_splits[0]) == 4
  assert all(len(e.prompt_ids) <= 512 for s in p.train_splits for e in s.examples)
