//! Tokenizers: from a Hugging Face `tokenizer.json`, or rebuilt from GGUF metadata so that a lone
//! GGUF file is enough.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::{Error, GgufFile, Result};

/// Llama 3's pre-tokenizer regex (digits in groups of up to three).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex (single digits).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tokens that end a turn or a document in the model families we support.
const STOP_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "</s>",
];

/// A tokenizer plus what generation needs to know about it.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    bos_id: Option<u32>,
    /// The model expects every sequence to begin with `bos_id` (Gemma, Llama 2).
    add_bos: bool,
    eos_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`; reads `tokenizer_config.json` next to it (chat template, special
    /// tokens) when present, and `eos_token_id` from `config.json`.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        crate::input::check(&path).map_err(|e| Error::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let model_config = read_json_if_exists(&dir.join("config.json"))?;

        let token_field = |key: &str| -> Option<String> {
            let v = config.as_ref()?.get(key)?;
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.get("content")?.as_str().map(str::to_string))
        };
        let bos_id = token_field("bos_token").and_then(|t| inner.token_to_id(&t));
        let mut eos_ids: Vec<u32> = token_field("eos_token")
            .and_then(|t| inner.token_to_id(&t))
            .into_iter()
            .collect();
        if let Some(v) = model_config.as_ref().and_then(|c| c.get("eos_token_id")) {
            let ids: Vec<u32> = match v {
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect(),
                v => v.as_u64().map(|x| x as u32).into_iter().collect(),
            };
            eos_ids.extend(ids);
        }
        let chat_template = config
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .and_then(|t| t.as_str())
            .map(str::to_string);
        let add_bos = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut tokenizer = Self::finish(inner, path, bos_id, eos_ids, chat_template);
        tokenizer.add_bos = add_bos && tokenizer.bos_id.is_some();
        Ok(tokenizer)
    }

    /// Rebuilds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`). Supports byte-level
    /// BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizers of SmolLM, GPT-2, Llama 3 and
    /// Qwen2, and SentencePiece-style BPE (`llama`: Gemma, Llama 2) from pieces and scores.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path().to_path_buf();
        let err = |msg: String| Error::Tokenizer {
            path: path.clone(),
            msg,
        };
        let model = gguf.get_str("tokenizer.ggml.model")?;
        let inner = match model {
            "gpt2" => byte_level_from_gguf(gguf)?,
            "llama" => {
                let pieces = gguf.get_str_array("tokenizer.ggml.tokens")?;
                let scores = gguf.get_f64_array("tokenizer.ggml.scores")?;
                let types = gguf.get_u64_array("tokenizer.ggml.token_type")?;
                let space_prefix = gguf
                    .opt_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                crate::spm::tokenizer(&pieces, &scores, &types, space_prefix).map_err(err)?
            }
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.model `{other}` is not supported yet (supported: byte-level \
                     BPE `gpt2`, SentencePiece BPE `llama`); use a Hugging Face folder with \
                     tokenizer.json instead"
                )))
            }
        };
        let id = |key: &str| -> Result<Option<u32>> { Ok(gguf.opt_u64(key)?.map(|v| v as u32)) };
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let eos_ids = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
        let chat_template = gguf
            .metadata("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        // llama.cpp's default: SentencePiece models add BOS unless the file says otherwise.
        let add_bos = gguf
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(model == "llama");
        let mut tokenizer = Self::finish(inner, path, bos_id, eos_ids, chat_template);
        tokenizer.add_bos = add_bos && tokenizer.bos_id.is_some();
        Ok(tokenizer)
    }
}

