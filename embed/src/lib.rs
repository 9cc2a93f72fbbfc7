//! `dmsc-embed`: sentence embeddings for intent routing, in process.
//!
//! # Why
//!
//! Lexical matching (BM25) finds the agent whose card shares words with a
//! request; it cannot know that "my paycheck is short" is about payroll. A
//! small sentence-embedding model (all-MiniLM-L6-v2: 6 BERT layers, 384
//! dimensions, 90 MB) maps text with the same meaning to nearby unit
//! vectors, and the registry fuses that similarity with BM25. This crate is
//! the model and nothing else: load a directory, turn text into a unit
//! vector. No network, no Python, no native library: candle runs the model
//! in pure Rust and the `tokenizers` crate reads `tokenizer.json`.
//!
//! # The model directory
//!
//! A sentence-transformers export of a BERT or MPNet model (`model_type`
//! in `config.json`; both run on this crate's own encoder, [`encoder`]):
//! `config.json`, `tokenizer.json` (a Hugging Face tokenizer) and
//! `model.safetensors` (F32 weights, tensor names with or without a
//! `bert.` / `mpnet.` prefix). Pooling is the mean over tokens, then L2
//! normalisation (what `1_Pooling/config.json` and `modules.json` say for
//! MiniLM; other poolings are not supported). Every problem names the file
//! it is about ([`Error`]), so a bad `[intent] model_dir` is a clear
//! startup error.
//!
//! # Cost
//!
//! The dense layers are kept as int8 where that is faster
//! ([`Precision::Int8`], the default; [`encoder`] says how). On the 2-core
//! reference machine a short query (15 tokens) takes about 14 ms with
//! all-MiniLM-L6-v2 and 30 ms with all-mpnet-base-v2, whose weights then
//! add about 75 and 230 MB RSS (BENCHMARKS.md, issue 13).
//! [`Model::embed`] is CPU-bound and synchronous: callers run it on a
//! blocking pool, never on an async worker or under a lock.
//!
//! # Long and odd input
//!
//! Text is cut at [`MAX_INPUT_BYTES`] (on a character boundary) before
//! tokenizing, because the tokenizer processes all of it before
//! truncating (1 MB: a quarter of a second), then truncated to
//! [`Model::max_tokens`]; [`Embedding::truncated`] says so. Any Unicode is
//! accepted; text that yields no token but the markers still embeds.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::{Tokenizer, TruncationParams};

pub mod encoder;

pub use encoder::{Arch, Precision};

/// Text beyond this many bytes is never tokenized (the model's window is
/// far shorter: 256 word pieces are rarely more than 2 KB of text).
pub const MAX_INPUT_BYTES: usize = 4096;

/// Word pieces per input, markers included (sentence-transformers'
/// `max_seq_length` for MiniLM; the shipped tokenizer.json says 128).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("embedding failed: {0}")]
    Run(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Run(e.to_string())
    }
}

/// A text's embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// Unit length (or all zeros if the model gave a zero vector).
    pub vector: Vec<f32>,
    /// Word pieces the model saw, markers included.
    pub tokens: usize,
    /// True when the text was cut to fit the model's window.
    pub truncated: bool,
}

/// A loaded sentence-embedding model. `Send + Sync`: one per process,
/// shared by reference.
pub struct Model {
    encoder: encoder::Encoder,
    tokenizer: Tokenizer,
    dim: usize,
    max_tokens: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("dir", &self.dir)
            .field("architecture", &self.encoder.arch().name())
            .field("dim", &self.dim)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

fn corrupt(path: &Path, reason: impl ToString) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Model {
    /// Loads `dir/config.json`, `dir/tokenizer.json` and
    /// `dir/model.safetensors`, dense layers as int8 ([`Precision::Int8`]).
    pub fn load(dir: &Path) -> Result<Model, Error> {
        Model::load_with(dir, Precision::default())
    }

    /// [`Model::load`] with the weights kept at `precision`.
    pub fn load_with(dir: &Path, precision: Precision) -> Result<Model, Error> {
        let config_path = dir.join("config.json");
        let bytes = read(&config_path)?;
        let raw: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(&config_path, e))?;
        let arch = match raw
            .get("model_type")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("bert")
        {
            "bert" => Arch::Bert,
            "mpnet" => Arch::MpNet,
            other => {
                return Err(corrupt(
                    &config_path,
                    format!("model_type `{other}` is not supported (bert or mpnet)"),
                ))
            }
        };
        let config: encoder::Config = serde_json::from_value(raw).map_err(|e| {
            let what = match arch {
                Arch::Bert => "a BERT",
                Arch::MpNet => "an MPNet",
            };
            corrupt(&config_path, format!("not {what} configuration: {e}"))
        })?;
        let dim = Some(config.hidden_size)
            .filter(|d| (1..=4096).contains(d))
            .ok_or_else(|| corrupt(&config_path, "no usable hidden_size"))?;

        let tok_path = dir.join("tokenizer.json");
        let bytes = read(&tok_path)?;
        let mut tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| corrupt(&tok_path, e))?;
        // The shipped tokenizers pad every input to 128 word pieces: a short
        // query would cost a 128-token pass. One input at a time needs none.
        tokenizer.with_padding(None);

