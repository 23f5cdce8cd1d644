//! Which runtime a run uses: local processes on 127.0.0.1, or containers on the harness's own
//! Docker networks. `KLEIDI_RUNTIME=process|container` forces one; unset (or `auto`), a run uses
//! containers when a Docker engine answers on its socket, else processes. Every run says which
//! one it used and why.

use anyhow::{Result, bail};

/// The environment variable that forces a runtime.
pub const RUNTIME_ENV: &str = "KLEIDI_RUNTIME";

/// Where a run's components live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    /// Local processes on 127.0.0.1, each in its own temp dir.
    Process,
    /// Containers (testcontainers) on networks the run creates and removes.
    Container,
}

impl RuntimeKind {
    /// `process` or `container`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Container => "container",
        }
    }

    /// The runtime named `name`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "process" => Ok(Self::Process),
            "container" => Ok(Self::Container),
            other => bail!("unknown runtime {other:?} (process, container)"),
        }
    }

    /// `KLEIDI_RUNTIME` if set (and not `auto`), else containers when a Docker engine answers;
    /// with the reason, for the run's first line.
    pub fn choose() -> Result<(Self, String)> {
        match std::env::var(RUNTIME_ENV) {
            Ok(v) if !v.is_empty() && v != "auto" => {
                Ok((Self::parse(&v)?, format!("forced by {RUNTIME_ENV}={v}")))
            }
            _ => Ok(match crate::images::engine::api_version() {
                Ok(version) => (
                    Self::Container,
                    format!("a Docker engine answers (API {version})"),
                ),
                Err(why) => (Self::Process, format!("no Docker engine: {why:#}")),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for kind in [RuntimeKind::Process, RuntimeKind::Container] {
            assert_eq!(RuntimeKind::parse(kind.name()).ok(), Some(kind));
        }
        let err = RuntimeKind::parse("vm").err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("process, container")));
    }
}
