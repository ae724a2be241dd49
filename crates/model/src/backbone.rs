//! The frozen backbone: token embeddings, decoder layers, final norm and LM head.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use mode_io::{GgufFile, HfFolder, Tokenizer};
use rand::{Rng, SeedableRng};

use crate::layers::{Linear, RmsNorm};
use crate::rope::Rope;
use crate::{Config, DecoderLayer, LayerCache, Result, Weights};

/// Key/value caches of every layer, for incremental decoding. Not `Clone`: its buffers are
/// written in place, so a copy would share them.
#[derive(Debug, Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
        }
    }

    /// Sets the room the caches allocate at their first write (they still grow past it), for
    /// a caller that knows how long its sequence can get.
    pub fn reserve(&mut self, positions: usize) {
        for l in &mut self.layers {
            l.reserve(positions);
        }
    }

    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every layer's first `positions` positions in buffers of their own, with room for
    /// `capacity` (see [`LayerCache::copy_prefix`]): what reading those tokens afresh gives.
    pub fn copy_prefix(&self, positions: usize, capacity: usize) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.copy_prefix(positions, capacity))
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }
}

/// A decoder-only language model.
pub struct Backbone {
    pub config: Config,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    /// The LM head is the embedding matrix itself (tied embeddings).
    pub lm_head_tied: bool,
    pub rope: Rope,
    source: PathBuf,
    device: Device,
    /// For weights held in f16/bf16: the fingerprint of the f32 weights they were rounded from,
    /// so that experts and models made over the f32 backbone still recognise it.
    f32_fingerprint: Option<String>,
}

impl Backbone {
    /// A backbone of `config`'s shape with [`random_weights`] from `seed`: what tests and
    /// benchmarks run on when no real weights are wanted.
    pub fn random(config: Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let weights = random_weights(&config, seed);
        Self::load(config, &weights, dtype, device)
    }

    /// Builds a backbone from `weights`, storing the large matrices in `dtype` (f32, f16 or bf16).
    pub fn load(config: Config, weights: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        if matches!(dtype, DType::F16 | DType::BF16) {
            // Rounding changes sampled values, hence the fingerprint: take it from the f32
            // weights first (a second, transient load).
            let fingerprint =
                Self::load(config.clone(), weights, DType::F32, device)?.fingerprint()?;
            let mut backbone = Self::load_as(config, weights, dtype, device)?;
            backbone.f32_fingerprint = Some(fingerprint);
            return Ok(backbone);
        }
        Self::load_as(config, weights, dtype, device)
    }

    fn load_as(config: Config, weights: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        let h = config.hidden_size;
        let embed_tokens = weights.get(
            &config,
            "model.embed_tokens.weight",
            &[config.vocab_size, h],
            dtype,
            device,
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                DecoderLayer::load(
                    &config,
                    weights,
                    &format!("model.layers.{i}"),
                    config.layer_window(i),
                    dtype,
                    device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm {
            weight: weights.get(
                &config,
                "model.norm.weight",
                &[h],
                crate::layers::small_dtype(dtype),
                device,
            )?,
            eps: config.rms_norm_eps,
            offset: config.norm_weight_offset() as f32,
        };
        // Some "tied" checkpoints still ship lm_head.weight; use it when it is there.
        let lm_head_tied =
            config.tie_word_embeddings && !weights.contains(&config, "lm_head.weight");
        let lm_head = if !lm_head_tied {
            Linear::new(
                weights.get(
                    &config,
                    "lm_head.weight",
                    &[config.vocab_size, h],
                    dtype,
                    device,
                )?,
                None,
            )
        } else {
            Linear::new(embed_tokens.clone(), None)
        };
        let freq_factors = weights.gguf_rope_freq_factors()?;
        let rope = Rope::new(&config, freq_factors.as_deref());
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            lm_head_tied,
            rope,
            source: weights.path().to_path_buf(),
            device: device.clone(),
            f32_fingerprint: None,
        })
    }

