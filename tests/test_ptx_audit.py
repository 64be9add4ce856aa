"""Every kernel compiled for sm_90 on this CPU-only machine, held to the PTX-level rules of
kernels/ptx_audit.py (no spills, 128-bit loads, cp.async, wgmma) — and proof that the rules
catch the regressions they exist for.

The audit compiles for real, so it runs in a subprocess without TRITON_INTERPRET (conftest
sets it for this process, and interpreted kernels cannot be compiled)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ldm_fast.kernels import ptx_audit as pa

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is present: the GPU tests run the real kernels")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)


def test_every_kernel_passes_the_sm90_audit(tmp_path):
    """The quick audit: every attention candidate at head dim 40 (fp16, self and 77-token
    cross), the default config elsewhere (bf16, fp32, head dims 80/160), GroupNorm at VAE and
    UNet sizes in both memory formats, and the sampler-step kernel."""
    out = tmp_path / "audit.json"
    r = _run("import sys; from ldm_fast.kernels import ptx_audit as pa; "
             f"sys.exit(pa.main(['--quick', '--json', {str(out)!r}]))")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {x["kernel"] for x in rows}
    assert {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel",
            "_gn_fwd_kernel", "_gn_bwd_dx_kernel", "_gn_fwd_single_kernel",
            "_sampler_step_kernel", "_geglu_fwd_kernel", "_geglu_bwd_kernel",
            "_add_ln_fwd_kernel", "_add_ln_bwd_kernel"} <= kernels
    d40 = [x for x in rows if "d40" in x["case"] and x["dtype"] == "float16"
           and x["kernel"] == "_attn_fwd_kernel"]
    # every autotune candidate of the forward at d40, each with wide loads and cp.async
    from ldm_fast.kernels import attention as at
    assert len({x["config"] for x in d40}) == len(at._CANDIDATES[("fwd", 64)])
    assert all(x["loads_16"] == 0 and x["cp_async"] > 0 and x["wgmma"] > 0 for x in d40)


def test_audit_catches_narrow_loads_at_head_dim_40():
    """Without the stride-unit trick (ALIGN = 1) the head-dim-40 forward falls back to 16-bit
    loads and loses cp.async — the audit must fail it."""
    r = _run("""
import torch
from ldm_fast.kernels import attention as at, ptx_audit as pa
at._align = lambda *t: 1
q = pa._heads(2, 4096, 8, 40, torch.float16)
rows = pa.audit([("d40", lambda: at._attn_forward(q, q, q), (at,), True, "", True)], 1)
bad = pa.check(rows)
assert any("16-bit global loads" in b for b in bad), bad
assert any("cp.async" in b for b in bad), bad
print("caught")
""")
    assert r.returncode == 0 and "caught" in r.stdout, r.stderr[-3000:]


def _row(**kw):
    base = dict(case="c", kernel="_attn_fwd_kernel", config="cfg", dtype="float16",
                expect_wide=True, note="", mma_rows=128, warps=8, regs=128, local=0, stack=0,
                shared=0, loads=4, loads_128=4, loads_16=0, cp_async=8, tma=0, wgmma=8, mma=0)
    base.update(kw)
    return base


@pytest.mark.parametrize("change,message", [
    (dict(stack=48), "stack"),
    (dict(local=16, dtype="float32"), "local memory"),
    (dict(loads_16=3), "16-bit global loads"),
    (dict(cp_async=0), "cp.async"),
    (dict(wgmma=0, mma=12), "wgmma"),
    (dict(kernel="_gn_fwd_kernel", mma_rows=None, loads_128=0), "128-bit"),
])
def test_rules(change, message):
    assert pa.check([_row()]) == []
    bad = pa.check([_row(**change)])
    assert len(bad) == 1 and message in bad[0]


def test_rules_exempt_what_cannot_apply():
    """32-row tiles may use mma.sync; a case marked without wide loads (with its reason) and
    TMA instead of cp.async pass."""
    assert pa.check([_row(mma_rows=32, wgmma=0, mma=12)]) == []
    assert pa.check([_row(kernel="_gn_fwd_kernel", mma_rows=None, loads_128=0,
                          expect_wide=False, note="known")]) == []
    assert pa.check([_row(cp_async=0, tma=4)]) == []