        let weights_path = dir.join("model.safetensors");
        let bytes = read(&weights_path)?;
        // Tensors are converted one at a time as the encoder asks for them
        // (and quantized at once), so the f32 copy of the whole model never
        // exists beside the file's bytes.
        let encoder = {
            let vb = VarBuilder::from_slice_safetensors(&bytes, DType::F32, &Device::Cpu)
                .map_err(|e| corrupt(&weights_path, e))?;
            // Exports differ: some name tensors `bert.embeddings...` (or
            // `mpnet.`), MiniLM's and all-mpnet-base-v2's `embeddings...`.
            let vb = match ["bert", "mpnet"]
                .into_iter()
                .find(|p| vb.contains_tensor(&format!("{p}.embeddings.word_embeddings.weight")))
            {
                Some(p) => vb.pp(p),
                None => vb,
            };
            encoder::Encoder::load(vb, arch, &config, precision)
                .map_err(|e| corrupt(&weights_path, format!("does not fit config.json: {e}")))?
        };
        drop(bytes);
        let window = encoder.max_tokens();
        let max_tokens = DEFAULT_MAX_TOKENS.min(window);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| corrupt(&tok_path, e))?;
        let model = Model {
            encoder,
            tokenizer,
            dim,
            max_tokens,
            dir: dir.to_path_buf(),
        };
        // A model that loads but cannot run (wrong shapes deeper in) fails
        // here, at startup, not on the first request.
        let probe = model
            .embed("probe")
            .map_err(|e| corrupt(&weights_path, e))?;
        if probe.vector.len() != dim || probe.vector.iter().any(|x| !x.is_finite()) {
            return Err(corrupt(&weights_path, "the model gives no usable vector"));
        }
        Ok(model)
    }

    /// Dimensions of an embedding.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Word pieces per input, markers included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The architecture (`bert` or `mpnet`), as `config.json` names it.
    pub fn architecture(&self) -> &'static str {
        self.encoder.arch().name()
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The unit-length embedding of `text`: mean of the last hidden states
    /// over its word pieces, L2-normalised.
    pub fn embed(&self, text: &str) -> Result<Embedding, Error> {
        let mut cut = false;
        let text = if text.len() > MAX_INPUT_BYTES {
            cut = true;
            let mut end = MAX_INPUT_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            &text[..end]
        } else {
            text
        };
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Run(e.to_string()))?;
        let ids = enc.get_ids();
        let tokens = ids.len();
        let truncated = cut || !enc.get_overflowing().is_empty();
        let mask = Tensor::new(enc.get_attention_mask(), &Device::Cpu)?.unsqueeze(0)?;
        let hidden = self.encoder.forward(ids)?; // [1, n, dim]
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [1, n, 1]
        let sum = hidden.broadcast_mul(&m)?.sum(1)?; // [1, dim]
        let count = m.sum(1)?.clamp(1.0, f64::MAX)?; // [1, 1]
        let mean = sum.broadcast_div(&count)?.squeeze(0)?;
        let mut vector = mean.to_vec1::<f32>()?;
        normalize(&mut vector);
        Ok(Embedding {
            vector,
            tokens,
            truncated,
        })
    }
}

/// Scales `v` to unit length (a zero or non-finite vector becomes zeros).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm.is_finite() && norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    } else {
        v.iter_mut().for_each(|x| *x = 0.0);
    }
}

/// The default model's directory name: all-MiniLM-L6-v2 (90 MB, about
/// 14 ms a short query here).
pub const MINILM: &str = "all-minilm-l6-v2";
/// The larger model's: all-mpnet-base-v2 (440 MB of f32 weights, about twice the
/// cost of MiniLM per query, better at paraphrases; BENCHMARKS.md).
pub const MPNET: &str = "all-mpnet-base-v2";

