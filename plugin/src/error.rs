//! Errors across the agent: each module has its own typed error (`thiserror`), and a cause is printed once,
//! at the edge that logs it, with [`error_chain`].

/// An error and its sources on one line, for logs and the final exit message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
