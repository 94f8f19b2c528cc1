//! Why the target did not take a write, and whether retrying can help: decided by the reply
//! code.

use bytes::Bytes;
use redis::Value;

/// Why a batch was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Retry the same batch later (OOM, LOADING, BUSY, TRYAGAIN, CLUSTERDOWN, MASTERDOWN,
    /// connection lost). Nothing of the batch was applied.
    #[error("{code}: {message}")]
    Transient { code: String, message: String },
    /// Retrying cannot help. `applied` says whether the transaction ran (a runtime error of one
    /// command inside EXEC) or was refused whole; `op` is the failing operation's index.
    #[error("{code}: {message}")]
    Permanent {
        code: String,
        message: String,
        op: Option<usize>,
        applied: bool,
    },
    /// A target without transactions refused op `done` for now (OOM, LOADING …): the ops
    /// before it ran, in order; `ran_after` of the ops after it ran as well. Retry from `done`
    /// (those that ran after it run again: at least once).
    #[error("{code}: {message}")]
    Interrupted {
        done: usize,
        ran_after: usize,
        code: String,
        message: String,
    },
}

impl ApplyError {
    /// Whether the error is the target refusing this connection (authentication), not one
    /// record's write: no record is to blame, so none is rejected or dead-lettered for it.
    pub fn is_authentication(&self) -> bool {
        matches!(self, ApplyError::Permanent { code, .. } if matches!(code.as_str(), "AUTH" | "NOAUTH" | "WRONGPASS"))
    }

    /// A command refused before it ran: transient or permanent by its code.
    pub(super) fn refused(code: String, message: String, op: Option<usize>) -> ApplyError {
        if is_transient(&code) {
            ApplyError::Transient { code, message }
        } else {
            ApplyError::Permanent {
                code,
                message,
                op,
                applied: false,
            }
        }
    }

    pub fn code(&self) -> &str {
        match self {
            ApplyError::Transient { code, .. }
            | ApplyError::Permanent { code, .. }
            | ApplyError::Interrupted { code, .. } => code,
        }
    }
}

/// Error codes worth retrying until they go away.
pub fn is_transient(code: &str) -> bool {
    matches!(
        code,
        "OOM"
            | "LOADING"
            | "BUSY"
            | "TRYAGAIN"
            | "CLUSTERDOWN"
            | "MASTERDOWN"
            | "NOREPLICAS"
            | "READONLY"
            | "NOMASTERLINK"
            | "MISCONF"
            // Cluster targets: the slot moved (the map is read again) or is moving.
            | "MOVED"
            | "ASK"
    )
}

/// A command a cluster target cannot run: its keys are in several slots.
pub(super) fn cross_slot(args: &[Bytes], op: Option<usize>) -> ApplyError {
    ApplyError::Permanent {
        code: "CROSSSLOT".into(),
        message: format!(
            "{} touches keys in several slots, which a cluster target cannot run in one command",
            String::from_utf8_lossy(&args[0]).to_ascii_uppercase()
        ),
        op,
        applied: op.is_some_and(|i| i > 0),
    }
}

pub(super) fn server_error(v: &Value) -> Option<(String, String)> {
    match v {
        Value::ServerError(e) => {
            let code = e.code().to_owned();
            let message = e.details().unwrap_or_default().to_owned();
            Some((code, message))
        }
        _ => None,
    }
}

/// Replies of pipelined ops (outside a transaction) that refused one for now: where to go on
/// from. `first` is the index of `results[0]` among the ops given to `exec`.
pub(super) fn interrupted(results: &[Value], first: usize) -> Option<ApplyError> {
    let (k, code, message) = results.iter().enumerate().find_map(|(k, v)| {
        let (code, message) = server_error(v)?;
        is_transient(&code).then_some((k, code, message))
    })?;
    let ran_after = results[k + 1..]
        .iter()
        .filter(|v| server_error(v).is_none())
        .count();
    Some(ApplyError::Interrupted {
        done: first + k,
        ran_after,
        code,
        message,
    })
}

/// The first runtime error in EXEC results that `ignore` does not excuse.
pub fn runtime_error(results: &[Value], ignore: impl Fn(&str) -> bool) -> Option<ApplyError> {
    results.iter().enumerate().find_map(|(i, v)| {
        let (code, message) = server_error(v)?;
        (!ignore(&code)).then_some(ApplyError::Permanent {
            code,
            message,
            op: Some(i),
            applied: true,
        })
    })
}
