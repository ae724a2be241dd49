use std::io::Write;

use anyhow::{bail, Context, Result};
use mode_infer::{ChatMessage, ChatTemplate, Sampler, SamplingParams, StopText};

use super::{ModelArgs, RoutingArgs};

/// Generate text from a prompt, streaming it to stdout.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Speeds (prefill and decode tokens/s) are printed on stderr at the end.\n\n\
    Example:\n  mode generate --chat --temperature 0 --prompt \"What is the capital of France?\""
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    /// The prompt text
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn in the model's chat template
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the template's own, if any)
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Maximum number of tokens to generate
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    top_p: f64,
    /// Random seed for sampling
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop before the first occurrence of this text (repeatable; not printed)
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    if args.temperature.is_nan() || args.temperature < 0.0 {
        bail!("--temperature must be >= 0, got {}", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if args.stop.iter().any(String::is_empty) {
        bail!("--stop needs a non-empty text");
    }
    super::check_range(
        "--max-new-tokens",
        args.max_new_tokens,
        1,
        super::MAX_TOKENS,
    )?;
    let (model, tokenizer) = args.model.load()?;
    let lm = model.routed(args.routing.routing(&model)?)?;
    let text = if args.chat {
        let template = ChatTemplate::of(&tokenizer);
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        // A broken template is the model's: name the file it came from.
        template
            .render(&messages, true)
            .with_context(|| tokenizer.source().display().to_string())?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode_prompt(&text)?;
    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    });
    let mut stdout = std::io::stdout().lock();
    let mut stop = StopText::new(args.stop.iter().cloned());
    // A closed stdout (`| head`) ends generation.
    let mut print =
        |text: &str| stdout.write_all(text.as_bytes()).is_ok() && stdout.flush().is_ok();
    let (_, stats) = mode_infer::generate(
        lm.as_ref(),
        &tokenizer,
        &prompt,
        args.max_new_tokens,
        &mut sampler,
        |piece| print(&stop.push(piece)) && !stop.stopped(),
    )?;
    print(&stop.finish());
    writeln!(stdout)?;
    eprintln!(
        "mode: prompt {} tokens at {:.1} tokens/s; generated {} tokens at {:.1} tokens/s",
        stats.prompt_tokens,
        stats.prefill_tokens_per_sec(),
        stats.new_tokens,
        stats.decode_tokens_per_sec()
    );
    Ok(())
}
