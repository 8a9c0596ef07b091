"""The CPU thread rule: one thread for small models, the idle cores for large ones, OMP_NUM_THREADS wins."""

from __future__ import annotations

import torch

from qlora.cpu_threads import SMALL_HIDDEN, apply_cpu_threads, choose_cpu_threads


def test_small_models_use_one_thread_large_ones_the_idle_cores():
    assert choose_cpu_threads(128, cores=16, load=0.0) == 1
    assert choose_cpu_threads(SMALL_HIDDEN - 1, cores=16, load=0.0) == 1
    assert choose_cpu_threads(4096, cores=8, load=1.0) == 8  # only this process: every core
    assert choose_cpu_threads(4096, cores=8, load=5.0) == 4  # four cores busy elsewhere
    assert choose_cpu_threads(4096, cores=2, load=12.0) == 1  # an overloaded machine
    assert choose_cpu_threads(4096, cores=2, load=0.2) == 2


def test_apply_sets_torch_threads_unless_omp_num_threads_is_given(monkeypatch):
    class Config:
        hidden_size = 64

    class Model:
        config = Config()

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert apply_cpu_threads(Model(), "cpu") is None and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert apply_cpu_threads(Model(), "cuda") is None and torch.get_num_threads() == 2
        assert apply_cpu_threads(Model(), "cpu") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
