"""Test-wide set-up. Triton's interpreter is chosen when a kernel is *defined*, so it must be
switched on before any kernel module is imported: here, before the tests are collected."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread: the tests run small ops, where a second OpenMP thread gains little and, on a
# machine shared with other work, spin-waiting threads made them up to 100x slower.
torch.set_num_threads(1)
