"""Domain encoders τθ and concat builders: shapes, tokenizer round trips, and a clear error for
every malformed input (boxes, maps, masks, prompts, low-res images, class ids)."""

import sys
import warnings

import pytest
import torch

from ldm_fast.autoencoder import build_first_stage
from ldm_fast.conditioning import (
    ClassEmbedder,
    FrozenPretrainedTextEncoder,
    InpaintingConcat,
    LayoutEncoder,
    SemanticEncoder,
    TextTransformer,
    check_class_ids,
    drop_mask,
    load_tokenizer,
    sr_concat,
    train_tokenizer,
)
from ldm_fast.config import tiny

CAPTIONS = ["a large red circle on a plain background",
            "a large blue square, a small green cross and a small yellow diamond on a striped background",
            "a large purple triangle and a small cyan circle on a noisy background"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, which costs ~100× on a
    loaded 2-core machine (measured: a 4×4 conv takes 0.09 ms on one thread, 10 ms on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- classes

def test_class_embedder_context_null_class_and_bad_ids():
    emb = ClassEmbedder(30, 16)
    assert emb.embedding.weight.shape == (31, 16) and emb.null_id == 30  # last row = null
    assert emb(torch.tensor([0, 29, 30])).shape == (3, 1, 16)
    assert set(emb.state_dict()) == {"embedding.weight"}  # the original cond_stage_model key
    with pytest.raises(ValueError, match="unknown class id 31"):
        emb(torch.tensor([31]))
    with pytest.raises(ValueError, match="unknown class id -1"):
        check_class_ids([-1], 30)
    with pytest.raises(ValueError, match="unknown class id 30"):
        check_class_ids([30], 30, allow_null=False)
    with pytest.raises(ValueError, match="integer"):
        check_class_ids(torch.tensor([1.5]), 30)


def test_drop_mask_probability_extremes():
    g = torch.Generator().manual_seed(0)
    assert not drop_mask(8, 0.0, g, "cpu").any()
    assert drop_mask(8, 1.0, g, "cpu").all()


# ----------------------------------------------------------------------------- text

def test_tokenizer_pads_wraps_and_round_trips(tmp_path):
    tok = train_tokenizer(CAPTIONS * 3, vocab_size=200)
    ids = tok.encode(CAPTIONS[:1] + [""], max_length=24)
    assert ids.shape == (2, 24)
    cls, sep, pad = (tok.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert ids[0, 0] == cls and ids[1].tolist() == [cls, sep] + [pad] * 22  # empty prompt = null
    assert tok.tokenizer.token_to_id("circle") is not None  # caption words are whole tokens
    path = tok.save(tmp_path / "tokenizer.json")
    assert torch.equal(load_tokenizer(path).encode(CAPTIONS, 24), tok.encode(CAPTIONS, 24))
    assert torch.equal(load_tokenizer(tmp_path).encode(CAPTIONS, 24), tok.encode(CAPTIONS, 24))


def test_tokenizer_from_bert_vocab_txt(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = load_tokenizer(tmp_path / "vocab.txt")
    assert tok.encode("A red circles!", 8)[0].tolist() == [2, 5, 6, 7, 8, 1, 3, 0]  # "!" unknown
    (tmp_path / "bad.txt").write_text("a\nred\n")
    with pytest.raises(ValueError, match="special tokens"):
        load_tokenizer(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")


def test_long_prompt_truncation_is_announced_once_or_refused():
    tok = train_tokenizer(CAPTIONS, vocab_size=200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok.encode(CAPTIONS[1:2] * 2, max_length=8)
        tok.encode(CAPTIONS[1:2], max_length=8)
    assert len(caught) == 1 and "truncated to 8 tokens" in str(caught[0].message)
    assert ids[0, -1] == tok.sep_id  # [SEP] kept last
    with pytest.raises(ValueError, match="more than the text encoder's context of 8"):
        tok.encode(CAPTIONS[1], max_length=8, strict=True)
    with pytest.raises(ValueError, match="strings"):
        tok.encode([3], max_length=8)


def test_text_transformer_shapes_and_prompt_dependence():
    torch.manual_seed(0)
    enc = TextTransformer(train_tokenizer(CAPTIONS, 200), max_length=24, embed_dim=32, n_layers=2, n_heads=4)
    out = enc(CAPTIONS[:2] + [""])
    assert out.shape == (3, 24, 32)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])


def test_pretrained_text_encoder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        FrozenPretrainedTextEncoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        FrozenPretrainedTextEncoder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install transformers"):
        FrozenPretrainedTextEncoder(tmp_path)


def test_pretrained_text_encoder_loads_a_local_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path))
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(str(tmp_path))
    enc = FrozenPretrainedTextEncoder(tmp_path, max_length=6)
    assert enc(["a red circle", ""]).shape == (2, 6, 16) and enc.embed_dim == 16
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="exceeds"):
        FrozenPretrainedTextEncoder(tmp_path, max_length=64)


# ----------------------------------------------------------------------------- layouts

def test_layout_tokens_are_l_b_c_then_pads():
    enc = LayoutEncoder(num_classes=30, max_length=9, embed_dim=32, n_layers=1, n_heads=4)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0], [0.5, 0.25, 0.75, 1.0]]])
    labels = torch.tensor([[5, -1, 7]])
    tokens = enc.tokenize(boxes, labels)
    # corners on a 32×32 grid (index = row · 32 + col), classes after the 1024 positions
    q = lambda v: round(v * 31)  # noqa: E731
    assert tokens[0].tolist() == [0, 1023, 1024 + 5,
                                  q(0.25) * 32 + q(0.5), q(1.0) * 32 + q(0.75), 1024 + 7,
                                  enc.pad_id, enc.pad_id, enc.pad_id]
    assert torch.equal(enc.tokenize_lists([(0.0, 0.0, 1.0, 1.0, 5), (0.5, 0.25, 0.75, 1.0, 7)]), tokens)
    assert torch.equal(enc.tokenize_lists([[]]), enc.null_tokens(1))  # empty layout = null
    assert enc(tokens).shape == (1, 9, 32)


