//! The transformer encoders this crate runs, for one input at a time:
//! BERT (all-MiniLM-L6-v2) and MPNet (all-mpnet-base-v2), with their dense
//! layers kept as int8.
//!
//! # Why not candle-transformers' models
//!
//! candle-transformers has BERT but no MPNet, and its BERT keeps every
//! weight as f32. Both architectures are the same encoder with small
//! differences, so one implementation serves both:
//!
//! - BERT adds a token-type embedding (type 0: one sentence) and counts
//!   positions from 0;
//! - MPNet has no token types, counts positions from `pad_token_id + 1`
//!   (RoBERTa's convention), and adds to every layer's attention scores a
//!   learned bias by relative position (`encoder.relative_attention_bias`,
//!   T5-style log buckets, computed once per input, shared by the layers);
//! - their tensors are named differently (`attention.self.query` against
//!   `attention.attn.q`, ...).
//!
//! # int8
//!
//! Each dense layer's weights are quantized at load to GGML's Q8_0 (blocks
//! of 32 int8 weights with one f16 scale) and multiplied in that form
//! (candle's quantized matmul), where the layer's input width is a multiple
//! of 256 (what candle's fast kernel takes: all of MPNet-base's layers,
//! MiniLM-L6's output layers; the others stay f32). For all-mpnet-base-v2 on the 2-core
//! reference machine that took a short query from 75 to 30 ms (p50) and
//! the model from 428 to about 230 MB (candle keeps a second, matmul-ready
//! copy of each quantized weight from its first use), with the same
//! routing on the project's development sets within a query or two
//! (BENCHMARKS.md, issue 13). The word
//! embeddings, a lookup table, are kept as f16 (half the memory, exact
//! enough for a sum with positions before a layer norm). [`Precision::F32`]
//! keeps everything as exported (tests compare against it).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

/// Which architecture a `config.json` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bert,
    MpNet,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::MpNet => "mpnet",
        }
    }
}

/// How the weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Dense layers as Q8_0 where the fast int8 kernel applies (see
    /// the module docs), word embeddings as f16 (the default).
    #[default]
    Int8,
    /// Everything f32, as exported.
    F32,
}

