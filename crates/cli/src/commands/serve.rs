use anyhow::{Context, Result};
use mode_serve::{Limits, Served};

use super::ModelArgs;

/// Serve a model over an OpenAI-compatible HTTP API.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Endpoints: POST /v1/completions, POST /v1/chat/completions (\"stream\": true \
    for server-sent events), GET /v1/models, GET /health. Requests run one at a time in arrival \
    order.\n\n\
    Example:\n  mode serve --model models/code-math --port 8080\n  \
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n    \
    -d '{\"model\": \"code-math\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to bind; anything but loopback exposes the model to the network
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model name clients use (default: the model folder's or backbone's name)
    #[arg(long)]
    name: Option<String>,
    /// Longest prompt accepted, in tokens
    #[arg(long, default_value_t = 4096)]
    max_prompt_tokens: usize,
    /// Largest max_tokens a request may ask for
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
}

pub fn run(args: Args) -> Result<()> {
    let (model, tokenizer) = args.model.load()?;
    let name = args.name.clone().unwrap_or_else(|| {
        let path = args
            .model
            .model
            .clone()
            .or_else(|| args.model.expert.first().cloned())
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
    let experts = match &model {
        mode_core::LoadedModel::Mode(m) => m.experts.iter().map(|e| e.name.clone()).collect(),
        mode_core::LoadedModel::Backbone(_) => Vec::new(),
    };
    let served = Served {
        name: name.clone(),
        model,
        tokenizer,
        experts,
        limits: Limits {
            max_prompt_tokens: args.max_prompt_tokens,
            max_new_tokens: args.max_tokens,
        },
    };
    let addr = std::net::SocketAddr::new(args.host, args.port);
    if !args.host.is_loopback() {
        eprintln!("mode: warning: binding {addr} exposes the model beyond this machine");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    eprintln!("mode: serving `{name}` on http://{addr} (Ctrl-C stops)");
    runtime
        .block_on(mode_serve::serve(served, addr))
        .with_context(|| format!("serving on {addr}"))
}
