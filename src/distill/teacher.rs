//! A teacher model behind an OpenAI-compatible `/v1/chat/completions` endpoint (a local
//! llama.cpp or vLLM server, or a hosted one), asked the very prompt the pipeline renders.
//! Only `memlora distill … --teacher URL` ever talks to it.

use std::time::Duration;

use serde_json::{json, Value};

use super::DistillError;
use crate::memory::prompts::RenderedPrompt;

/// How long a teacher may take to connect and to answer one prompt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// A bearer token for hosted endpoints, read from the environment when set.
pub const API_KEY_VARIABLE: &str = "MEMLORA_TEACHER_API_KEY";

pub struct Teacher {
    url: String,
    model: String,
    api_key: Option<String>,
    agent: ureq::Agent,
}

impl Teacher {
    /// `url` is the server (`http://host:8080`), its `/v1`, or the full completions URL.
    pub fn new(url: &str, model: &str) -> Teacher {
        let url = url.trim_end_matches('/');
        let url = if url.ends_with("/chat/completions") {
            url.to_owned()
        } else if url.ends_with("/v1") {
            format!("{url}/chat/completions")
        } else {
            format!("{url}/v1/chat/completions")
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(ANSWER_TIMEOUT))
            .user_agent(concat!("memlora/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let api_key = std::env::var(API_KEY_VARIABLE).ok().filter(|key| !key.is_empty());
        Teacher { url, model: model.to_owned(), api_key, agent }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// The teacher's answer to `prompt` (greedy). Chat endpoints cannot be given the start
    /// of the answer, so the teacher writes the whole JSON; the caller parses it.
    pub fn answer(&self, prompt: &RenderedPrompt) -> Result<String, DistillError> {
        let fail = |message: String| DistillError::Teacher { url: self.url.clone(), message };
        let mut body = json!({"model": self.model, "messages": prompt.messages, "temperature": 0.0, "stream": false});
        if let Some(max_tokens) = prompt.max_tokens {
            body["max_tokens"] = json!(max_tokens);
        }
        let mut request = self.agent.post(&self.url).header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = request.send(body.to_string()).map_err(|error| fail(error.to_string()))?;
        let status = response.status();
        let text = response.body_mut().read_to_string().map_err(|error| fail(error.to_string()))?;
        if !status.is_success() {
            let excerpt: String = text.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(200).collect();
            return Err(fail(format!("HTTP {status}: {excerpt}")));
        }
        let value: Value = serde_json::from_str(&text).map_err(|error| fail(format!("the answer is not JSON: {error}")))?;
        value
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| fail("the answer has no choices[0].message.content".into()))
    }
}