    /// Opens a `.gguf` file or a Hugging Face folder and returns the model and its tokenizer.
    ///
    /// Before reading any weights it estimates the memory the load needs
    /// ([`Self::load_bytes`]) and refuses, with the numbers, when the machine has less available;
    /// [`Self::open_unchecked`] skips that check.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<(Self, Tokenizer)> {
        Self::open_impl(path, dtype, device, true)
    }

    /// [`Self::open`] without the memory check (`--no-memory-check`).
    pub fn open_unchecked(path: &Path, dtype: DType, device: &Device) -> Result<(Self, Tokenizer)> {
        Self::open_impl(path, dtype, device, false)
    }

    fn open_impl(
        path: &Path,
        dtype: DType,
        device: &Device,
        check_memory: bool,
    ) -> Result<(Self, Tokenizer)> {
        let (config, weights, tokenizer) = if path.is_dir() {
            let folder = HfFolder::open(path)?;
            let config = Config::from_hf(&folder)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            check_vocab(&tokenizer, &config, &path.join("tokenizer.json"))?;
            (config, Weights::Hf(folder), tokenizer)
        } else {
            let gguf = GgufFile::open(path)?;
            let config = Config::from_gguf(&gguf)?;
            let tokenizer = Tokenizer::from_gguf(&gguf)?;
            check_vocab(&tokenizer, &config, path)?;
            (config, Weights::Gguf(gguf), tokenizer)
        };
        if check_memory {
            check_load_memory(path, &config, dtype, mode_io::memory::available_bytes())?;
        }
        let model = Self::load(config, &weights, dtype, device)?;
        Ok((model, tokenizer))
    }

    /// Peak bytes of loading a backbone of `config` in `dtype`: its weights as held, or the
    /// transient f32 copy that f16/bf16 loads fingerprint first, plus the largest tensor
    /// being converted.
    pub fn load_bytes(config: &Config, dtype: DType) -> u64 {
        // Saturating: huge sizes from a hostile config must be refused by the memory check,
        // not wrap around to a small number that passes it.
        let params = config.num_parameters() as u64;
        let held = match dtype {
            DType::F16 | DType::BF16 => params.saturating_mul(4),
            other => params.saturating_mul(other.size_in_bytes() as u64),
        };
        let largest = (config.vocab_size as u64)
            .saturating_mul(config.hidden_size as u64)
            .saturating_mul(4);
        held.saturating_add(largest)
    }

    /// The file or folder this backbone was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The dtype of what is trained beside this backbone and added to it (experts, gates, LoRA
    /// adapters) when it is loaded for inference: f32 (f64 over an f64 backbone), however the
    /// frozen matrices are stored. Rounding the frozen weights (f16, bf16, Q8_0, Q4_1) is a choice
    /// of speed over the backbone; the trained tensors are few and stay as they were trained.
    pub fn adapter_dtype(&self) -> DType {
        crate::layers::small_dtype(self.embed_tokens.dtype())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings for `ids` (`[batch, seq]`), as `[batch, seq, hidden]` in f32 (f64 for
    /// an f64 model), scaled where the architecture scales them.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        let dtype = crate::layers::small_dtype(x.dtype());
        let x = x
            .to_dtype(dtype)?
            .reshape((b, t, self.config.hidden_size))?;
        Ok(match self.config.embedding_scale() {
            // Rounded to the activation dtype first, as Hugging Face does.
            Some(scale) => (x * round_to(scale, dtype))?,
            None => x,
        })
    }

    /// Runs the layers on `ids` (`[batch, seq]`) and returns the final-normed hidden states
    /// `[batch, seq, hidden]`. With a cache, positions continue after what it holds.
    pub fn forward_hidden(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.len());
        let rope = self.rope.tables(start, t, &self.device)?;
        let mut x = self.embed(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &rope, layer_cache)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Logits for hidden states of any leading shape.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?)
    }

    /// Full forward: logits `[batch, seq, vocab]`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, cache)?;
        self.logits(&hidden)
    }

    /// Forward that only computes logits for the last position: `[batch, vocab]`. This is what
    /// generation needs, and it skips the LM head for every prompt position but one.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, cache)?;
        let t = hidden.dims()[1];
        self.logits(&hidden.i((.., t - 1, ..))?.contiguous()?)
    }

    /// Every tensor of the backbone under its Hugging Face name; a tied LM head is listed once,
    /// as the embeddings.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (i, layer) in self.layers.iter().enumerate() {
            out.extend(
                layer
                    .named_tensors()
                    .into_iter()
                    .map(|(n, t)| (format!("model.layers.{i}.{n}"), t)),
            );
        }
        out.push(("model.norm.weight".to_string(), &self.norm.weight));
        if let (false, Some(w)) = (self.lm_head_tied, self.lm_head.weight.dense()) {
            out.push(("lm_head.weight".to_string(), w));
        }
        out
    }

    /// Holds every projection in `format` blocks, the LM head in Q8_0 (its errors reach every
    /// logit directly, so llama.cpp's 4-bit files keep it at 8 bits too) and the embeddings in
    /// f16: a quarter (Q8_0) or about a sixth (Q4_1) of the bytes a decode step reads in f32.
    /// Inference only (training needs the weights as tensors); the fingerprint stays that of the
    /// weights before.
    pub fn quantize(&mut self, format: crate::compact::BlockFormat) -> Result<()> {
        let fingerprint = self.fingerprint()?;
        for layer in &mut self.layers {
            for (_, linear) in layer.linears_mut() {
                linear.quantize(format)?;
            }
            layer.fuse_quantized()?;
        }
        self.lm_head.quantize(crate::compact::BlockFormat::Q8_0)?;
        if self.embed_tokens.dtype() == DType::F32 {
            self.embed_tokens = self.embed_tokens.to_dtype(DType::F16)?;
        }
        self.f32_fingerprint = Some(fingerprint);
        Ok(())
    }

    /// Whether any large matrix is held as quantised blocks, which training cannot use.
    pub fn is_quantized(&self) -> bool {
        let quantized = |l: &crate::layers::Linear| matches!(l.weight, crate::Weight::Quantized(_));
        quantized(&self.lm_head)
            || self
                .layers
                .iter()
                .flat_map(|l| l.linears())
                .any(|(_, l)| quantized(l))
    }

    /// Writes the backbone as a Hugging Face folder (`config.json`, `model.safetensors` in f32,
    /// `tokenizer.json`) that [`Self::open`] loads back; atomically.
    pub fn save_hf_folder(&self, dir: &Path, tokenizer: &Tokenizer) -> Result<()> {
        if self.is_quantized() {
            return Err(candle_core::Error::Msg(
                "a backbone loaded with quantised weights cannot be saved as a Hugging Face folder; \
                 load it as f32"
                    .into(),
            )
            .into());
        }
        let io = |e: std::io::Error| mode_io::Error::io(dir, e);
        let tmp = mode_io::atomic::temp_dir_beside(dir).map_err(io)?;
        let json = serde_json::to_vec_pretty(&self.config.to_hf_json()).expect("config serialises");
        std::fs::write(tmp.path().join("config.json"), json).map_err(io)?;
        let tensors: HashMap<String, Tensor> = self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors"))?;
        tokenizer
            .inner()
            .save(tmp.path().join("tokenizer.json"), false)
            .map_err(|e| mode_io::Error::io(dir, std::io::Error::other(e.to_string())))?;
        mode_io::atomic::commit_dir(tmp, dir).map_err(io)?;
        Ok(())
    }

    /// Attaches fresh LoRA adapters of `rank` to the projections named in `targets` (e.g.
    /// `q_proj`, `down_proj`) of every layer. Deterministic in `seed`.
    pub fn attach_lora(
        &mut self,
        rank: usize,
        alpha: f64,
        targets: &[&str],
        seed: u64,
    ) -> Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dtype = self.adapter_dtype();
        for layer in &mut self.layers {
            for (name, linear) in layer.linears_mut() {
                let short = name.rsplit('.').next().unwrap_or(name);
                if targets.contains(&short) {
                    linear.lora = Some(crate::layers::Lora::new(
                        linear.in_features(),
                        linear.out_features(),
                        rank,
                        alpha,
                        &mut rng,
                        dtype,
                        &self.device,
                    )?);
                }
            }
        }
        Ok(())
    }

    /// LoRA adapter tensors of every layer, as `model.layers.{i}.{proj}.lora_{A,B}`.
    pub fn lora_tensors(&self) -> Vec<(String, &Tensor)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.lora_tensors()
                    .into_iter()
                    .map(move |(n, t)| (format!("model.layers.{i}.{n}"), t))
            })
            .collect()
    }

    /// Identifies the backbone's weights: SHA-256 over the configuration and, per tensor in
    /// name order, its name, shape and 1024 evenly spaced values (as f32). Independent of the
    /// file format the same weights come in; different for different weights. Weights loaded in
    /// f16/bf16 report the fingerprint of the f32 weights they were rounded from.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        if let Some(f) = &self.f32_fingerprint {
            return Ok(f.clone());
        }
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self.config).expect("config serialises"));
        let mut tensors = self.named_tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in tensors {
            h.update(name.as_bytes());
            for d in t.dims() {
                h.update((*d as u64).to_le_bytes());
            }
            let flat = t.flatten_all()?;
            let n = flat.elem_count();
            let stride = (n / 1024).max(1);
            let idx: Vec<u32> = (0..n)
                .step_by(stride)
                .take(1024)
                .map(|i| i as u32)
                .collect();
            let idx = Tensor::new(idx.as_slice(), t.device())?;
            let sample: Vec<f32> = flat
                .index_select(&idx, 0)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            for v in sample {
                h.update(v.to_le_bytes());
            }
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// A fresh, empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }
}

