"""diffusers folders in and out: a random-weight tiny StableDiffusionPipeline saved by
diffusers' save_pretrained converts to a run whose UNet, VAE and text encoder give diffusers'
outputs; the run written back as a folder loads with from_pretrained and gives them again."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_convert import make_clip_dir  # noqa: E402

from ldm_fast.convert import convert, main  # noqa: E402
from ldm_fast.run import load_model  # noqa: E402
from ldm_fast.tasks import load_conditioner  # noqa: E402


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = 1.0 if p.dim() == 1 and "norm" in name and name.endswith("weight") else 0.0
            p.copy_(gain + 0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_pipeline(tmp_path):
    clip_dir = tmp_path / "clip"
    make_clip_dir(clip_dir, seed=0, width=64)
    unet = _randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=2, norm_num_groups=32), 1)
    vae = _randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16), 2)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=transformers.CLIPTextModel.from_pretrained(str(clip_dir)).eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(clip_dir)), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp_path / "pipe"))
    return pipe


@torch.no_grad()
def _check_same(pipe, unet_fn, decode_fn, encode_fn, text_fn):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([3, 917])
    ctx = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(unet_fn(x, t, ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample,
                               rtol=1e-4, atol=1e-5)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(decode_fn(z), pipe.vae.decode(z).sample, rtol=1e-4, atol=1e-5)
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    torch.testing.assert_close(encode_fn(img), pipe.vae.encode(img).latent_dist.mean, rtol=1e-4, atol=1e-5)
    ids = pipe.tokenizer(["a photo of a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(text_fn(["a photo of a cat", ""]), pipe.text_encoder(ids).last_hidden_state,
                               rtol=1e-4, atol=1e-5)


def test_diffusers_folder_round_trip(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    result = convert(tmp_path / "pipe", tmp_path / "run")
    assert not result.mapping.unexpected and not result.mapping.missing
    model, cond_state = load_model(tmp_path / "run")
    d = model.cfg.diffusion
    assert (d.linear_start, d.linear_end, d.timestep_spacing, d.steps_offset, d.set_alpha_to_one) == \
        (0.00085, 0.012, "leading", 1, False)
    assert float(model.scale_factor) == pytest.approx(pipe.vae.config.scaling_factor)
    conditioner = load_conditioner(tmp_path / "run", model, cond_state)
    text = lambda prompts: conditioner.encode_inputs(prompts=prompts)[0]["context"]  # noqa: E731
    _check_same(pipe, lambda x, t, c: model.unet(x, t, context=c), model.first_stage.decode,
                lambda img: model.first_stage.encode(img).mean, text)

    assert main(["--to-diffusers", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    back = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), safety_checker=None)
    assert type(back.scheduler).__name__ == "DDIMScheduler"
    assert (back.scheduler.config.steps_offset, back.scheduler.config.set_alpha_to_one) == (1, False)
    back.unet.eval(), back.vae.eval(), back.text_encoder.eval()

    def text_back(prompts):
        ids = back.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return back.text_encoder(ids).last_hidden_state
    _check_same(pipe, lambda x, t, c: back.unet(x, t, encoder_hidden_states=c).sample,
                lambda z: back.vae.decode(z).sample, lambda img: back.vae.encode(img).latent_dist.mean, text_back)


def test_diffusers_folder_refusals(tmp_path, capsys):
    tiny_pipeline(tmp_path)
    cfg = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    raw = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**raw, "beta_schedule": "linear"}))
    assert main(["--ckpt", str(tmp_path / "pipe"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "scaled_linear" in err and "Traceback" not in err
    assert main(["--ckpt", str(tmp_path / "pipe"), "--config", "x.yaml", "--out", str(tmp_path / "r2")]) == 2
    assert "diffusers folder" in capsys.readouterr().err


def test_non_sd_run_is_refused(tmp_path, capsys):
    from test_evaluate_fresh import _run_dir

    run = _run_dir(tmp_path / "run")  # the tiny native preset: unconditional, AttentionBlock UNet
    assert main(["--to-diffusers", "--ckpt", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Stable Diffusion pipeline counterpart" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_ldm_text_to_image_folder(tmp_path):
    """The LDM text-to-image layout (LDMTextToImagePipeline: unet/, vqvae/, bert/, tokenizer/)
    converts: the BERT becomes ldm_bert.py's with the folder's WordPiece tokenizer."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from test_ldm_bert import write_vocab

    write_vocab(tmp_path / "vocab.txt")
    tokenizer = transformers.BertTokenizer.from_pretrained(str(tmp_path))
    bert = _randomize(LDMBertModel(LDMBertConfig(vocab_size=24, max_position_embeddings=9, encoder_layers=2,
                                                 encoder_ffn_dim=4 * 64, encoder_attention_heads=8, head_dim=64,
                                                 d_model=64, dropout=0.0)), 7)
    pipe = tiny_pipeline(tmp_path)
    ldm = diffusers.LDMTextToImagePipeline(vqvae=pipe.vae, bert=bert, tokenizer=tokenizer, unet=pipe.unet,
                                           scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear",
                                                                             beta_start=0.00085, beta_end=0.012))
    ldm.save_pretrained(str(tmp_path / "ldm"))
    result = convert(tmp_path / "ldm", tmp_path / "run")
    assert not result.mapping.unexpected and sorted(result.mapping.ignored) == [
        "cond_stage_model.transformer.to_logits.bias", "cond_stage_model.transformer.to_logits.weight"]
    model, cond_state = load_model(tmp_path / "run")
    assert model.cfg.conditioning.text_encoder == "ldm_bert"
    conditioner = load_conditioner(tmp_path / "run", model, cond_state)
    prompts = ["a photo of a cat", ""]
    with torch.no_grad():
        ours = conditioner.encode_inputs(prompts=prompts)[0]["context"]
        ids = tokenizer(prompts, padding="max_length", max_length=9, truncation=True, return_tensors="pt").input_ids
        torch.testing.assert_close(ours, bert(ids).last_hidden_state, rtol=1e-4, atol=1e-5)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 800])
        torch.testing.assert_close(model.unet(x, t, context=ours), pipe.unet(x, t, encoder_hidden_states=ours).sample,
                                   rtol=1e-4, atol=1e-5)
