//! The workload: concurrent writers and readers of Secrets through the nodes' apiservers, as clients
//! hit a load-balanced control plane; every operation recorded with its outcome (ok, fail, or
//! unknown when it timed out and may or may not have happened). And the final reads after the heal,
//! through every node, warm and cold, that the read-back checker judges.
//!
//! Two ways in ([`Via`]): straight to each node's envelope and etcd (kube-apiserver's storage layer,
//! the default), or as a user's client does, with kube-rs `Api<Secret>` against each node's Secrets
//! API ([`SecretsApis`]), which stores through that node's current envelope.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cluster::{Apiservers, Cluster, PREFIX};
use super::history::{Cache, Event, History, Op, OpRecord, Outcome, digest};
use crate::Envelope;
use crate::apiserver::object::Keys;
use crate::apiserver::{EtcdStore, Storage};
use crate::kubeapi::{ApiServer, Secrets};

/// Where the workload's operations go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Via {
    /// Each node's envelope and etcd directly, as kube-apiserver's storage layer does.
    #[default]
    Envelope,
    /// Each node's Secrets API over HTTP with kube-rs, as a user's client does: a write is a PUT
    /// (a POST the first time), a read a GET; the Secret's `data.value` is the written value.
    SecretsApi,
}

/// The namespace every workload Secret lives in.
const NAMESPACE: &str = "default";
/// The data key that holds a workload Secret's value.
const DATA_KEY: &str = "value";

/// How hard the workload pushes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Concurrent writers.
    pub writers: usize,
    /// Concurrent readers.
    pub readers: usize,
    /// Distinct keys written (`/registry/secrets/default/s-<n>`).
    pub keys: usize,
    /// Keys written once before the clients start and never again (`…/default/pre-<n>`): old data
    /// that must survive every fault and rotation; readers read them too.
    pub preload: usize,
    /// Pause between one client's operations.
    pub pause: Duration,
    /// An operation still running after this is recorded as unknown.
    pub op_timeout: Duration,
    /// Where the operations go.
    pub via: Via,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            writers: 4,
            readers: 4,
            keys: 64,
            preload: 16,
            pause: Duration::from_millis(50),
            op_timeout: Duration::from_secs(5),
            via: Via::Envelope,
        }
    }
}

/// The etcd key of workload key `n`.
pub fn key(n: usize) -> String {
    format!("{PREFIX}default/s-{n}")
}

/// The etcd key of preloaded key `n`.
pub fn preload_key(n: usize) -> String {
    format!("{PREFIX}default/pre-{n}")
}

/// One Secrets API per node over that node's current envelope (a cold restart swaps the envelope
/// under the running server), and a kube-rs client for each. Unprobed: the cluster probes its nodes.
pub struct SecretsApis {
    servers: Vec<ApiServer>,
    clients: Vec<Api<Secret>>,
}

impl SecretsApis {
    /// Starts a Secrets API on a free loopback port for every node of `cluster`.
    pub async fn start(cluster: &Cluster) -> anyhow::Result<Self> {
        let mut apis = Self {
            servers: Vec::new(),
            clients: Vec::new(),
        };
        for index in 0..cluster.nodes.len() {
            let storage = Storage::following(cluster.store.clone(), cluster.apiservers.clone(), index);
            apis.add(storage).await?;
        }
        Ok(apis)
    }

    async fn add(&mut self, storage: Storage) -> anyhow::Result<()> {
        let secrets = Secrets::new(storage, Keys::default());
        let server = ApiServer::start_unprobed(secrets, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let config = kube::Config::new(server.url().parse().context("the Secrets API's URL")?);
        let client = kube::Client::try_from(config).context("a kube client for the Secrets API")?;
        self.clients.push(Api::namespaced(client, NAMESPACE));
        self.servers.push(server);
        Ok(())
    }

    /// Stops every server.
    pub async fn stop(self) -> anyhow::Result<()> {
        for server in self.servers {
            server.stop().await?;
        }
        Ok(())
    }
}

/// Where one client sends its operations.
#[derive(Clone)]
pub enum Target {
    /// The nodes' envelopes and etcd.
    Envelope(Apiservers, Box<EtcdStore>),
    /// The nodes' Secrets APIs.
    SecretsApi(Vec<Api<Secret>>),
}

impl Target {
    /// What `via` means on `cluster` (`apis` must be running for [`Via::SecretsApi`]).
    pub fn new(cluster: &Cluster, apis: Option<&SecretsApis>) -> Self {
        match apis {
            Some(apis) => Self::SecretsApi(apis.clients.clone()),
            None => Self::Envelope(cluster.apiservers.clone(), Box::new(cluster.store.clone())),
        }
    }

