"""Pipeline: the README's three-line example on a tiny run, the seed convention checked against
torch.randn on CPU generators, input cycling, negative prompts, sampler options passed through,
and `import ldm_fast` staying cheap."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export_helpers import CAPTIONS, class_run_dir, text_run_dir
from ldm_fast.pipeline import Pipeline

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_lines() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    code = _python_api_lines()
    assert len(code.strip().splitlines()) == 3
    run = re.search(r'from_run_dir\("([^"]+)"\)', code).group(1)
    (tmp_path / run).parent.mkdir(parents=True)
    (tmp_path / run).symlink_to(text_run_dir())
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    images = scope["images"]
    assert len(images) == 4 and images[0].size == (16, 16) and images[0].mode == "RGB"


class _Recorder:
    """A denoiser that records the first latent it sees and predicts zero noise."""

    def __init__(self):
        self.first = None

    def __call__(self, x, t, cond=None):
        if self.first is None:
            self.first = x.clone()
        return torch.zeros_like(x)


def test_initial_noise_comes_from_cpu_generators_seeded_per_image():
    base = Pipeline.from_run_dir(class_run_dir(), device="cpu")
    rec = _Recorder()
    pipe = Pipeline(base.cfg, base.schedule, rec, lambda z: z[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2),
                    base.conditioner)
    pipe(class_labels=[1, 2, 3], seed=10, steps=2, guidance=1.0, progress=False)
    shape = (base.latent_channels, 8, 8)
    want = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)])
    assert torch.equal(rec.first, want)


def test_seed_plus_index_reproduces_an_image_at_any_batch_size():
    pipe = Pipeline.from_run_dir(class_run_dir(), device="cpu")
    kw = dict(steps=3, guidance=2.0, progress=False)
    batch = pipe(class_labels=[4, 5, 6], seed=3, batch_size=2, **kw)
    alone = pipe(class_labels=[6], seed=5, **kw)
    torch.testing.assert_close(batch.images[2], alone.images[0], atol=1e-5, rtol=0)
    assert batch.seeds == [3, 4, 5] and [m["class_label"] for m in batch.metadata] == [4, 5, 6]


def test_fewer_inputs_cycle_and_more_are_refused():
    pipe = Pipeline.from_run_dir(text_run_dir(), device="cpu")
    out = pipe(prompt=CAPTIONS[:2], n=4, steps=2, progress=False)
    assert [m["prompt"] for m in out.metadata] == [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], CAPTIONS[1]]
    assert len(out.pil) == 4 and not torch.equal(out.images[0], out.images[2])
    with pytest.raises(ValueError, match="3 given for n = 2"):
        pipe(prompt=CAPTIONS[:3], n=2, steps=2, progress=False)


def test_negative_prompt_replaces_the_empty_null_prompt():
    base = Pipeline.from_run_dir(text_run_dir(), device="cpu")
    seen = []

    def denoiser(x, t, cond=None):
        seen.append(cond["context"].clone())
        return torch.zeros_like(x)

    pipe = Pipeline(base.cfg, base.schedule, denoiser, base.decode, base.conditioner)
    kw = dict(prompt=CAPTIONS[0], n=1, steps=1, guidance=3.0, progress=False)
    encode = base.conditioner.encode_inputs
    out = pipe(negative_prompt=CAPTIONS[2], **kw)
    # The guided call stacks [uncond; cond]: uncond is the negative prompt's encoding.
    torch.testing.assert_close(seen[-1][0], encode(prompts=[CAPTIONS[2]])[0]["context"][0])
    torch.testing.assert_close(seen[-1][1], encode(prompts=[CAPTIONS[0]])[0]["context"][0])
    assert out.metadata[0]["negative_prompt"] == CAPTIONS[2]
    pipe(**kw)
    torch.testing.assert_close(seen[-1][0], encode(prompts=[""])[0]["context"][0])


def test_sampler_options_pass_through_and_defaults_apply():
    pipe = Pipeline.from_run_dir(class_run_dir(), device="cpu")
    kw = dict(class_labels=[1], steps=3, progress=False)
    default = pipe(**kw)
    assert default.metadata[0]["guidance"] == 3.0 and default.metadata[0]["sampler"] == "ddim"
    assert not torch.allclose(pipe(spacing="trailing", **kw).images, default.images)
    with pytest.raises(ValueError, match="takes no 'order'"):
        pipe(order=2, **kw)
    with pytest.raises(ValueError, match="multiples"):
        pipe(height=9, **kw)


def test_import_ldm_fast_is_cheap():
    code = "import sys, ldm_fast; assert 'torch' not in sys.modules and 'triton' not in sys.modules; " \
           "assert ldm_fast.Pipeline.__name__ == 'Pipeline'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bf16_unet_with_an_fp32_first_stage_tracks_fp32():
    kw = dict(class_labels=[1, 2], steps=2, guidance=2.0, progress=False)
    ref = Pipeline.from_run_dir(class_run_dir(), device="cpu")(**kw).images
    bf16 = Pipeline.from_run_dir(class_run_dir(), device="cpu", dtype=torch.bfloat16)
    assert next(bf16.model.unet.parameters()).dtype == torch.bfloat16
    assert next(bf16.model.first_stage.parameters()).dtype == torch.float32
    out = bf16(**kw).images
    assert out.dtype == torch.float32 and 0 < (out - ref).abs().max() < 0.1


def test_sampling_progress_in_a_log_is_a_plain_line(capsys):
    """stderr is not a terminal under pytest: progress is a line, not carriage returns."""
    Pipeline.from_run_dir(class_run_dir(), device="cpu")(class_labels=[1, 2], n=4, batch_size=2, steps=3)
    err = capsys.readouterr().err
    assert "\r" not in err and err.strip().splitlines()[-1].startswith("sampling 4 (ddim 3): 6/6")


def test_eager_sampling_without_triton(tmp_path):
    """An eager-only install (no Triton) samples through the Pipeline and never imports it."""
    code = f"""
import sys
sys.modules['triton'] = None  # as if not installed (import fails, find_spec returns None)
import ldm_fast
pipe = ldm_fast.Pipeline.from_run_dir({str(text_run_dir())!r}, kernels="auto")
out = pipe(prompt="a red circle", n=2, steps=2)
assert out.images.shape[0] == 2 and sys.modules['triton'] is None
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_cuda_graph_option_wraps_the_denoiser_and_falls_back_on_cpu():
    """cuda_graph=True routes every step through one CUDAGraphDenoiser (kept across calls);
    on CPU it falls back to the eager step with one line, and the images do not change."""
    from ldm_fast.cuda_graph import CUDAGraphDenoiser

    pipe = Pipeline.from_run_dir(text_run_dir(), device="cpu")
    plain = pipe(prompt="a red circle", n=2, steps=2, progress=False).images
    pipe.cuda_graph = True
    assert isinstance(pipe._denoiser(), CUDAGraphDenoiser) and pipe._denoiser() is pipe._denoiser()
    with pytest.warns(UserWarning):
        graphed = pipe(prompt="a red circle", n=2, steps=2, progress=False).images
    assert torch.equal(plain, graphed)