/// The parts of `config.json` this encoder reads (Hugging Face names).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// BERT: 2; MPNet: none.
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// MPNet's positions start past it.
    #[serde(default = "default_pad")]
    pub pad_token_id: u32,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f64 {
    1e-12
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

/// Relative distances up to this are told apart by MPNet's log buckets.
const MAX_DISTANCE: f32 = 128.0;

/// Input widths the dense layers are quantized at (see [`Linear::load`]).
const QUANT_MIN_K: usize = 256;

/// A dense layer; its weights as Q8_0 blocks (8.5 bits a weight)
/// multiplied without converting them back, or as f32.
struct Linear {
    w: QMatMul,
    b: Tensor,
}

impl Linear {
    fn load(inp: usize, out: usize, p: Precision, vb: VarBuilder) -> candle_core::Result<Linear> {
        let w = vb.get((out, inp), "weight")?;
        let b = vb.get(out, "bias")?;
        // candle's fast int8 kernel (weights repacked into tiles, VNNI dot
        // products) takes inputs whose width is a multiple of 256; others go
        // through a generic per-block loop that is slower than f32 matrix
        // products (MiniLM's 384-wide layers: p99 28 ms against 24).
        let w = if p == Precision::F32 || !inp.is_multiple_of(QUANT_MIN_K) {
            QMatMul::Tensor(w)
        } else {
            QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?
        };
        Ok(Linear { w, b })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.w.forward(x)?.broadcast_add(&self.b)
    }
}

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

/// A loaded encoder.
pub struct Encoder {
    arch: Arch,
    /// `[vocab, hidden]`, f16 or f32.
    words: Tensor,
    positions: Embedding,
    /// BERT's embedding of token type 0, `[hidden]`.
    token_type: Option<Tensor>,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    /// MPNet's `[buckets, heads]`.
    relative_bias: Option<Tensor>,
    heads: usize,
    head_dim: usize,
    buckets: usize,
    /// Position of the first token.
    first_position: u32,
    max_positions: usize,
}

impl Encoder {
    pub fn load(
        vb: VarBuilder,
        arch: Arch,
        cfg: &Config,
        p: Precision,
    ) -> candle_core::Result<Encoder> {
        if cfg.hidden_act != "gelu" {
            candle_core::bail!("hidden_act `{}` (only gelu)", cfg.hidden_act);
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            candle_core::bail!("hidden_size is not a multiple of num_attention_heads");
        }
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let words = e.get((cfg.vocab_size, h), "word_embeddings.weight")?;
        let words = match p {
            Precision::Int8 => words.to_dtype(DType::F16)?,
            Precision::F32 => words,
        };
        let positions = Embedding::new(
            e.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            h,
        );
        let token_type = match arch {
            Arch::Bert => Some(
                e.get(
                    (cfg.type_vocab_size.max(1), h),
                    "token_type_embeddings.weight",
                )?
                .get(0)?,
            ),
            Arch::MpNet => None,
        };
        let embed_norm = layer_norm(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?;
        let enc = vb.pp("encoder");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = enc.pp(format!("layer.{i}"));
            let a = l.pp("attention");
            let (q, k, v, o, norm) = match arch {
                Arch::Bert => (
                    "self.query",
                    "self.key",
                    "self.value",
                    "output.dense",
                    "output.LayerNorm",
                ),
                Arch::MpNet => ("attn.q", "attn.k", "attn.v", "attn.o", "LayerNorm"),
            };
            layers.push(Layer {
                q: Linear::load(h, h, p, a.pp(q))?,
                k: Linear::load(h, h, p, a.pp(k))?,
                v: Linear::load(h, h, p, a.pp(v))?,
                o: Linear::load(h, h, p, a.pp(o))?,
                attn_norm: layer_norm(h, cfg.layer_norm_eps, a.pp(norm))?,
                inter: Linear::load(h, cfg.intermediate_size, p, l.pp("intermediate.dense"))?,
                out: Linear::load(cfg.intermediate_size, h, p, l.pp("output.dense"))?,
                out_norm: layer_norm(h, cfg.layer_norm_eps, l.pp("output.LayerNorm"))?,
            });
        }
        let relative_bias = match arch {
            Arch::MpNet => Some(enc.get(
                (cfg.relative_attention_num_buckets, cfg.num_attention_heads),
                "relative_attention_bias.weight",
            )?),
            Arch::Bert => None,
        };
        Ok(Encoder {
            arch,
            words,
            positions,
            token_type,
            embed_norm,
            layers,
            relative_bias,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            buckets: cfg.relative_attention_num_buckets,
            first_position: match arch {
                Arch::Bert => 0,
                Arch::MpNet => cfg.pad_token_id + 1,
            },
            max_positions: cfg.max_position_embeddings,
        })
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Word pieces one input may have.
    pub fn max_tokens(&self) -> usize {
        self.max_positions
            .saturating_sub(self.first_position as usize)
    }

    /// Last hidden states `[1, n, hidden]` of one unpadded input.
    pub fn forward(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let n = ids.len();
        let dev = Device::Cpu;
        let input = Tensor::new(ids, &dev)?;
        let words = self.words.index_select(&input, 0)?.to_dtype(DType::F32)?;
        let pos: Vec<u32> = (0..n as u32).map(|i| self.first_position + i).collect();
        let pos = Tensor::new(pos.as_slice(), &dev)?;
        let mut x = (words + self.positions.forward(&pos)?)?;
        if let Some(t) = &self.token_type {
            x = x.broadcast_add(t)?;
        }
        let mut x = self.embed_norm.forward(&x.unsqueeze(0)?)?;
        let bias = match &self.relative_bias {
            Some(b) => Some(self.position_bias(b, n)?), // [1, heads, n, n]
            None => None,
        };
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
            let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
            if let Some(b) = &bias {
                scores = scores.broadcast_add(b)?;
            }
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

    /// MPNet's learned bias of every (query, key) pair by their distance.
    fn position_bias(&self, table: &Tensor, n: usize) -> candle_core::Result<Tensor> {
        let mut idx = Vec::with_capacity(n * n);
        for q in 0..n as i64 {
            for k in 0..n as i64 {
                idx.push(bucket(k - q, self.buckets) as u32);
            }
        }
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
        table
            .index_select(&idx, 0)? // [n*n, heads]
            .reshape((n, n, self.heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
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
    use super::*;

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

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    const TEXTS: [&str; 3] = [
        "A man is eating food.",
        "My last paycheck was smaller than it should be",
        "water is dripping from the ceiling onto my keyboard",
    ];

    /// Against a reference forward pass (numpy, written from Hugging Face's
    /// `MPNetModel`), where all-mpnet-base-v2 is installed
    /// (`scripts/fetch-model.sh --model mpnet`; CI does); int8 against f32.
    #[test]
    fn all_mpnet_base_v2_matches_the_reference() {
        let Some(dir) = crate::model_for_tests_named(crate::MPNET) else {
            return;
        };
        let m = crate::Model::load_with(&dir, Precision::F32).expect("load");
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
        let q = crate::Model::load(&dir).expect("load int8");
        for t in TEXTS {
            let c = cos(
                &m.embed(t).expect("f32").vector,
                &q.embed(t).expect("int8").vector,
            );
            assert!(c > 0.995, "{t}: int8 vs f32 cosine {c}");
        }
    }

    /// The BERT path against candle-transformers' BERT on all-MiniLM-L6-v2
    /// (mean-pooled, normalised), and int8 against f32.
    #[test]
    fn bert_matches_candle_transformers() {
        use candle_transformers::models::bert::{BertModel, Config};
        let Some(dir) = crate::model_for_tests() else {
            return;
        };
        let cfg: Config =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config"))
                .expect("config");
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .expect("weights");
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let theirs = BertModel::load(vb, &cfg).expect("bert");
        let ours = crate::Model::load_with(&dir, Precision::F32).expect("load");
        let q = crate::Model::load(&dir).expect("load int8");
        assert_eq!(ours.architecture(), "bert");
        for t in TEXTS {
            let enc = ours.tokenizer.encode(t, true).expect("tokens");
            let ids = Tensor::new(enc.get_ids(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("ids");
            let h = theirs
                .forward(&ids, &ids.zeros_like().expect("types"), None)
                .and_then(|h| h.mean(1))
                .and_then(|h| h.squeeze(0))
                .and_then(|h| h.to_vec1::<f32>())
                .expect("forward");
            let mut want = h;
            crate::normalize(&mut want);
            let got = ours.embed(t).expect("embed").vector;
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "{t}: largest difference {diff}");
            let c = cos(&got, &q.embed(t).expect("int8").vector);
            assert!(c > 0.995, "{t}: int8 vs f32 cosine {c}");
        }
    }
}