/// The byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) of a GGUF file.
fn byte_level_from_gguf(gguf: &GgufFile) -> Result<tokenizers::Tokenizer> {
    let path = gguf.path().to_path_buf();
    let err = |msg: String| Error::Tokenizer {
        path: path.clone(),
        msg,
    };
    {
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
        let token_types = if gguf.metadata("tokenizer.ggml.token_type").is_some() {
            gguf.get_u64_array("tokenizer.ggml.token_type")?
        } else {
            vec![1; tokens.len()]
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge {i} `{m}` has no space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let pre = gguf
            .metadata("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
            .unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            "default" | "gpt2" | "gpt-2" => byte_level.into(),
            "llama-bpe" | "llama3" | "qwen2" => {
                let pattern = if pre == "qwen2" {
                    QWEN2_PATTERN
                } else {
                    LLAMA3_PATTERN
                };
                let split = Split::new(
                    SplitPattern::Regex(pattern.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| err(e.to_string()))?;
                Sequence::new(vec![split.into(), byte_level.use_regex(false).into()]).into()
            }
            other => {
                return Err(err(format!(
                    "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported yet; \
                     supported: smollm, gpt2, llama-bpe, qwen2"
                )))
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // GGUF token types: 3 = control (special), 4 = user-defined (added, not special).
        let mut special = Vec::new();
        let mut added = Vec::new();
        for (i, &ty) in token_types.iter().enumerate() {
            let Some(token) = tokens.get(i) else { break };
            match ty {
                3 => special.push(AddedToken::from(token.to_string(), true)),
                4 => added.push(AddedToken::from(token.to_string(), false)),
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&added);
        Ok(inner)
    }
}

impl Tokenizer {
    /// A real byte-level BPE tokenizer with no merges: one token per byte (256) plus
    /// `<|endoftext|>` (id 256). For tests and tiny models; needs no files.
    pub fn byte_level() -> Self {
        let mut alphabet: Vec<String> = ByteLevel::alphabet()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        alphabet.sort();
        let mut vocab: tokenizers::models::bpe::Vocab = alphabet
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, i as u32))
            .collect();
        vocab.insert("<|endoftext|>".to_string(), 256);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .expect("a byte-level vocabulary is a valid BPE");
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner.add_special_tokens(&[AddedToken::from("<|endoftext|>", true)]);
        Self::finish(inner, PathBuf::from("<byte-level>"), None, vec![256], None)
    }

    fn finish(
        inner: tokenizers::Tokenizer,
        source: PathBuf,
        bos_id: Option<u32>,
        mut eos_ids: Vec<u32>,
        chat_template: Option<String>,
    ) -> Self {
        eos_ids.extend(STOP_TOKENS.iter().filter_map(|t| inner.token_to_id(t)));
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Self {
            inner,
            source,
            bos_id,
            add_bos: false,
            eos_ids,
            chat_template,
        }
    }

    /// Encodes text as written, adding no BOS/EOS. Special-token strings in the text (such as
    /// `<|im_start|>`) become their special ids, as chat templates require.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: self.source.clone(),
                msg: e.to_string(),
            })
    }

    /// Encodes a prompt for generation: [`Self::encode`], with the model's BOS in front where its
    /// tokenizer asks for one ([`Self::leading_bos`]) and the text does not already begin with
    /// it (a chat template that writes `bos_token`).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        Ok(match self.leading_bos() {
            Some(bos) if ids.first() != Some(&bos) => std::iter::once(bos).chain(ids).collect(),
            _ => ids,
        })
    }

    /// Decodes ids to text, keeping special tokens out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: self.source.clone(),
            msg: e.to_string(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// One past the largest id the tokenizer can produce (added tokens included).
    pub fn id_bound(&self) -> usize {
        self.inner
            .get_vocab(true)
            .into_values()
            .max()
            .map_or(0, |m| m as usize + 1)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The BOS id when the model expects every sequence to start with it (the tokenizer's
    /// `add_bos_token`), else `None`: what evaluation windows, training rows and prompts begin
    /// with.
    pub fn leading_bos(&self) -> Option<u32> {
        self.bos_id.filter(|_| self.add_bos)
    }

    /// Ids that end generation: the model's EOS and the end-of-turn tokens of known templates.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The token that ends a document in packed training data: the family's end-of-text token
    /// where the vocabulary has one, else the first end-of-sequence id.
    pub fn document_end_id(&self) -> Option<u32> {
        ["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"]
            .iter()
            .find_map(|t| self.inner.token_to_id(t))
            .or_else(|| self.eos_ids.first().copied())
    }

    /// The file the tokenizer was read from (`tokenizer.json` or a `.gguf`), for errors.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The Jinja chat template shipped with the model, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Text of a single token (special tokens included), for template rendering.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// SHA-256 of the tokenizer's full definition (vocabulary, merges, pre-tokenizer, special
    /// tokens): data prepared with one tokenizer is only valid with the same fingerprint.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = self.inner.to_string(false).unwrap_or_default();
        format!("{:x}", Sha256::digest(json.as_bytes()))
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    crate::read_json(path).map(Some)
}
