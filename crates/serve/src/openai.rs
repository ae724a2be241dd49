//! The answers of the completion endpoints, typed as OpenAI's API shapes them: a whole
//! completion, and the chunks of a streamed one. `logprobs` is always `null` (the server
//! refuses requests that ask for it).

use serde::Serialize;

/// Token counts of a request (the prompt counted once, however many choices).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// An assistant message, or the part of one a chunk carries.
#[derive(Debug, Serialize)]
pub(crate) struct Message {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// What a choice holds: text (`/v1/completions`), a message (chat), or a message delta
/// (streamed chat).
#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Output {
    Text(String),
    Message(Message),
    Delta(Message),
}

/// One answer of several (`n`), or a piece of one.
#[derive(Debug, Serialize)]
pub(crate) struct Choice {
    pub index: usize,
    #[serde(flatten)]
    pub output: Output,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<()>,
}

impl Choice {
    pub fn new(index: usize, output: Output, finish_reason: Option<&'static str>) -> Self {
        Self {
            index,
            output,
            finish_reason,
            logprobs: None,
        }
    }
}

/// A whole completion, or one chunk of a streamed one (`usage` only where it is given).
#[derive(Debug, Serialize)]
pub(crate) struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn choices_serialise_in_openai_shapes() {
        let text = Choice::new(0, Output::Text("hi".into()), Some("stop"));
        assert_eq!(
            serde_json::to_value(&text).unwrap(),
            json!({"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": null})
        );
        let delta = Choice::new(
            1,
            Output::Delta(Message {
                role: Some("assistant"),
                content: None,
            }),
            None,
        );
        assert_eq!(
            serde_json::to_value(&delta).unwrap(),
            json!({"index": 1, "delta": {"role": "assistant"}, "finish_reason": null, "logprobs": null})
        );
        let whole = Completion {
            id: "x",
            object: "chat.completion",
            created: 1,
            model: "m",
            choices: vec![],
            usage: Some(Usage::new(3, 4)),
        };
        assert_eq!(
            serde_json::to_value(&whole).unwrap()["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        );
    }
}