    fn nodes(&self) -> usize {
        match self {
            Self::Envelope(apiservers, _) => apiservers.read().map(|a| a.len()).unwrap_or(0),
            Self::SecretsApi(apis) => apis.len(),
        }
    }

    /// Writes `value` at `key` through node `node`.
    async fn write(&self, node: usize, key: &str, value: &[u8], timeout: Duration) -> Outcome {
        match self {
            Self::Envelope(apiservers, store) => {
                let Some(envelope) = envelope_of(apiservers, node) else {
                    return Outcome::Fail {
                        error: format!("no apiserver {node}"),
                    };
                };
                match envelope.write(key.as_bytes(), value) {
                    Err(e) => Outcome::Fail { error: e.to_string() },
                    Ok(stored) => {
                        match tokio::time::timeout(timeout, store.put(key.as_bytes(), stored)).await {
                            Ok(Ok(())) => Outcome::Ok,
                            // The put may have reached etcd before the error: unknown, not failed.
                            Ok(Err(e)) => Outcome::Unknown { why: e.to_string() },
                            Err(_) => Outcome::Unknown {
                                why: format!("no answer from etcd within {timeout:?}"),
                            },
                        }
                    }
                }
            }
            Self::SecretsApi(apis) => {
                let Some(api) = apis.get(node) else {
                    return Outcome::Fail {
                        error: format!("no Secrets API {node}"),
                    };
                };
                match tokio::time::timeout(timeout, put_secret(api, name_of(key), value)).await {
                    Ok(Ok(())) => Outcome::Ok,
                    Ok(Err(e)) => classify(&e),
                    Err(_) => Outcome::Unknown {
                        why: format!("no answer from the Secrets API within {timeout:?}"),
                    },
                }
            }
        }
    }

    /// Reads `key` through node `node`: the digest of its value (`None` when absent) and the outcome.
    async fn read(&self, node: usize, key: &str, timeout: Duration) -> (Option<String>, Outcome) {
        match self {
            Self::Envelope(apiservers, store) => match envelope_of(apiservers, node) {
                Some(envelope) => read_one(store, &envelope, key, timeout).await,
                None => (
                    None,
                    Outcome::Fail {
                        error: format!("no apiserver {node}"),
                    },
                ),
            },
            Self::SecretsApi(apis) => match apis.get(node) {
                Some(api) => read_secret(api, key, timeout).await,
                None => (
                    None,
                    Outcome::Fail {
                        error: format!("no Secrets API {node}"),
                    },
                ),
            },
        }
    }
}

fn envelope_of(apiservers: &Apiservers, node: usize) -> Option<Arc<Envelope>> {
    apiservers.read().ok()?.get(node).cloned()
}

/// The Secret name of a workload key (`/registry/secrets/default/s-3` → `s-3`).
fn name_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// Replaces the Secret `name` with one holding `value`, creating it if absent: kube-apiserver
/// updates Secrets unconditionally when the body has no `resourceVersion`.
async fn put_secret(api: &Api<Secret>, name: &str, value: &[u8]) -> kube::Result<()> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            DATA_KEY.to_owned(),
            ByteString(value.to_vec()),
        )])),
        ..Secret::default()
    };
    let params = PostParams::default();
    match api.replace(name, &params, &secret).await {
        Err(kube::Error::Api(status)) if status.code == 404 => match api.create(&params, &secret).await {
            // Another writer created it between the two calls.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                api.replace(name, &params, &secret).await.map(drop)
            }
            other => other.map(drop),
        },
        other => other.map(drop),
    }
}

