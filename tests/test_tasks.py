"""Every task end to end at micro scale: presets, conditioning reaching the UNet, guidance at
scale 1 = the conditional model, bad inputs, a few joint training steps through train_ldm,
state save/load (tokenizer included), and the task metric."""

import pytest
import torch

from ldm_fast.autoencoder import build_first_stage
from ldm_fast.config import save_yaml
from ldm_fast.data.procedural import NUM_CLASSES, ProceduralShapes
from ldm_fast.generate import generate
from ldm_fast.metrics import ShapesNet
from ldm_fast.model import LatentDiffusion
from ldm_fast.run import RunDir, load_model
from ldm_fast.tasks import (
    MODES,
    SRImageGuidance,
    TASKS,
    build_conditioner,
    dataset_captions,
    evaluate_task,
    load_conditioner,
    paste_known,
    task_dataset,
    tiny_task_config,
)
from ldm_fast.training import train_ldm

RES = 16
ALL = [(t, m) for t in TASKS for m in MODES[t]]
PROMPTS = ["a large red circle on a plain background", "a large blue cross on a striped background"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, which costs ~100× on a
    loaded 2-core machine (measured: a 4×4 conv takes 0.09 ms on one thread, 10 ms on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def micro(task, mode=None, steps=3):
    """The task's tiny preset shrunk to 16² images (4×4 latents) and 32-wide networks."""
    cfg = tiny_task_config(task, mode)
    cfg.data.resolution = 16
    cfg.autoencoder.base_channels, cfg.autoencoder.resolution = 16, 16
    cfg.unet.model_channels, cfg.unet.num_head_channels = 32, 16
    cfg.conditioning.embed_dim = 32
    if cfg.unet.context_dim:
        cfg.unet.context_dim = 32
    tc = cfg.train_ldm
    tc.steps, tc.batch_size, tc.ckpt_every, tc.log_every, tc.warmup_steps = steps, 4, steps, 1, 0
    return cfg


def captions_for(cfg):
    if cfg.conditioning.task == "text" or cfg.conditioning.mode == "hybrid":
        return dataset_captions(ProceduralShapes(200, RES))
    return None


def live_model(cfg):
    """A model whose zero-initialised output layers are randomised, so that every input path
    (context, class embedding, concat) shows in the output."""
    torch.manual_seed(0)
    model = LatentDiffusion(cfg).eval()
    with torch.no_grad():
        for p in model.unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def two_inputs(task, mode):
    """Two different user inputs (batch of 2 each) for the task."""
    g = torch.Generator().manual_seed(1)
    img = lambda: torch.rand(2, 3, RES, RES, generator=g) * 2 - 1  # noqa: E731
    a, b = {}, {}
    if task == "class":
        a, b = {"classes": [0, 1]}, {"classes": [5, 29]}
    elif task == "layout":
        a = {"boxes": [[(0.1, 0.1, 0.5, 0.5, 3)], [(0.2, 0.3, 0.9, 0.8, 7), (0.0, 0.0, 0.2, 0.2, 1)]]}
        b = {"boxes": [[(0.5, 0.5, 0.9, 0.9, 12)], [(0.2, 0.3, 0.9, 0.8, 8)]]}
    elif task == "semantic":
        a = {"semantic": torch.randint(0, 31, (2, RES, RES), generator=g)}
        b = {"semantic": torch.randint(0, 31, (2, RES, RES), generator=g)}
    elif task == "sr":
        a, b = {"lr": img()[..., :4, :4]}, {"lr": img()[..., :4, :4]}
    elif task == "inpaint":
        mask = torch.zeros(2, 1, RES, RES)
        mask[..., 4:12, 4:12] = 1
        a, b = {"image": img(), "mask": mask}, {"image": img(), "mask": mask}
    if task == "text" or mode == "hybrid":
        a["prompts"], b["prompts"] = PROMPTS, PROMPTS[::-1]
        if mode == "hybrid":
            b = {**a, "prompts": PROMPTS[::-1]}  # same concat input: the prompt alone must matter
    return a, b


# ----------------------------------------------------------------------------- presets

@pytest.mark.parametrize("task, mode", ALL)
def test_presets_are_valid_and_consistent(task, mode):
    cfg = tiny_task_config(task, mode)
    assert (cfg.conditioning.task, cfg.conditioning.mode) == (task, mode)
    assert cfg.data.resolution == 32
    if mode == "adm":
        assert cfg.unet.num_classes == NUM_CLASSES + 1  # + the null class


def test_unknown_task_or_mode():
    with pytest.raises(ValueError, match="conditioning.task"):
        tiny_task_config("depth")
    with pytest.raises(ValueError, match="conditioning.mode"):
        tiny_task_config("sr", "crossattn")


def test_unet_config_must_fit_the_conditioning():
    cfg = micro("semantic")
    cfg.unet.in_channels = 3
    with pytest.raises(ValueError, match="unet.in_channels"):
        build_conditioner(cfg, LatentDiffusion(micro("unconditional")))
    cfg = micro("class", "adm")
    cfg.unet.num_classes = NUM_CLASSES
    with pytest.raises(ValueError, match="null class"):
        build_conditioner(cfg)
    cfg = micro("layout")
    cfg.unet.context_dim = 16
    with pytest.raises(ValueError, match="context_dim = 32"):
        build_conditioner(cfg)
    with pytest.raises(ValueError, match="tokenizer"):
        build_conditioner(micro("text"))  # no tokenizer file and no captions to train one


def test_layout_grid_comes_from_the_config():
    cfg = micro("layout")
    cfg.conditioning.layout_grid = 8
    encoder = build_conditioner(cfg).parts[0].encoder
    assert encoder.grid == 8 and encoder.pad_id == 64 + cfg.conditioning.num_classes
    tokens = encoder.tokenize(torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), torch.tensor([[1]]))
    assert tokens[0, :3].tolist() == [0, 63, 65]  # top-left cell, bottom-right cell, class 1


# ----------------------------------------------------------------------------- the UNet sees it

@pytest.mark.parametrize("task, mode", [tm for tm in ALL if tm[0] != "unconditional"])
def test_conditioning_reaches_the_unet(task, mode):
    cfg = micro(task, mode)
    model = live_model(cfg)
    cond = build_conditioner(cfg, model, captions_for(cfg))
    if task == "inpaint":
        cond.parts[0].concat.calibrate(torch.rand(2, 3, RES, RES) * 2 - 1)
    a, b = two_inputs(task, mode)
    ca, ua = cond.encode_inputs(**a)
    cb, _ = cond.encode_inputs(**b)
    assert (ua is not None) == cond.supports_guidance
    x, t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.full((2,), 500.0)
    with torch.no_grad():
        out_a, out_b = model(x, t, ca), model(x, t, cb)
    assert out_a.shape == (2, 3, 4, 4)
    assert (out_a - out_b).abs().amax() > 1e-4
    if ua is not None:
        with torch.no_grad():
            assert (model(x, t, ua) - out_a).abs().amax() > 1e-4  # the null condition differs too


@pytest.mark.parametrize("task, mode", [("class", "adm"), ("class", "crossattn"), ("text", "crossattn"),
                                        ("layout", "crossattn"), ("inpaint", "hybrid")])
def test_guidance_at_scale_one_is_the_conditional_model(task, mode):
    cfg = micro(task, mode)
    model = live_model(cfg)
    cond = build_conditioner(cfg, model, captions_for(cfg))
    if task == "inpaint":
        cond.parts[0].concat.calibrate(torch.rand(2, 3, RES, RES) * 2 - 1)
    c, u = cond.encode_inputs(**two_inputs(task, mode)[0])
    kw = dict(steps=3, seed=4, latent_size=cond.latent_size(c))
    plain = generate(model, 2, cond=c, **kw)
    assert torch.equal(generate(model, 2, cond=c, uncond=u, guidance=1.0, **kw), plain)
    assert not torch.allclose(generate(model, 2, cond=c, uncond=u, guidance=3.0, **kw), plain)
    # CFG evaluates [uncond; cond] in one doubled batch: each half must equal its own call.
    x, t = torch.randn(2, 3, 4, 4), torch.full((2,), 300.0)
    with torch.no_grad():
        both = model(torch.cat([x, x]), torch.cat([t, t]), {k: torch.cat([u[k], c[k]]) for k in c})
        assert torch.allclose(both[2:], model(x, t, c), atol=1e-5)
        assert torch.allclose(both[:2], model(x, t, u), atol=1e-5)


def test_null_cond_matches_the_uncond_of_encode_inputs():
    cfg = micro("class", "crossattn")
    cond = build_conditioner(cfg)
    _, u = cond.encode_inputs(classes=[3, 4])
    assert torch.equal(cond.null_cond(2)["context"], u["context"])
    with pytest.raises(ValueError, match="no null condition"):
        build_conditioner(micro("semantic")).null_cond(2)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_sampling_inputs_raise_clear_errors():
    cond = build_conditioner(micro("class", "adm"))
    with pytest.raises(ValueError, match="missing \\['classes'\\]"):
        cond.encode_inputs(prompts=["a red circle"])
    with pytest.raises(ValueError, match="unknown class id 30"):
        cond.encode_inputs(classes=[30])
    with pytest.raises(ValueError, match="batch sizes"):
        cond.encode_inputs(classes=[1, 2], n=3)
    assert cond.encode_inputs(classes=[7], n=3)[0]["class_labels"].tolist() == [7, 7, 7]

    cfg = micro("inpaint")
    inpaint = build_conditioner(cfg, LatentDiffusion(cfg))
    inpaint.parts[0].concat.calibrate(torch.zeros(1, 3, RES, RES))
    with pytest.raises(ValueError, match="does not match image size"):
        inpaint.encode_inputs(image=torch.zeros(1, 3, RES, RES), mask=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="not a multiple"):
        inpaint.encode_inputs(image=torch.zeros(1, 3, 18, 18), mask=torch.zeros(1, 1, 18, 18))

    sr = build_conditioner(micro("sr"))
    assert sr.latent_size(sr.encode_inputs(lr=torch.zeros(1, 3, 8, 8))[0]) == (8, 8)  # 2× the trained size

    semantic = build_conditioner(micro("semantic"))
    with pytest.raises(ValueError, match="outside the configured range"):
        semantic.encode_inputs(semantic=torch.full((RES, RES), 40))

    layout = build_conditioner(micro("layout"))
    with pytest.raises(ValueError, match="outside the image"):
        layout.encode_inputs(boxes=[(0.5, 0.5, 1.5, 0.9, 2)])


def test_paste_known_keeps_unmasked_pixels():
    image, samples = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    out = paste_known(samples, image, mask)
    assert out[..., :2, :].eq(1).all() and out[..., 2:, :].eq(0).all()


def test_task_datasets_add_the_pairs():
    base = ProceduralShapes(2, RES)
    assert task_dataset(micro("sr"), base)[0]["lr"].shape == (3, 4, 4)
    item = task_dataset(micro("inpaint"), base)[0]
    assert item["mask"].shape == (1, RES, RES) and item["masked_image"].shape == (3, RES, RES)
    assert task_dataset(micro("class"), base) is base


# ----------------------------------------------------------------------------- train, reload, evaluate

@pytest.mark.parametrize("task, mode", [(t, MODES[t][0]) for t in TASKS] + [("inpaint", "hybrid"),
                                                                            ("class", "crossattn")])
def test_task_trains_reloads_and_evaluates(task, mode, tmp_path):
    cfg = micro(task, mode)
    run = RunDir(tmp_path)
    first_stage = build_first_stage(cfg.autoencoder).eval()
    train_set = task_dataset(cfg, ProceduralShapes(8, RES))
    cond = build_conditioner(cfg, first_stage, captions_for(cfg), run_dir=run.path)
    before = {k: v.clone() for k, v in cond.state_dict().items()}
    model, _ = train_ldm(cfg, run, first_stage, train_set, progress=False, conditioner=cond)
    after = cond.state_dict()
    # Trained jointly: every weight moved (zero-initialised UNet outputs pass gradients to τθ
    # from the third step on).
    unchanged = [k for k in after if k.endswith("weight") and torch.equal(before[k], after[k])]
    assert not unchanged
    if task == "inpaint":
        assert all(torch.isfinite(v) for k, v in after.items() if k.endswith("latent_scale"))

    # Reload as sampling does: config + first stage + ldm.safetensors (+ tokenizer.json).
    save_yaml(cfg, run.path / "config.yaml")
    run.save_first_stage(first_stage, cfg)
    loaded, state = load_model(run.path)
    reloaded = load_conditioner(run.path, loaded, state)
    assert (run.path / "tokenizer.json").is_file() == (cond.tokenizer is not None)
    inputs = two_inputs(task, mode)[0]
    if inputs:
        c1, _ = cond.eval().encode_inputs(**inputs)
        c2, _ = reloaded.encode_inputs(**inputs)
        assert c1.keys() == c2.keys() and all(torch.allclose(c1[k], c2[k], atol=1e-6) for k in c1)

    torch.manual_seed(0)
    net = ShapesNet(5, 6, width=4, work_res=RES).eval()  # untrained: checks the plumbing, not quality
    res = evaluate_task(loaded, reloaded, ProceduralShapes(2, RES, start=100), n=2, steps=2, net=net,
                        batch_size=2, photos=task == "sr", sr_guidance=1.0 if task == "sr" else 0.0)
    expected = {"unconditional": "FD-shapes", "class": "accuracy_guided", "text": "agreement_guided",
                "layout": "box_accuracy_guided", "semantic": "miou", "sr": "photo_psnr",
                "inpaint": "l1_masked"}[task]
    assert expected in res and res["task"] == task
    if task == "sr":
        assert res["psnr_image_guided"] != res["psnr"]  # image guidance changed the samples
        assert {"grid_ratio", "grid_ratio_target", "photo_grid_ratio", "grid_ratio_image_guided"} <= set(res)
        assert "grid_ratio_target_image_guided" not in res


def test_text_task_with_a_frozen_pretrained_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "large", "red", "blue", "circle", "cross"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path))
    bert = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(bert).save_pretrained(str(tmp_path))
    cfg = micro("text")
    cfg.conditioning.pretrained_text_encoder = str(tmp_path)
    model = live_model(cfg)
    cond = build_conditioner(cfg, model)
    assert cond.module is None and cond.tokenizer is None  # frozen: not trained, not saved
    c, u = cond.encode_inputs(prompts=PROMPTS)
    assert c["context"].shape == (2, cfg.conditioning.max_length, 32)
    with torch.no_grad():
        assert not torch.allclose(model(torch.zeros(2, 3, 4, 4), torch.full((2,), 9.0), c),
                                  model(torch.zeros(2, 3, 4, 4), torch.full((2,), 9.0), u))


