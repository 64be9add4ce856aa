"""The LDM text-to-image τθ (ldm_fast/ldm_bert.py) against diffusers' LDMBertModel, and its
WordPiece tokenisation against transformers' BertTokenizerFast, on random weights and a
small local vocabulary."""

import pytest
import torch

from ldm_fast.conditioning import load_tokenizer
from ldm_fast.ldm_bert import LDMBertTextEncoder, LDMBertTransformer

WORDS = ["a", "cat", "dog", "on", "the", "red", "blue", "sofa", "photo", "of", "##s", "##ing", "sit", ",", "."]


def write_vocab(path):
    """A BERT-style vocab.txt: special tokens first ([PAD] = 0, as in bert-base-uncased)."""
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def diffusers_ldm_bert(ours: LDMBertTransformer, heads: int):
    """diffusers' LDMBertModel with our weights (names: its encoder ↔ the x-transformers layout)."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    dim = ours.norm.weight.shape[0]
    depth = len(ours.attn_layers.layers) // 2
    cfg = LDMBertConfig(vocab_size=ours.vocab_size, max_position_embeddings=ours.max_length, encoder_layers=depth,
                        encoder_ffn_dim=4 * dim, encoder_attention_heads=heads, head_dim=64, d_model=dim,
                        dropout=0.0)
    theirs = LDMBertModel(cfg).eval()
    sd = {"model.embed_tokens.weight": ours.token_emb.weight, "model.embed_positions.weight": ours.pos_emb.emb.weight,
          "model.layer_norm.weight": ours.norm.weight, "model.layer_norm.bias": ours.norm.bias}
    for i in range(depth):
        (n1, attn), (n2, ff) = ours.attn_layers.layers[2 * i], ours.attn_layers.layers[2 * i + 1]
        p = f"model.layers.{i}."
        sd.update({p + "self_attn_layer_norm.weight": n1.weight, p + "self_attn_layer_norm.bias": n1.bias,
                   p + "self_attn.q_proj.weight": attn.to_q.weight, p + "self_attn.k_proj.weight": attn.to_k.weight,
                   p + "self_attn.v_proj.weight": attn.to_v.weight, p + "self_attn.out_proj.weight": attn.to_out.weight,
                   p + "self_attn.out_proj.bias": attn.to_out.bias,
                   p + "final_layer_norm.weight": n2.weight, p + "final_layer_norm.bias": n2.bias,
                   p + "fc1.weight": ff.net[0][0].weight, p + "fc1.bias": ff.net[0][0].bias,
                   p + "fc2.weight": ff.net[2].weight, p + "fc2.bias": ff.net[2].bias})
    sd["to_logits.weight"], sd["to_logits.bias"] = theirs.to_logits.weight, theirs.to_logits.bias
    theirs.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return theirs


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0  # LayerNorm gains near 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + offset)
    return module


@torch.no_grad()
def test_transformer_matches_diffusers_ldm_bert():
    pytest.importorskip("diffusers")
    ours = _randomize(LDMBertTransformer(vocab_size=40, max_length=12, dim=48, depth=2, heads=3), 0).eval()
    theirs = diffusers_ldm_bert(ours, heads=3)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    got = ours(ids)
    want = theirs(ids).last_hidden_state
    assert got.shape == (2, 12, 48)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the attention is heads × 64 wide whatever the model width (x-transformers' dim_head)
    assert ours.attn_layers.layers[0][1].to_q.weight.shape == (3 * 64, 48)


def test_tokenizer_matches_bert_tokenizer_fast(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = write_vocab(tmp_path / "vocab.txt")
    ours = load_tokenizer(vocab)
    theirs = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))  # reads vocab.txt, lower-cases
    prompts = ["A photo of a cat, sitting on the RED sofa.", "", "dogs", "zebra on the sofa"]
    with pytest.warns(UserWarning, match="truncated"):
        got = ours.encode(prompts, 12)
    # the original BERTTokenizer: truncation, padding to max_length, return_tensors="pt"
    want = theirs(prompts, truncation=True, max_length=12, padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(got, want)


@torch.no_grad()
def test_text_encoder_prompts(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path / "vocab.txt"))
    enc = LDMBertTextEncoder(tok, vocab_size=30, max_length=10, embed_dim=32, n_layers=1, n_heads=2).eval()
    out = enc(["a cat", ""])
    assert out.shape == (2, 10, 32)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="embedding"):
        LDMBertTextEncoder(tok, vocab_size=8, max_length=10, embed_dim=32, n_layers=1, n_heads=2)
