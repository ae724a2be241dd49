use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use mode_serve::{Batching, Limits, RoutingDefaults, Served};

use super::{ModelArgs, RoutingArgs};

/// Serve a model over an OpenAI-compatible HTTP API.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Endpoints: POST /v1/completions, POST /v1/chat/completions (\"stream\": true \
    for server-sent events), GET /v1/models (with the per-request limits), GET /health. Requests \
    are batched: up to --parallel sequences decode together, each with its own experts; new \
    ones join between steps. \"stop\" (a string or up to 4) and \"n\" work as in \
    OpenAI's API; fields the server does not implement (logit_bias, logprobs, tools...) are \
    refused with 400 naming the field, unless they ask for nothing.\n\n\
    Experts per request: a completion request may add \"experts\": [\"code\"] (\"[]\" runs the \
    backbone alone), \"gate_top_k\" and \"gate_threshold\"; the --active-experts, --gate-top-k \
    and --gate-threshold flags are the defaults. \"model\": \"NAME/EXPERT\", as GET /v1/models \
    lists it, runs that expert alone. Unknown expert names answer 400.\n\n\
    Experts while serving: GET /v1/experts lists them; POST /v1/experts with \
    {\"path\": \"/abs/dir/x.expert.safetensors\", \"name\": \"optional\"} adds one (201; checked \
    against the backbone and the loaded experts' layout; 409 if the name is taken); \
    DELETE /v1/experts/NAME removes one. Both wait for the running requests to finish (no new \
    one starts meanwhile). The path is \
    read on the server's filesystem, so adding is off (403) unless --allow-expert-dir names \
    a directory that holds the file.\n\n\
    Example:\n  mode serve --model models/code-math --port 8080\n  \
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n    \
    -d '{\"model\": \"code-math\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    /// Let POST /v1/experts load expert files under DIR (repeatable; symlinks are resolved, so
    /// none leads out). Without it, adding experts while serving is off
    #[arg(long, value_name = "DIR")]
    allow_expert_dir: Vec<PathBuf>,
    /// Address to bind; anything but loopback exposes the model to the network
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model name clients use (default: the model folder's, the one expert's or the
    /// backbone's name)
    #[arg(long)]
    name: Option<String>,
    /// Longest prompt accepted, in tokens
    #[arg(long, default_value_t = 4096)]
    max_prompt_tokens: usize,
    /// Largest max_tokens a request may ask for
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Largest n (answers per request, each its own sequence in the batch) a request may ask for
    #[arg(long, default_value_t = 8)]
    max_n: usize,
    /// Most completion requests in the server at once (running or waiting their turn); more
    /// are answered 503 with Retry-After
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Most sequences decoded together, one token each per step in one batched forward (each
    /// of a request's n answers is a sequence). More give more tokens per second in all and
    /// fewer to each stream
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Most prompt tokens read in one step; a long prompt is read in chunks of this size
    /// between the running streams' decode steps, so they keep flowing
    #[arg(long, default_value_t = 256, value_name = "TOKENS")]
    prefill_chunk: usize,
    /// Memory for the running sequences' KV caches, in MiB: each reserves room for its prompt
    /// and max_tokens when it starts, and waits while it does not fit. A request that could
    /// never fit is refused with 400
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    kv_cache_mib: u64,
    /// Memory for the keys and values of prompts already read, in MiB: a prompt that starts
    /// like one of them (a chat template and system prompt, a conversation going on) reads only
    /// the rest. Least recently used first out; 0 turns it off. Requests with per-token expert
    /// routing (top-k, a threshold) are not cached
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    prompt_cache_mib: u64,
    /// Require `Authorization: Bearer KEY` on every request but GET /health (401 otherwise).
    /// Set it whenever --host is not loopback. Prefer the environment variable: a flag shows
    /// in the process list
    #[arg(long, env = "MODE_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    super::check_range("--max-tokens", args.max_tokens, 1, super::MAX_TOKENS)?;
    super::check_range(
        "--max-prompt-tokens",
        args.max_prompt_tokens,
        1,
        super::MAX_TOKENS,
    )?;
    super::check_range("--max-n", args.max_n, 1, 128)?;
    super::check_range("--max-queue", args.max_queue, 1, 1 << 20)?;
    super::check_range("--parallel", args.parallel, 1, 4096)?;
    super::check_range("--prefill-chunk", args.prefill_chunk, 1, super::MAX_TOKENS)?;
    super::check_range("--kv-cache-mib", args.kv_cache_mib as usize, 1, 1 << 24)?;
    super::check_range(
        "--prompt-cache-mib",
        args.prompt_cache_mib as usize,
        0,
        1 << 24,
    )?;
    if let Some(key) = &args.api_key {
        let printable = key.bytes().all(|b| b.is_ascii_graphic());
        if key.is_empty() || !printable {
            bail!("--api-key: use a non-empty key of printable ASCII without spaces");
        }
    }
    let (model, tokenizer) = args.model.load()?;
    let name = args.name.clone().unwrap_or_else(|| {
        // One expert names the model; several, like none, leave it the backbone's name.
        let single_expert = match args.model.expert.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        };
        let path = args
            .model
            .model
            .clone()
            .or(single_expert)
            .unwrap_or_else(|| {
                args.model
                    .backbone
                    .backbone
                    .clone()
                    .unwrap_or_else(|| mode_io::fetch::DEFAULT_BACKBONE.into())
                    .into()
            });
        let stem = path.file_name().map(|n| n.to_string_lossy().into_owned());
        stem.unwrap_or_else(|| "mode".into())
            .trim_end_matches(".gguf")
            .trim_end_matches(".expert.safetensors")
            .to_string()
    });
    // Checks the names and threshold against the model as loaded.
    let routing = args.routing.routing(&model)?;
    let model = model.into_mode()?;
    let mut served =
        Served::new(name.clone(), model, tokenizer).context("fingerprinting the backbone")?;
    served.limits = Limits {
        max_prompt_tokens: args.max_prompt_tokens,
        max_new_tokens: args.max_tokens,
        max_choices: args.max_n,
        max_queue: args.max_queue,
    };
    served.batching = Batching {
        parallel: args.parallel,
        prefill_chunk: args.prefill_chunk,
        kv_cache_bytes: args.kv_cache_mib << 20,
        prompt_cache_bytes: args.prompt_cache_mib << 20,
    };
    served.api_key = args.api_key.clone();
    served.routing = RoutingDefaults {
        experts: args.routing.active_experts.clone(),
        top_k: routing.top_k,
        threshold: routing.threshold,
    };
    for dir in &args.allow_expert_dir {
        served.allow_expert_dir(dir).context("--allow-expert-dir")?;
    }
    let addr = std::net::SocketAddr::new(args.host, args.port);
    if !args.host.is_loopback() && args.api_key.is_none() {
        eprintln!(
            "mode: warning: binding {addr} exposes the model beyond this machine to anyone; \
             set --api-key (or MODE_API_KEY) to require a key"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    eprintln!(
        "mode: serving `{}` on http://{addr} ({}; {} decoded together, up to {} requests in the server; Ctrl-C stops)",
        mode_io::term::printable(&name),
        if args.api_key.is_some() {
            "API key required"
        } else {
            "no API key"
        },
        args.parallel,
        args.max_queue
    );
    runtime
        .block_on(mode_serve::serve(served, addr))
        .with_context(|| format!("serving on {addr}"))
}