def test_latent_cache_batches_without_images():
    """A latent-cache batch carries 'latent' and the annotations, not the pixels."""
    semantic = build_conditioner(micro("semantic"))
    seg = torch.randint(0, 31, (2, RES, RES))
    assert semantic({"latent": torch.zeros(2, 3, 4, 4), "segmentation": seg})["concat"].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="does not match the image size"):
        semantic({"latent": torch.zeros(2, 3, 8, 8), "segmentation": seg})
    cls = build_conditioner(micro("class", "adm"))
    out = cls({"latent": torch.zeros(3, 3, 4, 4), "label": torch.tensor([1, 2, 3])}, torch.Generator())
    assert out["class_labels"].shape == (3,)


class _ZeroData(LatentDiffusion):
    """A model of data that is all zeros: ε = x_t / √(1 − ᾱ_t), so x̂0 = 0 at every step."""

    def forward(self, x, t, cond=None):
        a = self.schedule.gather(self.schedule.alphas_cumprod, t.long(), x)
        return x / (1 - a).sqrt()


def test_sr_image_guidance_pulls_samples_toward_the_low_res_input():
    cfg = micro("sr")
    cfg.autoencoder.kind, cfg.diffusion.scale_by_std = "identity", False  # f = 1: D is the identity
    model = _ZeroData(cfg).eval()
    cond = build_conditioner(cfg, model)
    lr = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8
    c, _ = cond.encode_inputs(lr=lr)  # on the 16×16 pixel grid (f = 1, ×4)
    kw = dict(steps=10, seed=0, cond=c, latent_size=cond.latent_size(c))

    def lr_error(images):
        down = torch.nn.functional.interpolate(images, size=(4, 4), mode="bicubic", antialias=True,
                                               align_corners=False)
        return float((down - lr).pow(2).mean())

    plain = generate(model, 2, **kw)
    assert plain.abs().max() < 1e-4  # the model alone ignores y
    guided = generate(SRImageGuidance(model, lr, scale=1.0), 2, **kw)
    assert lr_error(guided) < 0.25 * lr_error(plain)
    assert torch.equal(generate(SRImageGuidance(model, lr, scale=0.0), 2, **kw), plain)
