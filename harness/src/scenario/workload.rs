//! The workload: concurrent writers and readers of Secrets through the nodes' apiservers, as clients
//! hit a load-balanced control plane; every operation recorded with its outcome (ok, fail, or
//! unknown when it timed out and may or may not have happened). And the final reads after the heal,
//! through every node, warm and cold, that the read-back checker judges.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cluster::{Apiservers, Cluster, PREFIX};
use super::history::{Cache, Event, History, Op, OpRecord, Outcome, digest};
use crate::Envelope;
use crate::apiserver::EtcdStore;

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

/// A running workload; [`Running::stop`] ends it.
pub struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    written: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Everything one client task needs.
#[derive(Clone)]
struct Client {
    apiservers: Apiservers,
    store: EtcdStore,
    history: History,
    workload: Workload,
    written: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Workload {
    /// Writes the preloaded keys once, through the nodes in turn, before any fault; returns their
    /// plaintexts.
    pub async fn preload(
        &self,
        apiservers: Apiservers,
        store: EtcdStore,
        history: History,
        seed: u64,
    ) -> Vec<Vec<u8>> {
        let client = self.client(apiservers, store, history);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x0070_7265_6c6f_6164);
        for n in 0..self.preload {
            client
                .write_key(&mut rng, preload_key(n), seed, usize::MAX, n as u64)
                .await;
        }
        std::mem::take(&mut *client.written.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn client(&self, apiservers: Apiservers, store: EtcdStore, history: History) -> Client {
        Client {
            apiservers,
            store,
            history,
            workload: self.clone(),
            written: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Starts the clients; client `i`'s choices come from `seed` and `i`.
    pub fn start(&self, apiservers: Apiservers, store: EtcdStore, history: History, seed: u64) -> Running {
        let (stop, watch) = tokio::sync::watch::channel(false);
        let client = self.client(apiservers, store, history);
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
    fn node(&self, rng: &mut StdRng) -> Option<(usize, Arc<Envelope>)> {
        let apiservers = self.apiservers.read().ok()?;
        let n = rng.random_range(0..apiservers.len().max(1));
        apiservers.get(n).map(|e| (n, e.clone()))
    }

    async fn write(&self, rng: &mut StdRng, seed: u64, client: usize, n: u64) {
        let key = key(rng.random_range(0..self.workload.keys.max(1)));
        self.write_key(rng, key, seed, client, n).await;
    }

    async fn write_key(&self, rng: &mut StdRng, key: String, seed: u64, client: usize, n: u64) {
        // Taken before the apiserver is chosen: an op that picked an apiserver just before a cold
        // restart must not seem to have started after it.
        let start_ms = self.history.now_ms();
        let Some((node, envelope)) = self.node(rng) else {
            return;
        };
        // A marker a person can grep for, and random bytes no other value shares.
        let mut value = format!("kleidi-secret-{seed:x}-{client}-{n}-").into_bytes();
        value.extend((0..16).map(|_| rng.random_range(b'a'..=b'z')));
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(value.clone());
        let outcome = match envelope.write(key.as_bytes(), &value) {
            Err(e) => Outcome::Fail { error: e.to_string() },
            Ok(stored) => {
                match tokio::time::timeout(self.workload.op_timeout, self.store.put(key.as_bytes(), stored))
                    .await
                {
                    Ok(Ok(())) => Outcome::Ok,
                    // The put may have reached etcd before the error: unknown, not failed.
                    Ok(Err(e)) => Outcome::Unknown { why: e.to_string() },
                    Err(_) => Outcome::Unknown {
                        why: format!("no answer from etcd within {:?}", self.workload.op_timeout),
                    },
                }
            }
        };
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
        let Some((node, envelope)) = self.node(rng) else {
            return;
        };
        let pick = rng.random_range(0..(self.workload.keys + self.workload.preload).max(1));
        let key = match pick.checked_sub(self.workload.keys) {
            Some(n) => preload_key(n),
            None => key(pick),
        };
        let (digest, outcome) = read_one(&self.store, &envelope, &key, self.workload.op_timeout).await;
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
/// through a new apiserver per node (cold: empty cache, first probe first).
pub async fn final_reads(
    cluster: &Cluster,
    keys: &BTreeSet<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    for index in 0..cluster.nodes.len() {
        let warm = cluster
            .envelope(index)
            .ok_or_else(|| anyhow::anyhow!("no apiserver {index}"))?;
        let cold = cluster.cold_envelope(index).await?;
        for (envelope, cache) in [(warm, Cache::Warm), (cold, Cache::Cold)] {
            for key in keys {
                let start_ms = cluster.history.now_ms();
                let (digest, outcome) = read_one(&cluster.store, &envelope, key, timeout).await;
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
    }
    Ok(())
}