/// GETs the Secret of `key`: the digest of its value (`None` when it does not exist).
async fn read_secret(api: &Api<Secret>, key: &str, timeout: Duration) -> (Option<String>, Outcome) {
    match tokio::time::timeout(timeout, api.get_opt(name_of(key))).await {
        Ok(Ok(None)) => (None, Outcome::Ok),
        Ok(Ok(Some(secret))) => match secret.data.as_ref().and_then(|d| d.get(DATA_KEY)) {
            Some(value) => (Some(digest(&value.0)), Outcome::Ok),
            None => (
                None,
                Outcome::Fail {
                    error: format!("Secret {} has no data.{DATA_KEY}", name_of(key)),
                },
            ),
        },
        Ok(Err(e)) => (None, classify(&e)),
        Err(_) => (
            None,
            Outcome::Unknown {
                why: format!("no answer from the Secrets API within {timeout:?}"),
            },
        ),
    }
}

/// What a client can tell from an error: a `Status` the server sent for a request it refused
/// (4xx, or the envelope refusing to encrypt: a 500 before anything reached etcd) is a failure; an
/// error from etcd, a 5xx otherwise, or a broken connection may come after the write landed.
fn classify(e: &kube::Error) -> Outcome {
    match e {
        kube::Error::Api(status) if status.code < 500 => Outcome::Fail {
            error: format!("{} {}: {}", status.code, status.reason, status.message),
        },
        kube::Error::Api(status) if status.code == 500 && !status.message.contains(ETCD_ERROR) => {
            Outcome::Fail {
                error: format!("{} {}: {}", status.code, status.reason, status.message),
            }
        }
        other => Outcome::Unknown {
            why: other.to_string(),
        },
    }
}

/// How the Secrets API's 500s name an etcd error (`StoreError::Etcd`): "… etcd at <endpoints>: …".
const ETCD_ERROR: &str = "etcd at ";