/// Where `scripts/fetch-model.sh` installs the default model:
/// `$DMSC_MODEL_DIR`, else `$XDG_DATA_HOME/dmsc/all-minilm-l6-v2`, else
/// `$HOME/.local/share/dmsc/all-minilm-l6-v2`.
pub fn default_model_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DMSC_MODEL_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    model_dir_named(MINILM)
}

/// Where `scripts/fetch-model.sh --model NAME` installs a model:
/// `$XDG_DATA_HOME/dmsc/NAME`, else `$HOME/.local/share/dmsc/NAME`.
pub fn model_dir_named(name: &str) -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(data.join("dmsc").join(name))
}

/// The installed model, if [`default_model_dir`] holds one (tests that need
/// the weights skip, saying why, when this is `None`; CI installs them).
pub fn installed_model_dir() -> Option<PathBuf> {
    default_model_dir().filter(|d| d.join("model.safetensors").is_file())
}

/// The installed default model for a test that needs it: `None` (the test
/// says it skips, and why) where it is absent, but a failure under
/// `CI=true`, where `.ci/run` installs it, so CI never passes by skipping.
pub fn model_for_tests() -> Option<PathBuf> {
    for_tests(installed_model_dir(), MINILM)
}

/// [`model_for_tests`] for a model installed under its name
/// (`scripts/fetch-model.sh --model mpnet`: [`MPNET`]).
pub fn model_for_tests_named(name: &str) -> Option<PathBuf> {
    let found = model_dir_named(name).filter(|d| d.join("model.safetensors").is_file());
    for_tests(found, name)
}

fn for_tests(found: Option<PathBuf>, name: &str) -> Option<PathBuf> {
    if found.is_none() && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "CI=true but model {name} is not installed: .ci/run runs scripts/fetch-model.sh first"
        );
    }
    if found.is_none() {
        eprintln!("skipped: model {name} not installed (run scripts/fetch-model.sh; CI does)");
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn missing_and_corrupt_directories_name_the_file() {
        let dir = std::env::temp_dir().join(format!("dmsc-embed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let e = Model::load(&dir).expect_err("empty dir");
        assert!(e.to_string().contains("config.json"), "{e}");
        std::fs::write(dir.join("config.json"), "{not json").expect("write");
        let e = Model::load(&dir).expect_err("bad config");
        assert!(e.to_string().contains("config.json"), "{e}");
        for (config, says) in [
            (
                r#"{"model_type": "gpt2", "hidden_size": 768}"#,
                "`gpt2` is not supported",
            ),
            (
                r#"{"model_type": "mpnet", "hidden_size": 768}"#,
                "not an MPNet configuration",
            ),
        ] {
            std::fs::write(dir.join("config.json"), config).expect("write");
            let e = Model::load(&dir).expect_err(says);
            assert!(e.to_string().contains("config.json"), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        if let Some(real) = installed_model_dir() {
            std::fs::copy(real.join("config.json"), dir.join("config.json")).expect("copy");
            let e = Model::load(&dir).expect_err("no tokenizer");
            assert!(e.to_string().contains("tokenizer.json"), "{e}");
            std::fs::copy(real.join("tokenizer.json"), dir.join("tokenizer.json")).expect("copy");
            std::fs::write(dir.join("model.safetensors"), b"\x10\0\0\0\0\0\0\0{}").expect("w");
            let e = Model::load(&dir).expect_err("bad weights");
            assert!(e.to_string().contains("model.safetensors"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn embeds_meaning_and_survives_odd_input() {
        let Some(dir) = model_for_tests() else {
            return;
        };
        let m = Model::load(&dir).expect("load");
        assert_eq!(m.dim(), 384);
        let a = m.embed("How do I reset my account password?").expect("a");
        let b = m
            .embed("I forgot my login credentials and cannot sign in.")
            .expect("b");
        let c = m.embed("The weather in Lisbon is sunny today.").expect("c");
        assert!(cos(&a.vector, &b.vector) > 0.4, "related");
        assert!(cos(&a.vector, &c.vector) < 0.2, "unrelated");
        assert!(
            (cos(&a.vector, &a.vector) - 1.0).abs() < 1e-4,
            "unit length"
        );
        for odd in [
            "",
            "🙂🙂🙂",
            "请帮我重置密码",
            "\u{0}\u{fffd}",
            &"word ".repeat(200_000),
        ] {
            let e = m.embed(odd).expect("odd input embeds");
            assert_eq!(e.vector.len(), 384);
            assert!(e.tokens <= m.max_tokens());
        }
        assert!(m.embed(&"word ".repeat(1000)).expect("long").truncated);
        assert!(!a.truncated);
    }
}
