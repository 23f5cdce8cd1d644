//! Point 5: cold start at scale. N Secrets are written through 3 simulated apiservers across
//! restarts and KEK rotations, then 3 cold apiservers each read all N back. Each cold apiserver
//! should cost one Decrypt RPC per distinct seed in etcd, and kleidi one backend decrypt item per
//! Decrypt, however large N is.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kleidi_harness::Envelope;
use kleidi_harness::apiserver::{Authority, EtcdStore, connect_unix, encrypted_object};
use kleidi_harness::runtime::{Etcd, KleidiPlugin, OpenBao, OpenBaoSpec};
use tokio::task::JoinSet;

use super::audit::{self, Calls};

/// Where the Secrets live.
pub const PREFIX: &str = "/registry/secrets/bench/";
/// The provider name every simulated apiserver uses (the same EncryptionConfiguration everywhere).
const PROVIDER: &str = "kleidi";
/// Simulated apiservers writing at once, and reading afterwards.
pub const APISERVERS: usize = 3;
/// What happens before each fifth of the writes: the writes are spread over 3 generations of
/// apiservers and 2 KEK rotations, so every apiserver writes with 5 seeds in turn.
const SCHEDULE: [Step; 5] = [
    Step::Start,
    Step::Rotate,
    Step::Restart,
    Step::Rotate,
    Step::Restart,
];
/// Puts in flight at once: etcd batches concurrent proposals into one fsync.
const PUTS_IN_FLIGHT: usize = 64;
/// Values encrypted and put per round.
const CHUNK: usize = 2_000;
/// A real apiserver probes every minute; writes stop 3 minutes after the last good probe.
const PROBE_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Start,
    Restart,
    Rotate,
}

/// One cold apiserver's read of all N.
#[derive(Clone, Copy, Debug)]
pub struct Reader {
    /// Decrypt RPCs it sent (its Envelope's counter).
    pub decrypt_rpcs: u64,
    /// Reads served from its cache.
    pub cache_hits: u64,
    /// What kleidi asked OpenBao for meanwhile.
    pub backend: Calls,
    /// Wall time of the etcd range plus every decrypt and check.
    pub seconds: f64,
}

/// The result for one N.
#[derive(Clone, Debug)]
pub struct Row {
    /// Secrets written and read.
    pub n: usize,
    /// Distinct (key_id, encryptedDEKSource) pairs among the raw values in etcd.
    pub distinct_seeds: usize,
    /// Distinct key_ids among them (KEK versions used).
    pub key_ids: usize,
    /// Wall time of all writes (encrypt + put), rotations and restarts included.
    pub write_seconds: f64,
    /// Each cold apiserver, in the order they read.
    pub readers: Vec<Reader>,
}

impl Row {
    /// Whether every reader cost exactly one Decrypt RPC and one backend item per seed.
    pub fn holds(&self) -> bool {
        let seeds = self.distinct_seeds as u64;
        self.readers
            .iter()
            .all(|r| r.decrypt_rpcs == seeds && r.backend.decrypt_items == seeds)
    }

    /// The slowest reader's time.
    pub fn read_all_seconds(&self) -> f64 {
        self.readers.iter().map(|r| r.seconds).fold(0.0, f64::max)
    }
}

/// The plaintext of Secret `i`: a few hundred bytes that name it, so a value read under another key
/// (or another's value) cannot pass the check.
pub fn plaintext(i: usize) -> Vec<u8> {
    let mut value = format!("k8s\0\n\u{2}v1\u{12}\u{6}Secret bench/{i} data=").into_bytes();
    let fill = b'a' + (i % 26) as u8;
    value.resize(320, fill);
    value
}

fn key(i: usize) -> String {
    format!("{PREFIX}{i:07}")
}

