//! `rewrite`: the storage migration after a KEK rotation. Every Secret is read in pages and replaced
//! with itself at its own `resourceVersion`; the apiserver sees the stored value is stale (another key
//! ID) and writes it again under the current key. A 409 (someone wrote it meanwhile) gets a fresh read
//! and another try; a 404 (deleted meanwhile) is counted and skipped. Requests are paced to `--qps`.
//!
//! Resuming: after each Secret a checkpoint file records the last one done (`namespace/name`, list
//! order = etcd key order). A run that finds a checkpoint for the same scope lists again from the start
//! and skips everything up to that name; a finished run removes the file. Continue tokens are not
//! kept: they expire with etcd compaction (5 minutes on kube-apiserver), a name does not.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde::{Deserialize, Serialize};

use super::is_status;

/// How many times one Secret is re-read and replaced after a 409.
const CONFLICT_RETRIES: usize = 5;

/// What to rewrite and how fast.
#[derive(Clone, Debug)]
pub struct Options {
    /// One namespace, or all.
    pub namespace: Option<String>,
    /// Requests per second (lists, replaces, re-reads).
    pub qps: f64,
    /// Secrets per list page.
    pub page: u32,
    /// Where progress is recorded for a resume.
    pub checkpoint: PathBuf,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Secrets listed (all pages).
    pub listed: u64,
    /// Replaced through the API by this run.
    pub replaced: u64,
    /// Skipped because a previous, interrupted run had done them.
    pub resumed: u64,
    /// Deleted between the list and their replace.
    pub vanished: u64,
    /// 409s answered by a fresh read and another replace.
    pub conflicts: u64,
    /// The checkpoint this run started after, if any.
    pub resumed_after: Option<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "listed {}, replaced {}, skipped (done before the interruption) {}, deleted meanwhile {}, conflicts retried {}",
            self.listed, self.replaced, self.resumed, self.vanished, self.conflicts
        )
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    /// `namespace` or `*` (all namespaces): a checkpoint only resumes the same scope.
    scope: String,
    /// `namespace/name` of the last Secret done.
    last: String,
    /// How many were done up to it (for the user).
    done: u64,
}

impl Checkpoint {
    fn load(path: &Path) -> Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is not a checkpoint", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written to a temp file and renamed over: a kill mid-write leaves the old one whole.
    fn store(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Rewrites every Secret in scope through `client`, drawing on `progress` (hidden when not a
/// terminal). On an error the checkpoint stays and a rerun resumes.
pub async fn rewrite(client: kube::Client, options: &Options, progress: &ProgressBar) -> Result<Report> {
    if !(options.qps.is_finite() && options.qps > 0.0) {
        bail!("--qps must be a positive number");
    }
    let api: Api<Secret> = match &options.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let scope = options.namespace.clone().unwrap_or_else(|| "*".into());
    let mut report = Report::default();
    let resume = match Checkpoint::load(&options.checkpoint)? {
        Some(c) if c.scope == scope => Some(c),
        Some(c) => bail!(
            "{} is a checkpoint of a rewrite of {:?}, not {scope:?}: finish that one or remove the file",
            options.checkpoint.display(),
            c.scope
        ),
        None => None,
    };
    report.resumed_after = resume.as_ref().map(|c| c.last.clone());
    let mut done = resume.as_ref().map_or(0, |c| c.done);
    progress.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} Secrets, {per_sec}, elapsed {elapsed}, ETA {eta} {msg}",
        )
        .context("progress template")?,
    );
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / options.qps));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut token: Option<String> = None;
    loop {
        let mut params = ListParams::default().limit(options.page);
        if let Some(t) = &token {
            params = params.continue_token(t);
        }
        pace.tick().await;
        let page = api.list(&params).await.context("listing Secrets")?;
        if token.is_none() {
            let remaining = page.metadata.remaining_item_count.unwrap_or(0);
            let total = u64::try_from(remaining).unwrap_or(0) + page.items.len() as u64;
            progress.set_length(total);
        }
        for secret in page.items {
            report.listed += 1;
            let namespace = secret.metadata.namespace.clone().unwrap_or_default();
            let name = secret.metadata.name.clone().unwrap_or_default();
            let id = format!("{namespace}/{name}");
            if resume
                .as_ref()
                .is_some_and(|c| id.as_bytes() <= c.last.as_bytes())
            {
                report.resumed += 1;
                progress.inc(1);
                continue;
            }
            let ns_api: Api<Secret> = Api::namespaced(api.clone().into_client(), &namespace);
            replace(&ns_api, secret, &mut pace, &mut report)
                .await
                .with_context(|| format!("rewriting {id}"))?;
            done += 1;
            Checkpoint {
                scope: scope.clone(),
                last: id,
                done,
            }
            .store(&options.checkpoint)?;
            progress.inc(1);
        }
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    progress.finish_with_message(format!("in {:.1?}", started.elapsed()));
    match std::fs::remove_file(&options.checkpoint) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("removing the finished checkpoint"),
    }
    Ok(report)
}

/// Replaces one Secret with itself; on 409 reads it again and retries.
async fn replace(
    api: &Api<Secret>,
    mut secret: Secret,
    pace: &mut tokio::time::Interval,
    report: &mut Report,
) -> Result<()> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    for _ in 0..=CONFLICT_RETRIES {
        pace.tick().await;
        match api.replace(&name, &PostParams::default(), &secret).await {
            Ok(_) => {
                report.replaced += 1;
                return Ok(());
            }
            Err(e) if is_status(&e, 404) => {
                report.vanished += 1;
                return Ok(());
            }
            Err(e) if is_status(&e, 409) => {
                report.conflicts += 1;
                pace.tick().await;
                match api.get_opt(&name).await? {
                    Some(fresh) => secret = fresh,
                    None => {
                        report.vanished += 1;
                        return Ok(());
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    bail!("still conflicting after {CONFLICT_RETRIES} fresh reads")
}