@pytest.mark.parametrize("box, message", [
    ((0.1, 0.1, 1.2, 0.5, 3), "outside the image"),
    ((-0.1, 0.1, 0.5, 0.5, 3), "outside the image"),
    ((0.6, 0.1, 0.5, 0.5, 3), "x0 < x1"),
    ((0.1, 0.5, 0.5, 0.5, 3), "x0 < x1 and y0 < y1"),
    ((0.1, 0.1, 0.5, 0.5, 30), "unknown class id 30"),
    ((0.1, 0.1, 0.5, 0.5, -2), "unknown class id -2"),
    ((0.1, 0.1, 0.5, float("nan"), 1), "finite"),
])
def test_bad_boxes_raise(box, message):
    enc = LayoutEncoder(num_classes=30, max_length=9, embed_dim=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match=message):
        enc.tokenize_lists([[box]])


def test_too_many_boxes_raise():
    enc = LayoutEncoder(num_classes=30, max_length=6, embed_dim=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="at most 2"):
        enc.tokenize_lists([[(0.1, 0.1, 0.2, 0.2, 1)] * 3])


# ----------------------------------------------------------------------------- concatenation

def test_semantic_encoder_shapes_and_bad_maps():
    enc = SemanticEncoder(num_classes=31, out_channels=3, factor=4)
    seg = torch.randint(0, 31, (2, 16, 16))
    assert enc(seg).shape == (2, 3, 4, 4)
    assert enc(seg[0]).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="class id 31 outside"):
        enc(torch.full((1, 16, 16), 31))
    with pytest.raises(ValueError, match="class id -1 outside"):
        enc(torch.full((1, 16, 16), -1))
    with pytest.raises(ValueError, match="not a multiple"):
        enc(torch.zeros(1, 18, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match the image size"):
        enc(seg, image_size=(32, 32))
    with pytest.raises(ValueError, match="integer"):
        enc(seg.float())


def test_semantic_encoder_sees_class_fractions():
    enc = SemanticEncoder(num_classes=3, out_channels=3, factor=4)
    with torch.no_grad():
        enc.mapping.weight.copy_(torch.eye(3)[..., None, None])
        enc.mapping.bias.zero_()
    seg = torch.zeros(1, 4, 4, dtype=torch.long)
    seg[0, 0, 0] = 2  # one pixel of class 2 in the single 4×4 cell
    assert torch.allclose(enc(seg)[0, :, 0, 0], torch.tensor([15 / 16, 0, 1 / 16]))


def test_sr_concat_on_the_latent_grid_and_bad_sizes():
    lr = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(sr_concat(lr, 4, 4), lr)  # f = 4, ×4: the LR image is the latent grid
    assert sr_concat(lr, 4, 8).shape == (2, 3, 4, 4)  # f = 8: resized
    assert sr_concat(lr, 4, 2).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="not a multiple of the latent factor 8"):
        sr_concat(torch.zeros(1, 3, 9, 8), 4, 8)
    with pytest.raises(ValueError, match="does not match the target image size"):
        sr_concat(lr, 4, 4, image_size=(64, 64))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        sr_concat(lr * 255, 4, 4)
    with pytest.raises(ValueError, match="expected"):
        sr_concat(torch.zeros(1, 1, 8, 8), 4, 4)


def test_inpainting_concat_channels_scale_and_bad_masks():
    ae = tiny().autoencoder
    ae.base_channels, ae.resolution = 8, 16
    fs = build_first_stage(ae).eval()
    concat = InpaintingConcat(fs, factor=4)
    image, mask = torch.rand(2, 3, 16, 16) * 2 - 1, torch.zeros(2, 1, 16, 16)
    with pytest.raises(RuntimeError, match="latent scale unknown"):
        concat(image, mask)
    assert concat.calibrate(image) > 0
    assert concat(image, mask).shape == (2, ae.z_channels + 1, 4, 4)
    assert set(concat.state_dict()) == {"latent_scale"}  # first stage held by reference only
    image_b, mask_b = InpaintingConcat.check(image, torch.ones(16, 16))
    assert mask_b.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="does not match image size"):
        InpaintingConcat.check(image, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        InpaintingConcat.check(image, torch.full((2, 1, 16, 16), 2.0))
