//! PKCS#11 (SoftHSM2), side by side, against a token this bench creates in a temp dir:
//!
//! - `pkcs11_encrypt_32B`, `pkcs11_decrypt_32B`: AES-256-GCM of a 32-byte seed inside the token,
//!   raw cryptoki on one session vs `Pkcs11Backend` (session pool, key_id and format checks).
//! - `pkcs11_round_trip_32B`: encrypt + decrypt, raw vs backend vs the whole plugin over gRPC on a
//!   Unix socket (guard, health and gRPC layers included), with and without the `:authority` layer.
//!
//! Bounded by criterion's flags (`just bench` passes 1 s warm-up, 2 s measurement).
//! Run: `cargo bench -p kleidi-benches --bench pkcs11` (needs Debian `softhsm2`).

// A bench that cannot set up or whose backend fails mid-run should stop loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    unsafe_code
)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use kleidi::KeyService;
use kleidi::backend::pkcs11::{Pkcs11Backend, Pkcs11Config, init};
use kleidi_benches::{grpc_round_trip, serve_plugin_with};
use secrecy::SecretSlice;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const SEED: [u8; 32] = [0x5e; 32];
const PIN: &str = "bench-pin-1";

/// The raw side: one logged-in session and the key handle, nothing else.
struct Raw {
    session: Session,
    key: cryptoki::object::ObjectHandle,
    _ctx: Pkcs11,
}

impl Raw {
    fn open(token_label: &str, key_label: &str) -> Self {
        let ctx = Pkcs11::new(MODULE).unwrap();
        // The backend initialized the module in this process already.
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("{e}"),
        }
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label() == token_label)
            .unwrap();
        let session = ctx.open_rw_session(slot).unwrap();
        match session.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("{e}"),
        }
        let key = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(key_label.into()),
            ])
            .unwrap()[0];
        Self {
            session,
            key,
            _ctx: ctx,
        }
    }

    fn encrypt(&self, iv: &mut [u8; 12]) -> Vec<u8> {
        // A fresh IV per call (a counter here; the backend draws random ones).
        let next = u64::from_le_bytes(iv[..8].try_into().unwrap()).wrapping_add(1);
        iv[..8].copy_from_slice(&next.to_le_bytes());
        let params = GcmParams::new(iv, b"", 128.into()).unwrap();
        self.session
            .encrypt(&Mechanism::AesGcm(params), self.key, &SEED)
            .unwrap()
    }

    fn decrypt(&self, iv: &mut [u8; 12], ciphertext: &[u8]) -> Vec<u8> {
        let params = GcmParams::new(iv, b"", 128.into()).unwrap();
        self.session
            .decrypt(&Mechanism::AesGcm(params), self.key, ciphertext)
            .unwrap()
    }
}

fn pkcs11(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    // SAFETY: set before any thread exists and before the module is loaded, which reads it.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    kleidi_harness::runtime::write_private(&dir.path().join("pin"), PIN).unwrap();
    kleidi_harness::runtime::write_private(&dir.path().join("so-pin"), "bench-so-pin").unwrap();
    let cfg = Pkcs11Config {
        module: MODULE.into(),
        token_label: "bench".into(),
        pin_file: dir.path().join("pin"),
        key_label: "kek".into(),
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(init(&cfg, &dir.path().join("so-pin"))).unwrap();
    let backend = Arc::new(rt.block_on(Pkcs11Backend::connect(cfg)).unwrap());
    let raw = Raw::open("bench", "kek");
    let (fixed_dir, plain_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plugins = [
        ("plugin_grpc", fixed_dir.path(), true),
        ("plugin_grpc_without_authority_fix", plain_dir.path(), false),
    ]
    .map(|(name, dir, fix)| {
        (
            name,
            rt.block_on(serve_plugin_with(backend.clone(), dir, fix)).unwrap(),
        )
    });
    let seed = SecretSlice::from(SEED.to_vec());

    let mut iv = [0u8; 12];
    let raw_ciphertext = raw.encrypt(&mut iv);
    let raw_iv = iv;
    let wrapped = rt.block_on(backend.encrypt("bench", &seed)).unwrap();

    let mut group = c.benchmark_group("pkcs11_encrypt_32B");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_cryptoki", |b| b.iter(|| black_box(raw.encrypt(&mut iv))));
    group.bench_function("backend", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(backend.encrypt("bench", &seed).await.unwrap()) });
    });
    group.finish();

    let mut group = c.benchmark_group("pkcs11_decrypt_32B");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_cryptoki", |b| {
        b.iter(|| black_box(raw.decrypt(&mut raw_iv.clone(), &raw_ciphertext)))
    });
    group.bench_function("backend", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(backend.decrypt("bench", &wrapped).await.unwrap()) });
    });
    group.finish();

    let mut group = c.benchmark_group("pkcs11_round_trip_32B");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_cryptoki", |b| {
        b.iter(|| {
            let ciphertext = raw.encrypt(&mut iv);
            black_box(raw.decrypt(&mut iv.clone(), &ciphertext))
        })
    });
    group.bench_function("backend", |b| {
        b.to_async(&rt).iter(|| async {
            let wrapped = backend.encrypt("bench", &seed).await.unwrap();
            black_box(backend.decrypt("bench", &wrapped).await.unwrap())
        });
    });
    // The same stack served as `kleidi serve` does it, and as plain tonic: the difference is what the
    // byte-level `:authority` layer costs.
    for (name, mut plugin) in plugins {
        group.bench_function(name, |b| {
            b.iter(|| black_box(rt.block_on(grpc_round_trip(&mut plugin, &SEED)).unwrap()));
        });
    }
    group.finish();
}

criterion_group!(benches, pkcs11);
criterion_main!(benches);