/// `v` rounded to `dtype` (f32 or f64) and back.
pub fn round_to(v: f64, dtype: DType) -> f64 {
    if dtype == DType::F32 {
        v as f32 as f64
    } else {
        v
    }
}

/// Refuses to load `path` when [`Backbone::load_bytes`] exceeds the `available` bytes.
pub fn check_load_memory(
    path: &Path,
    config: &Config,
    dtype: DType,
    available: Option<u64>,
) -> Result<()> {
    use mode_io::memory::gib;
    let need = Backbone::load_bytes(config, dtype);
    match available {
        Some(free) if need > free => Err(crate::Error::Memory {
            path: path.to_path_buf(),
            msg: format!(
                "loading {:.1}M parameters as {dtype:?} needs about {:.2} GiB, but only {:.2} GiB \
                 are available; free memory, or pass --no-memory-check to try anyway",
                config.num_parameters() as f64 / 1e6,
                gib(need),
                gib(free)
            ),
        }),
        _ => Ok(()),
    }
}

/// Refuses a tokenizer whose ids go past the model's embeddings: every text would fail (or
/// worse) at the first such token.
fn check_vocab(tokenizer: &Tokenizer, config: &Config, path: &Path) -> Result<()> {
    let ids = tokenizer.id_bound();
    if ids > config.vocab_size {
        return Err(crate::Error::Config {
            path: path.to_path_buf(),
            msg: format!(
                "the tokenizer has ids up to {}, beyond the model's vocabulary of {}",
                ids - 1,
                config.vocab_size
            ),
        });
    }
    Ok(())
}

