//! Placeholder: OpenAI and Anthropic providers (issue 2).
