"""Test-wide set-up. Triton's interpreter is chosen when a kernel is *defined*, so it must be
switched on before any kernel module is imported: here, before the tests are collected."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
