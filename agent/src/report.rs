//! How an error reaches the operator: one line, every cause once.
//!
//! Many of the agent's errors (thiserror enums) show their cause in their
//! own message (`cannot read {path}: {source}`) *and* return it from
//! `source()`, so that callers can still match on it. anyhow's `{:#}`
//! prints the whole chain, and the OS error then appears twice
//! (`…: Permission denied (os error 13): Permission denied (os error 13)`).
//! [`chain`] prints a cause only when the text before it does not already
//! contain it, which fixes that for every error type, including those of
//! other crates. Everything that prints an error chain (`main.rs`, the
//! demo) goes through it, and so does the message for a store that
//! cannot be opened ([`store_open_error`]: permission or lock). Owns no
//! task; no I/O besides looking at the store directory.

use std::error::Error;

/// `error: cause: cause…`, leaving out each cause that the messages before
/// it already show.
pub fn chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let shown = e.to_string();
        if !shown.is_empty() && !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        cause = e.source();
    }
    text
}

/// Whether any error in the chain is an I/O error of this kind.
pub fn has_io_kind(error: &(dyn Error + 'static), kind: std::io::ErrorKind) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == kind)
        {
            return true;
        }
        current = e.source();
    }
    false
}

/// The store could not be opened: say whether the agent's user lacks
/// permission (the usual case when the agent runs without systemd, whose
/// `StateDirectory=` would have made the directory) or the store is locked
/// by another agent. Works on the error of any store implementation: it
/// looks at the I/O errors in the chain and at the directory itself.
pub fn store_open_error<E>(path: &std::path::Path, error: E) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    use std::io::ErrorKind;
    let unwritable = not_writable(path);
    let denied = has_io_kind(&error, ErrorKind::PermissionDenied) || unwritable.is_some();
    let text = chain(&error);
    let hint = if denied {
        let dir = unwritable.unwrap_or_else(|| path.to_owned());
        let owner = std::fs::metadata(&dir)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                format!(" (owner uid {}, mode {:04o})", m.uid(), m.mode() & 0o7777)
            })
            .unwrap_or_default();
        format!(
            ": permission denied: the agent's user (uid {}) cannot write to {}{owner}. \
             The package's postinst makes /var/lib/esl-agent for the esl-agent user; \
             otherwise run `install -d -o esl-agent -g esl-agent -m 0750 {}`",
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() },
            dir.display(),
            path.parent().unwrap_or(path).display()
        )
    } else if (has_io_kind(&error, ErrorKind::WouldBlock)
        || text.to_ascii_lowercase().contains("lock"))
        // The SQLite store says so itself ("in use by another esl-agent").
        && !text.contains("another esl-agent")
    {
        ": it is locked (is another agent running on it?)".to_owned()
    } else {
        String::new()
    };
    anyhow::Error::new(error).context(format!("cannot open the store at {}{hint}", path.display()))
}

/// The store directory, or the nearest existing directory above it (where
/// it would be created), when the process may not write there.
fn not_writable(path: &std::path::Path) -> Option<std::path::PathBuf> {
    use nix::unistd::{access, AccessFlags};
    let existing = path.ancestors().find(|p| p.exists())?;
    access(existing, AccessFlags::W_OK | AccessFlags::X_OK)
        .is_err()
        .then(|| existing.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[derive(Debug, thiserror::Error)]
    #[error("store directory {path}: {source}")]
    struct DirError {
        path: String,
        source: std::io::Error,
    }

    fn denied() -> std::io::Error {
        std::io::Error::from_raw_os_error(13)
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let e = Err::<(), _>(DirError {
            path: "/var/lib/esl-agent".into(),
            source: denied(),
        })
        .context("cannot open the store")
        .unwrap_err();
        let anyhow_text = format!("{e:#}");
        let os = denied().to_string();
        assert_eq!(anyhow_text.matches(&os).count(), 2, "{anyhow_text}");
        let text = chain(e.as_ref());
        assert_eq!(text.matches(&os).count(), 1, "{text}");
        assert_eq!(
            text,
            format!("cannot open the store: store directory /var/lib/esl-agent: {os}")
        );
    }

    #[test]
    fn causes_not_in_the_message_are_all_kept() {
        let e = Err::<(), _>(denied())
            .context("reading ca.pem")
            .context("mqtt transport")
            .unwrap_err();
        assert_eq!(
            chain(e.as_ref()),
            format!("mqtt transport: reading ca.pem: {}", denied())
        );
        assert!(has_io_kind(
            e.as_ref(),
            std::io::ErrorKind::PermissionDenied
        ));
        assert!(!has_io_kind(e.as_ref(), std::io::ErrorKind::WouldBlock));
    }

    #[test]
    fn a_store_that_cannot_be_opened_says_permission_or_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let denied_error = DirError {
            path: path.display().to_string(),
            source: denied(),
        };
        let text = chain(store_open_error(&path, denied_error).as_ref());
        assert!(text.contains("permission denied"), "{text}");
        assert!(!text.contains("another agent"), "{text}");
        assert!(text.contains("install -d -o esl-agent"), "{text}");
        assert_eq!(text.matches(&denied().to_string()).count(), 1, "{text}");

        let locked = DirError {
            path: path.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
        };
        let text = chain(store_open_error(&path, locked).as_ref());
        assert!(text.contains("another agent"), "{text}");
        assert!(!text.contains("permission"), "{text}");
    }
}