/// A simulated apiserver start: its own connection to kleidi, a new Envelope, the startup probe
/// (Status, then Encrypt of a new seed).
async fn apiserver(socket: &Path) -> Result<Envelope> {
    let kms = connect_unix(socket, Authority::Localhost).await?;
    let envelope = Envelope::new(PROVIDER, Arc::new(kms))?;
    envelope.refresh().await.context("apiserver startup probe")?;
    Ok(envelope)
}

async fn apiservers(socket: &Path) -> Result<Vec<Envelope>> {
    let mut out = Vec::with_capacity(APISERVERS);
    for _ in 0..APISERVERS {
        out.push(apiserver(socket).await?);
    }
    Ok(out)
}

/// Probes each writer until it has installed a seed under `key_id`'s successor: kleidi reports the
/// new key version once its health cache (1 s here) lapses.
async fn follow_rotation(writers: &[Envelope], old_key_id: &str) -> Result<String> {
    let mut new_key_id = String::new();
    for writer in writers {
        let started = Instant::now();
        loop {
            let probe = writer.refresh().await?;
            if probe.key_id != old_key_id {
                new_key_id = probe.key_id;
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("Status still reports {old_key_id} 30 s after the transit key was rotated");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(new_key_id)
}

/// Runs point 5 for `n` Secrets against a fresh etcd, OpenBao and kleidi.
pub async fn run(n: usize, kleidi: &Path) -> Result<Row> {
    ensure!(n >= SCHEDULE.len() * APISERVERS, "N must be at least 15");
    let dir = tempfile::Builder::new().prefix("kleidi-scale-").tempdir()?;
    let audit_log = dir.path().join("audit.log");
    let etcd = Etcd::start().await?;
    let bao: OpenBao = OpenBaoSpec::default().with_file_audit(&audit_log).start().await?;
    // A 1 s health cache so Status reports a rotated key at once; the default 30 s only delays it.
    let plugin =
        KleidiPlugin::start_vault(kleidi, &bao, &bao.url(), dir.path(), &["--health-ok-ttl", "1s"]).await?;
    let store = etcd.client().await?;

    let write_started = Instant::now();
    let mut writers: Vec<Envelope> = Vec::new();
    let mut last_probe: Instant;
    for (step_index, step) in SCHEDULE.iter().enumerate() {
        match step {
            Step::Start | Step::Restart => {
                writers = apiservers(&plugin.socket).await?;
                last_probe = Instant::now();
            }
            Step::Rotate => {
                let old = writers
                    .first()
                    .and_then(Envelope::key_id)
                    .context("writer without a key_id")?;
                let version = bao.rotate_key().await?;
                let new = follow_rotation(&writers, &old).await?;
                println!("    KEK rotated to transit v{version}: key_id {new}");
                last_probe = Instant::now();
            }
        }
        let from = n * step_index / SCHEDULE.len();
        let to = n * (step_index + 1) / SCHEDULE.len();
        let mut i = from;
        while i < to {
            if last_probe.elapsed() > PROBE_EVERY {
                for writer in &writers {
                    writer.refresh().await?;
                }
                last_probe = Instant::now();
            }
            let end = (i + CHUNK).min(to);
            let mut batch = Vec::with_capacity(end - i);
            for j in i..end {
                let writer = writers
                    .get(j % APISERVERS)
                    .context("fewer writers than APISERVERS")?;
                let key = key(j);
                let value = writer.write(&key, &plaintext(j))?;
                batch.push((key, value));
            }
            put_all(&store, batch).await?;
            i = end;
        }
        println!(
            "    written {to}/{n} ({:?} {}), {:.0}/s",
            step,
            step_index + 1,
            to as f64 / write_started.elapsed().as_secs_f64()
        );
    }
    drop(writers);
    let write_seconds = write_started.elapsed().as_secs_f64();

    let (distinct_seeds, key_ids, stored) = seeds_in_etcd(&store).await?;
    ensure!(
        stored == n,
        "etcd holds {stored} values under {PREFIX}, {n} were written"
    );
    println!("    etcd: {stored} values, {distinct_seeds} distinct seeds under {key_ids} key_ids");

    // All apiservers restart at once, cold: new Envelopes, empty caches.
    let readers_env = apiservers(&plugin.socket).await?;
    // Their startup Status calls may have started a health probe (encrypt + decrypt of its own);
    // let it finish so it is not counted as a read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut readers = Vec::with_capacity(APISERVERS);
    for (r, reader) in readers_env.iter().enumerate() {
        let before = audit::count(&audit_log)?;
        let started = Instant::now();
        read_all(&store, reader, n).await?;
        let seconds = started.elapsed().as_secs_f64();
        let backend = audit::count(&audit_log)?.since(&before);
        let stats = reader.stats();
        println!(
            "    cold apiserver {}: read {n} in {seconds:.2} s, {} Decrypt RPCs, {} backend decrypt items in {} requests",
            r + 1,
            stats.decrypt_calls,
            backend.decrypt_items,
            backend.decrypt_requests
        );
        readers.push(Reader {
            decrypt_rpcs: stats.decrypt_calls,
            cache_hits: stats.cache_hits,
            backend,
            seconds,
        });
    }
    drop(plugin);
    drop(bao);
    drop(etcd);
    Ok(Row {
        n,
        distinct_seeds,
        key_ids,
        write_seconds,
        readers,
    })
}

async fn put_all(store: &EtcdStore, batch: Vec<(String, Vec<u8>)>) -> Result<()> {
    let mut in_flight = JoinSet::new();
    for (key, value) in batch {
        if in_flight.len() >= PUTS_IN_FLIGHT
            && let Some(done) = in_flight.join_next().await
        {
            done??;
        }
        let store = store.clone();
        in_flight.spawn(async move { store.put(key.as_bytes(), value).await });
    }
    while let Some(done) = in_flight.join_next().await {
        done??;
    }
    Ok(())
}

/// Distinct seeds and key_ids among the raw values, and how many values there are, decoded with the
/// stored format only (no KMS involved).
async fn seeds_in_etcd(store: &EtcdStore) -> Result<(usize, usize, usize)> {
    let prefix = format!("{}{PROVIDER}:", encrypted_object::PREFIX_V2);
    let mut seeds = HashSet::new();
    let mut key_ids = HashSet::new();
    let mut bad = 0usize;
    let stored = store
        .scan(PREFIX.as_bytes(), |_, value| {
            match value
                .strip_prefix(prefix.as_bytes())
                .map(encrypted_object::decode)
            {
                Some(Ok(object)) => {
                    key_ids.insert(object.key_id.clone());
                    seeds.insert((object.key_id, object.encrypted_dek_source));
                }
                _ => bad += 1,
            }
        })
        .await?;
    ensure!(
        bad == 0,
        "{bad} values in etcd are not KMS v2 values of provider {PROVIDER}"
    );
    Ok((seeds.len(), key_ids.len(), stored))
}

/// Reads every Secret back through `reader`, one after another as an apiserver's watch cache fills,
/// and checks each plaintext.
async fn read_all(store: &EtcdStore, reader: &Envelope, n: usize) -> Result<()> {
    let values = store.range(PREFIX.as_bytes()).await?;
    ensure!(values.len() == n, "etcd range returned {} of {n}", values.len());
    let mut seen = vec![false; n];
    for (key, value) in &values {
        let index: usize = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(PREFIX))
            .and_then(|i| i.parse().ok())
            .with_context(|| format!("unexpected key {}", String::from_utf8_lossy(key)))?;
        let (plain, _stale) = reader.read(key, value).await?;
        if plain.as_slice() != plaintext(index).as_slice() {
            bail!("plaintext mismatch at {}", String::from_utf8_lossy(key));
        }
        match seen.get_mut(index) {
            Some(slot) => *slot = true,
            None => bail!("key index {index} out of range"),
        }
    }
    ensure!(seen.iter().all(|s| *s), "some Secrets were not read back");
    Ok(())
}
