//! One readable line for an error and its causes. Error types commonly print their cause
//! in their own message *and* return it as their source (ours embed an `io::Error`,
//! hyper and tonic wrap theirs twice), so printing the chain naively repeats it:
//! "…: Permission denied (os error 13): Permission denied (os error 13)".

/// The messages of `error`'s chain joined by ": ", leaving out any cause whose message
/// the line already says.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let msg = e.to_string();
        if !msg.is_empty() && !line.contains(&msg) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&msg);
        }
        next = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening {path}: {source}")]
    struct Opening {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let e = anyhow::Error::new(Opening {
            path: "/repo/cas/usage",
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        })
        .context("opening repository /repo");
        assert_eq!(
            one_line(e.as_ref()),
            "opening repository /repo: opening /repo/cas/usage: Permission denied (os error 13)"
        );
    }
}
