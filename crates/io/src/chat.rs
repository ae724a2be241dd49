//! Chat templates: the model's own Jinja template when it ships one, ChatML otherwise.

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

    /// Renders `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt`.
    /// The template a tokenizer ships (ChatML when it has none), with its BOS and EOS tokens.
    pub fn of(tokenizer: &crate::Tokenizer) -> Self {
        let token = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        Self::new(
            tokenizer.chat_template(),
            &token(tokenizer.bos_id()),
            &token(tokenizer.eos_ids().first().copied()),
        )
    }

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
    fn template_errors_are_reported() {
        let t = ChatTemplate::new(Some("{% for %}"), "", "");
        assert!(matches!(t.render(&[], true), Err(Error::Template(_))));
    }
}
