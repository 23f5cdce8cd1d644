//! Which runtime a run uses: local processes on 127.0.0.1, or containers on the harness's own
//! Docker networks. `KLEIDI_RUNTIME=process|container` forces one; unset (or `auto`), a run uses
//! containers when a Docker engine answers on its socket, else processes. Every run says which
//! one it used and why.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Duration;

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
            _ => Ok(match engine_answers() {
                Ok(version) => (
                    Self::Container,
                    format!("a Docker engine answers (API {version})"),
                ),
                Err(why) => (Self::Process, format!("no Docker engine: {why}")),
            }),
        }
    }
}

/// The engine's API version, if one answers `GET /version` on its Unix socket within a second.
fn engine_answers() -> std::result::Result<String, String> {
    let socket = match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => host.trim_start_matches("unix://").to_string(),
        Ok(host) if !host.is_empty() => return Err(format!("DOCKER_HOST={host} is not a unix:// socket")),
        _ => "/var/run/docker.sock".to_string(),
    };
    let mut stream = UnixStream::connect(&socket).map_err(|e| format!("{socket}: {e}"))?;
    let limit = Some(Duration::from_secs(1));
    stream.set_read_timeout(limit).map_err(|e| e.to_string())?;
    stream.set_write_timeout(limit).map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n")
        .map_err(|e| format!("{socket}: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("{socket}: {e}"))?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let version: serde_json::Value =
        serde_json::from_str(body).map_err(|_| format!("{socket}: /version is not JSON"))?;
    version
        .get("ApiVersion")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("{socket}: /version has no ApiVersion"))
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
