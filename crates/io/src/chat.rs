//! Chat templates: the model's own Jinja template when it ships one; otherwise the turn format
//! its vocabulary has tokens for (Gemma's `<start_of_turn>`), or ChatML.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Renders conversations into the prompt text a chat model was trained on.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// ChatML, used when a model ships no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Gemma's turns (as in the instruction-tuned models' template: the assistant is `model`, a
/// system message is put before the first user turn), for a Gemma file without a template such
/// as the pretrained base model. The BOS is not written: prompts get it from the tokenizer.
const GEMMA_TURNS: &str = "{% set ns = namespace(system='') %}{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}{% else %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + (ns.system if loop.index0 <= 1 and message['role'] == 'user' else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

impl ChatTemplate {
    /// The model's template (`tokenizer.chat_template` in GGUF, `chat_template` in
    /// `tokenizer_config.json`), or ChatML.
    pub fn new(template: Option<&str>, bos_token: &str, eos_token: &str) -> Self {
        Self {
            source: template.unwrap_or(CHATML).to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        }
    }

    /// The template a tokenizer ships, with its BOS and EOS tokens; without one, Gemma's turns
    /// when the vocabulary has `<start_of_turn>` and `<end_of_turn>`; else ChatML.
    pub fn of(tokenizer: &crate::Tokenizer) -> Self {
        Self::own(tokenizer).unwrap_or_else(|| Self::with_tokens(CHATML, tokenizer))
    }

    /// The template a tokenizer ships or, without one, the turn format its vocabulary was made
    /// for (Gemma's); None when neither (unlike [`Self::of`], no ChatML guess).
    pub fn own(tokenizer: &crate::Tokenizer) -> Option<Self> {
        let gemma = ["<start_of_turn>", "<end_of_turn>"]
            .iter()
            .all(|t| tokenizer.token_to_id(t).is_some());
        let source = tokenizer.chat_template().or(gemma.then_some(GEMMA_TURNS))?;
        Some(Self::with_tokens(source, tokenizer))
    }

    fn with_tokens(source: &str, tokenizer: &crate::Tokenizer) -> Self {
        let token = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        Self::new(
            Some(source),
            &token(tokenizer.bos_id()),
            &token(tokenizer.eos_ids().first().copied()),
        )
    }

    /// Renders `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Template(e.to_string()))?;
        let template = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| Error::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None, "", "");
        let text = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gemma_turns_name_the_model_and_fold_the_system_message_in() {
        let t = ChatTemplate::new(Some(GEMMA_TURNS), "<bos>", "<eos>");
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi "),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Capital of France?"),
        ];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nCapital of France?<end_of_turn>\n\
             <start_of_turn>model\n"
        );
    }

    #[test]
    fn template_errors_are_reported() {
        let t = ChatTemplate::new(Some("{% for %}"), "", "");
        assert!(matches!(t.render(&[], true), Err(Error::Template(_))));
    }
}