/// Random weights of the real architecture, under Hugging Face names: linear and embedding
/// entries uniform with standard deviation 0.02 (as the backbones were initialised), norm scales
/// near 1. Deterministic in `seed`.
pub fn random_weights(config: &Config, seed: u64) -> Weights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    let bound = 0.02f32 * 3f32.sqrt();
    // Norm scales near 1: stored as they are, or as scale - 1 where the norm adds one.
    let norm_base = 1.0 - config.norm_weight_offset() as f32;
    let mut add = |name: String, shape: Vec<usize>, around_one: bool| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                if around_one {
                    norm_base + rng.random_range(-0.1f32..0.1)
                } else {
                    rng.random_range(-bound..bound)
                }
            })
            .collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches data");
        tensors.insert(name, t);
    };
    let h = config.hidden_size;
    let q = config.num_attention_heads * config.head_dim;
    let kv = config.num_key_value_heads * config.head_dim;
    let f = config.intermediate_size;
    add(
        "model.embed_tokens.weight".into(),
        vec![config.vocab_size, h],
        false,
    );
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for norm in crate::weights::hidden_norm_names(config) {
            add(format!("{p}.{norm}.weight"), vec![h], true);
        }
        add(format!("{p}.self_attn.q_proj.weight"), vec![q, h], false);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], false);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], false);
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, q], false);
        if config.attention_bias {
            add(format!("{p}.self_attn.q_proj.bias"), vec![q], false);
            add(format!("{p}.self_attn.k_proj.bias"), vec![kv], false);
            add(format!("{p}.self_attn.v_proj.bias"), vec![kv], false);
        }
        if config.qk_norm {
            add(
                format!("{p}.self_attn.q_norm.weight"),
                vec![config.head_dim],
                true,
            );
            add(
                format!("{p}.self_attn.k_norm.weight"),
                vec![config.head_dim],
                true,
            );
        }
        add(format!("{p}.mlp.gate_proj.weight"), vec![f, h], false);
        add(format!("{p}.mlp.up_proj.weight"), vec![f, h], false);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, f], false);
    }
    add("model.norm.weight".into(), vec![h], true);
    if !config.tie_word_embeddings {
        add("lm_head.weight".into(), vec![config.vocab_size, h], false);
    }
    Weights::Map {
        tensors,
        label: PathBuf::from(format!(
            "<random {:?} weights, seed {seed}>",
            config.architecture
        )),
    }
}
