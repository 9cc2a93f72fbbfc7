//! The MPNet encoder (all-mpnet-base-v2 and other sentence-transformers
//! exports of `model_type: "mpnet"`), for one input at a time.
//!
//! # Why it is here
//!
//! candle-transformers has no MPNet, and all-mpnet-base-v2 routes intents
//! noticeably better than all-MiniLM-L6-v2 (BENCHMARKS.md, issue 13) at
//! about seven times the cost. MPNet is a BERT encoder with three
//! differences, all of them in this file:
//!
//! - no token-type embeddings;
//! - positions count from `pad_token_id + 1` (RoBERTa's convention);
//! - every layer's attention scores get a learned bias by relative
//!   position (`encoder.relative_attention_bias`, T5-style log buckets,
//!   computed once per input and shared by the layers).
//!
//! Tensor names are those of Hugging Face's `MPNetModel` (`embeddings.*`,
//! `encoder.layer.N.attention.attn.{q,k,v,o}`, ...), with or without an
//! `mpnet.` prefix.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

/// The parts of `config.json` this encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_pad() -> u32 {
    1
}
fn default_buckets() -> usize {
    32
}
fn default_act() -> String {
    "gelu".to_string()
}

/// Relative distances up to this are told apart by the log buckets.
const MAX_DISTANCE: f32 = 128.0;

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// A loaded MPNet encoder.
pub struct MpNet {
    words: Embedding,
    positions: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    /// `[buckets, heads]`.
    relative_bias: Tensor,
    heads: usize,
    head_dim: usize,
    buckets: usize,
    pad: u32,
    max_positions: usize,
}

impl MpNet {
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<MpNet> {
        if cfg.hidden_act != "gelu" {
            candle_core::bail!("hidden_act `{}` (only gelu)", cfg.hidden_act);
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            candle_core::bail!("hidden_size is not a multiple of num_attention_heads");
        }
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let words = embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let positions = embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?;
        let embed_norm = layer_norm(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?;
        let enc = vb.pp("encoder");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = enc.pp(format!("layer.{i}"));
            let a = l.pp("attention");
            layers.push(Layer {
                q: linear(h, h, a.pp("attn.q"))?,
                k: linear(h, h, a.pp("attn.k"))?,
                v: linear(h, h, a.pp("attn.v"))?,
                o: linear(h, h, a.pp("attn.o"))?,
                attn_norm: layer_norm(h, cfg.layer_norm_eps, a.pp("LayerNorm"))?,
                inter: linear(h, cfg.intermediate_size, l.pp("intermediate.dense"))?,
                out: linear(cfg.intermediate_size, h, l.pp("output.dense"))?,
                out_norm: layer_norm(h, cfg.layer_norm_eps, l.pp("output.LayerNorm"))?,
            });
        }
        let relative_bias = enc.get(
            (cfg.relative_attention_num_buckets, cfg.num_attention_heads),
            "relative_attention_bias.weight",
        )?;
        Ok(MpNet {
            words,
            positions,
            embed_norm,
            layers,
            relative_bias,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            buckets: cfg.relative_attention_num_buckets,
            pad: cfg.pad_token_id,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Word pieces one input may have (positions start past the padding id).
    pub fn max_tokens(&self) -> usize {
        self.max_positions.saturating_sub(self.pad as usize + 1)
    }

    /// Last hidden states `[1, n, hidden]` of one unpadded input.
    pub fn forward(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let n = ids.len();
        let dev = Device::Cpu;
        let input = Tensor::new(ids, &dev)?.unsqueeze(0)?;
        let pos: Vec<u32> = (0..n as u32).map(|i| self.pad + 1 + i).collect();
        let pos = Tensor::new(pos.as_slice(), &dev)?.unsqueeze(0)?;
        let x = (self.words.forward(&input)? + self.positions.forward(&pos)?)?;
        let mut x = self.embed_norm.forward(&x)?;
        let bias = self.position_bias(n)?; // [1, heads, n, n]
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((1, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        for l in &self.layers {
            let q = split(l.q.forward(&x)?)?;
            let k = split(l.k.forward(&x)?)?;
            let v = split(l.v.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx =
                probs
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .reshape((1, n, self.heads * self.head_dim))?;
            let a = l.attn_norm.forward(&(l.o.forward(&ctx)? + &x)?)?;
            let i = l.inter.forward(&a)?.gelu_erf()?;
            x = l.out_norm.forward(&(l.out.forward(&i)? + &a)?)?;
        }
        Ok(x)
    }

    /// The learned bias of every (query, key) pair by their distance.
    fn position_bias(&self, n: usize) -> candle_core::Result<Tensor> {
        let mut idx = Vec::with_capacity(n * n);
        for q in 0..n as i64 {
            for k in 0..n as i64 {
                idx.push(bucket(k - q, self.buckets) as u32);
            }
        }
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
        self.relative_bias
            .index_select(&idx, 0)? // [n*n, heads]
            .reshape((n, n, self.heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(DType::F32)?
            .contiguous()
    }
}

/// T5's relative-position bucket of `relative = key - query`: half the
/// buckets for each direction, exact for short distances, logarithmic up
/// to [`MAX_DISTANCE`] beyond.
fn bucket(relative: i64, buckets: usize) -> usize {
    let half = buckets / 2;
    let n = -relative;
    let mut ret = if n < 0 { half } else { 0 };
    let n = n.unsigned_abs() as usize;
    let exact = half / 2;
    if n < exact {
        ret += n;
    } else {
        let log = ((n as f32 / exact as f32).ln() / (MAX_DISTANCE / exact as f32).ln()
            * (half - exact) as f32) as usize;
        ret += (exact + log).min(half - 1);
    }
    ret
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_match_t5() {
        // Values of Hugging Face's MPNet `relative_position_bucket` (32 buckets,
        // max distance 128) for key - query.
        let cases = [
            (0, 0),
            (-1, 1),
            (-7, 7),
            (-8, 8),
            (-12, 9),
            (-16, 10),
            (-127, 15),
            (-500, 15),
            (1, 17),
            (7, 23),
            (8, 24),
            (20, 26),
            (127, 31),
            (1000, 31),
        ];
        for (rel, want) in cases {
            assert_eq!(bucket(rel, 32), want, "relative {rel}");
        }
    }

    /// Against a reference forward pass (numpy, written from Hugging Face's
    /// `MPNetModel`), where all-mpnet-base-v2 is installed
    /// (`scripts/fetch-model.sh --model mpnet`; CI does).
    #[test]
    fn all_mpnet_base_v2_matches_the_reference() {
        let Some(dir) = crate::model_for_tests_named(crate::MPNET) else {
            return;
        };
        let m = crate::Model::load(&dir).expect("load");
        assert_eq!(m.architecture(), "mpnet");
        assert_eq!(m.dim(), 768);
        let food = m.embed("A man is eating food.").expect("embed");
        let want = [0.035_500_8, -0.008_431_6, 0.022_024_1, 0.016_262_6];
        for (i, w) in want.iter().enumerate() {
            assert!(
                (food.vector[i] - w).abs() < 1e-4,
                "dim {i}: {} vs {w}",
                food.vector[i]
            );
        }
        assert_eq!(food.tokens, 8);
        let bread = m.embed("A man is eating a piece of bread.").expect("embed");
        let want = [0.017_861_1, -0.033_347_5, -0.005_989_3, 0.041_598_9];
        for (i, w) in want.iter().enumerate() {
            assert!(
                (bread.vector[i] - w).abs() < 1e-4,
                "dim {i}: {} vs {w}",
                bread.vector[i]
            );
        }
    }
}