/// A running workload; [`Running::stop`] ends it.
pub struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    written: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Everything one client task needs.
#[derive(Clone)]
struct Client {
    target: Target,
    history: History,
    workload: Workload,
    written: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Workload {
    /// Writes the preloaded keys once, through the nodes in turn, before any fault; returns their
    /// plaintexts.
    pub async fn preload(&self, target: Target, history: History, seed: u64) -> Vec<Vec<u8>> {
        let client = self.client(target, history);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0070_7265_6c6f_6164);
        for n in 0..self.preload {
            client
                .write_key(&mut rng, preload_key(n), seed, usize::MAX, n as u64)
                .await;
        }
        std::mem::take(&mut *client.written.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn client(&self, target: Target, history: History) -> Client {
        Client {
            target,
            history,
            workload: self.clone(),
            written: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Starts the clients; client `i`'s choices come from `seed` and `i`.
    pub fn start(&self, target: Target, history: History, seed: u64) -> Running {
        let (stop, watch) = tokio::sync::watch::channel(false);
        let client = self.client(target, history);
        let mut tasks = Vec::new();
        for i in 0..self.writers + self.readers {
            let (client, mut watch) = (client.clone(), watch.clone());
            let writer = i < self.writers;
            let mut rng = StdRng::seed_from_u64(seed ^ ((i as u64 + 1) << 40));
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !*watch.borrow() {
                    n += 1;
                    if writer {
                        client.write(&mut rng, seed, i, n).await;
                    } else {
                        client.read(&mut rng).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(client.workload.pause) => {}
                        _ = watch.changed() => {}
                    }
                }
            }));
        }
        Running {
            stop,
            tasks,
            written: client.written,
        }
    }
}

impl Running {
    /// Stops every client, lets the operations in flight end (each is bounded by its timeout), and
    /// returns every plaintext written.
    pub async fn stop(self) -> Vec<Vec<u8>> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        std::mem::take(&mut *self.written.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Client {
    fn node(&self, rng: &mut StdRng) -> usize {
        rng.random_range(0..self.target.nodes().max(1))
    }

    async fn write(&self, rng: &mut StdRng, seed: u64, client: usize, n: u64) {
        let key = key(rng.random_range(0..self.workload.keys.max(1)));
        self.write_key(rng, key, seed, client, n).await;
    }

    async fn write_key(&self, rng: &mut StdRng, key: String, seed: u64, client: usize, n: u64) {
        // Taken before the apiserver is chosen: an op that picked an apiserver just before a cold
        // restart must not seem to have started after it.
        let start_ms = self.history.now_ms();
        let node = self.node(rng);
        // A marker a person can grep for, and random bytes no other value shares.
        let mut value = format!("kleidi-secret-{seed:x}-{client}-{n}-").into_bytes();
        value.extend((0..16).map(|_| rng.random_range(b'a'..=b'z')));
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(value.clone());
        let outcome = self
            .target
            .write(node, &key, &value, self.workload.op_timeout)
            .await;
        self.record(
            node,
            Op::Write,
            key,
            Some(digest(&value)),
            None,
            false,
            start_ms,
            outcome,
        );
    }

    async fn read(&self, rng: &mut StdRng) {
        // Taken before the apiserver is chosen: an op that picked an apiserver just before a cold
        // restart must not seem to have started after it.
        let start_ms = self.history.now_ms();
        let node = self.node(rng);
        let pick = rng.random_range(0..(self.workload.keys + self.workload.preload).max(1));
        let key = match pick.checked_sub(self.workload.keys) {
            Some(n) => preload_key(n),
            None => key(pick),
        };
        let (digest, outcome) = self.target.read(node, &key, self.workload.op_timeout).await;
        self.record(node, Op::Read, key, digest, None, false, start_ms, outcome);
    }

    #[allow(clippy::too_many_arguments)] // one record, its fields
    fn record(
        &self,
        node: usize,
        op: Op,
        key: String,
        digest: Option<String>,
        cache: Option<Cache>,
        final_read: bool,
        start_ms: u64,
        outcome: Outcome,
    ) {
        self.history.record(Event::Op(OpRecord {
            node,
            op,
            key,
            digest,
            cache,
            final_read,
            start_ms,
            end_ms: self.history.now_ms(),
            outcome,
        }));
    }
}

/// Reads `key` from etcd and decrypts it through `envelope`: the digest of the plaintext (`None`
/// when absent) and the outcome.
async fn read_one(
    store: &EtcdStore,
    envelope: &Envelope,
    key: &str,
    timeout: Duration,
) -> (Option<String>, Outcome) {
    let read = async {
        let Some(stored) = store.get(key.as_bytes()).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let (plain, _stale) = envelope
            .read(key.as_bytes(), &stored)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(Some(digest(&plain)))
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(digest)) => (digest, Outcome::Ok),
        Ok(Err(error)) => (None, Outcome::Fail { error }),
        Err(_) => (
            None,
            Outcome::Unknown {
                why: format!("no answer within {timeout:?}"),
            },
        ),
    }
}

/// After the heal: every key ever written, read through every node's apiserver as it is (warm) and
/// through a new apiserver per node (cold: empty cache, first probe first) — through the Secrets APIs
/// when the workload used them, a new one over the cold apiserver for the cold reads.
pub async fn final_reads(
    cluster: &Cluster,
    apis: Option<&SecretsApis>,
    keys: &BTreeSet<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    for index in 0..cluster.nodes.len() {
        let cold = cluster.cold_envelope(index).await?;
        let (warm, cold, cold_api) = match apis {
            None => {
                let warm = cluster
                    .envelope(index)
                    .ok_or_else(|| anyhow::anyhow!("no apiserver {index}"))?;
                let store = Box::new(cluster.store.clone());
                (
                    Target::Envelope(Arc::new(std::sync::RwLock::new(vec![warm])), store.clone()),
                    Target::Envelope(Arc::new(std::sync::RwLock::new(vec![cold])), store),
                    None,
                )
            }
            Some(apis) => {
                let warm = apis
                    .clients
                    .get(index)
                    .ok_or_else(|| anyhow::anyhow!("no Secrets API {index}"))?;
                let mut cold_api = SecretsApis {
                    servers: Vec::new(),
                    clients: Vec::new(),
                };
                cold_api.add(Storage::new(cluster.store.clone(), cold)).await?;
                (
                    Target::SecretsApi(vec![warm.clone()]),
                    Target::SecretsApi(cold_api.clients.clone()),
                    Some(cold_api),
                )
            }
        };
        for (target, cache) in [(warm, Cache::Warm), (cold, Cache::Cold)] {
            for key in keys {
                let start_ms = cluster.history.now_ms();
                let (digest, outcome) = target.read(0, key, timeout).await;
                cluster.history.record(Event::Op(OpRecord {
                    node: index,
                    op: Op::Read,
                    key: key.clone(),
                    digest,
                    cache: Some(cache),
                    final_read: true,
                    start_ms,
                    end_ms: cluster.history.now_ms(),
                    outcome,
                }));
            }
        }
        if let Some(cold_api) = cold_api {
            cold_api.stop().await?;
        }
    }
    Ok(())
}
